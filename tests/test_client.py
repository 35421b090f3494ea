"""`kaizen.client.Client` over a real channel: chat, stream, feedback, withdraw, and which
failures it retries."""

from __future__ import annotations

import grpc
import pytest

from kaizen.client import Answer, Client, RetryPolicy, connect
from tests.conftest import free_port

NO_WAIT = RetryPolicy(attempts=3, initial_backoff_s=0.0)  # retries without sleeping


@pytest.fixture
def client(server, api_key):
    with Client(f"127.0.0.1:{server.port}", api_key) as kz:
        yield kz


class Unavailable(grpc.RpcError):
    """What a draining or restarting server answers."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "injected: the server is draining"


class Flaky(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """UNAVAILABLE, as a draining server or a dropped connection gives it: the first
    `failures` calls fail before they leave the client; the next `lost_replies` unary
    calls are done by the server, but their replies are lost; with `after_first_piece`,
    streams break after their first chunk."""

    def __init__(self) -> None:
        self.failures = 0
        self.lost_replies = 0
        self.after_first_piece = False
        self.calls = 0

    def intercept_unary_unary(self, continuation, details, request):
        self.calls += 1
        if self.calls <= self.failures:
            raise Unavailable()
        outcome = continuation(details, request)
        if self.calls <= self.failures + self.lost_replies:
            outcome.result()  # the server did it
            raise Unavailable()
        return outcome

    def intercept_unary_stream(self, continuation, details, request):
        self.calls += 1
        if self.calls <= self.failures:
            raise Unavailable()
        call = continuation(details, request)
        return BrokenAfterOne(call) if self.after_first_piece else call


class BrokenAfterOne:
    """A stream that yields its first chunk, then fails as a dropped connection does."""

    def __init__(self, call) -> None:
        self.call = call
        self.sent = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.sent:
            raise Unavailable()
        self.sent += 1
        return next(self.call)

    def cancel(self) -> bool:
        return self.call.cancel()


@pytest.fixture
def flaky_client(server, api_key):
    """A client on a channel through `Flaky`, which the test configures."""
    flaky = Flaky()
    with connect(f"127.0.0.1:{server.port}", api_key) as channel:
        yield flaky, Client.from_channel(grpc.intercept_channel(channel, flaky), NO_WAIT)


def test_chat_returns_the_logged_answer(server, client):
    answer = client.chat("What is the capital of France?", "u1", max_new_tokens=6, seed=7)
    assert answer.response_id and answer.model_version == "v0"
    assert answer.finish_reason in ("stop", "length") and 1 <= answer.completion_tokens <= 6
    row = server.buffer.generation(answer.response_id)
    assert row.user_id == "u1" and row.text == answer.text
    assert row.sampling.max_new_tokens == 6 and row.sampling.seed == 7
    # unset options are left to the server: its default temperature, not 0
    assert row.sampling.temperature == 0.7


def test_stream_pieces_join_to_the_answer(server, client):
    conversation = [{"role": "user", "content": "Why is the sky blue?"}]
    *pieces, final = client.stream(conversation, "u1", max_new_tokens=10, seed=42)
    assert pieces and all(isinstance(p, str) for p in pieces)
    assert isinstance(final, Answer) and final.response_id and final.model_version == "v0"
    assert final.finish_reason in ("stop", "length") and final.completion_tokens >= 1
    assert "".join(pieces) == final.text == server.buffer.generation(final.response_id).text
    whole = client.chat(conversation, "u1", max_new_tokens=10, seed=42)
    assert whole.text == final.text  # same seed, same answer, streamed or not


def test_feedback_is_stored_once_per_event_id_and_can_be_withdrawn(server, client):
    answer = client.chat("hi", "u1")
    first = client.feedback(answer.response_id, "u1", thumb="up")
    again = client.feedback(answer.response_id, "u1", thumb="up", event_id=first.event_id)
    assert first.event_id and (first.accepted, first.duplicates) == (1, 0)
    assert (again.event_id, again.accepted, again.duplicates) == (first.event_id, 0, 1)
    assert sum(server.buffer.feedback_states().values()) == 1  # one row, not two
    [sample] = server.buffer.read_samples(0, 10)
    assert sample.feedback.event_id == first.event_id and sample.feedback.value == 1.0

    # an empty user_id is the answer's user; each kind keeps its own signal
    assert client.feedback(answer.response_id, rating=4).accepted == 1
    assert client.feedback(answer.response_id, correction="Paris.").accepted == 1
    assert client.feedback(answer.response_id, thumb="down").superseded == 1
    assert client.withdraw(answer.response_id, "u1", kind="thumb") == 1
    assert client.withdraw(answer.response_id, "u1", kind="thumb") == 0
    kinds = sorted(str(s.feedback.kind) for s in server.buffer.read_samples(0, 10))
    assert kinds == ["correction", "rating"]
    assert client.withdraw(answer.response_id) == 2  # every kind
    assert server.buffer.read_samples(0, 10) == []


def test_feedback_needs_exactly_one_signal():
    with Client("127.0.0.1:1") as kz:  # refused before anything is sent
        with pytest.raises(ValueError, match="set exactly one of thumb, rating"):
            kz.feedback("r-1", thumb="up", rating=5)
        with pytest.raises(ValueError, match="got none"):
            kz.feedback("r-1")
        with pytest.raises(ValueError, match="thumb: 'sideways'"):
            kz.feedback("r-1", thumb="sideways")


def test_invalid_argument_is_raised_at_once_with_the_servers_message(client, flaky_client):
    flaky, kz = flaky_client
    answer = client.chat("hi", "u1")
    with pytest.raises(grpc.RpcError) as err:
        kz.feedback(answer.response_id, "u1", rating=9)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "rating: 9 is outside 1..5"
    with pytest.raises(grpc.RpcError) as err:
        list(kz.stream("hi", "u1", max_new_tokens=0))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("sampling.max_new_tokens:")
    assert flaky.calls == 2  # one try each


def test_unavailable_is_retried_until_the_call_goes_through(server, flaky_client):
    flaky, kz = flaky_client
    flaky.failures = 2  # of NO_WAIT's 3 attempts
    answer = kz.chat("hi", "u1", max_new_tokens=4)
    assert answer.response_id and flaky.calls == 3

    flaky.calls = 0
    *pieces, final = kz.stream("hi", "u1", max_new_tokens=4)
    assert isinstance(final, Answer) and "".join(pieces) == final.text and flaky.calls == 3

    flaky.calls = 0
    ack = kz.feedback(answer.response_id, "u1", thumb="up")
    assert (ack.accepted, flaky.calls) == (1, 3)
    assert sum(server.buffer.feedback_states().values()) == 1

    flaky.calls = 0
    assert kz.withdraw(answer.response_id, "u1") == 1 and flaky.calls == 3


def test_feedback_retried_after_its_reply_was_lost_is_stored_once(server, client, flaky_client):
    flaky, kz = flaky_client
    answer = client.chat("hi", "u1")
    flaky.lost_replies = 1
    ack = kz.feedback(answer.response_id, "u1", rating=5)
    assert (ack.accepted, ack.duplicates, flaky.calls) == (0, 1, 2)  # the retry: a duplicate
    assert sum(server.buffer.feedback_states().values()) == 1


def test_retries_stop_after_the_attempts(flaky_client):
    flaky, kz = flaky_client
    flaky.failures = 5
    with pytest.raises(grpc.RpcError) as err:
        kz.chat("hi", "u1")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and flaky.calls == 3


def test_a_stream_is_not_retried_once_a_piece_arrived(flaky_client):
    flaky, kz = flaky_client
    flaky.after_first_piece = True
    seen = []
    with pytest.raises(grpc.RpcError) as err:
        for item in kz.stream("Tell me a story.", "u1", max_new_tokens=16, seed=3):
            seen.append(item)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(seen) == 1 and flaky.calls == 1  # a second try would show another answer


def test_an_unreachable_server_is_unavailable_after_the_attempts():
    with Client(
        f"127.0.0.1:{free_port()}", retry=RetryPolicy(attempts=2, initial_backoff_s=0)
    ) as kz:
        with pytest.raises(grpc.RpcError) as err:
            kz.chat("hi")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_retry_policy_refuses_nonsense():
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError, match="deadline_s"):
        RetryPolicy(deadline_s=0)
