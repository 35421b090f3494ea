"""The boundary: protobuf in, checked dataclasses out (and back). Every check names its field."""

from __future__ import annotations

from dataclasses import dataclass

from kaizen.errors import InvalidArgument
from kaizen.events import Feedback, FeedbackKind, Sampling
from kaizen.modeling import ROLES
from kaizen.v1 import chat_pb2, feedback_pb2

MAX_ID_CHARS = 128
MAX_MESSAGES = 256
# the Feedback message's signal (its oneof field) -> the kind stored
_KINDS = {str(k): k for k in FeedbackKind} | {"dwell_ms": FeedbackKind.DWELL}


@dataclass(frozen=True)
class Limits:
    max_new_tokens_cap: int
    default_sampling: Sampling
    max_context: int  # prompt tokens + max_new_tokens must fit
    max_feedback_text_chars: int = 2_000  # a comment or a correction


def check_id(field: str, value: str, required: bool) -> None:
    if required and not value:
        raise InvalidArgument(field, "required, got an empty string")
    if len(value) > MAX_ID_CHARS:
        raise InvalidArgument(field, f"{len(value)} characters; the limit is {MAX_ID_CHARS}")


def messages_from_pb(request: chat_pb2.GenerateRequest) -> list[dict[str, str]]:
    if not request.messages:
        raise InvalidArgument("messages", "at least one message is required")
    if len(request.messages) > MAX_MESSAGES:
        raise InvalidArgument(
            "messages", f"{len(request.messages)} messages; the limit is {MAX_MESSAGES}"
        )
    out = []
    for i, m in enumerate(request.messages):
        if m.role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role", f"{m.role!r} is not one of {ROLES}")
        out.append({"role": m.role, "content": m.content})
    return out


def sampling_from_pb(request: chat_pb2.GenerateRequest, limits: Limits) -> Sampling:
    """The sampling asked for; each field left unset takes the server's default."""
    default = limits.default_sampling
    if not request.HasField("sampling"):
        return default
    s = request.sampling

    def given(name: str, fallback):
        return getattr(s, name) if s.HasField(name) else fallback

    cap = limits.max_new_tokens_cap
    max_new_tokens = given("max_new_tokens", default.max_new_tokens)
    temperature = given("temperature", default.temperature)
    top_p = given("top_p", default.top_p)
    if not 1 <= max_new_tokens <= cap:
        raise InvalidArgument("sampling.max_new_tokens", f"{max_new_tokens} is outside 1..{cap}")
    if not 0.0 <= temperature <= 2.0:  # NaN fails this too
        raise InvalidArgument("sampling.temperature", f"{temperature} is outside 0..2")
    if not 0.0 <= top_p <= 1.0:
        raise InvalidArgument("sampling.top_p", f"{top_p} is outside 0..1")
    return Sampling(
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_p=float(top_p) if top_p > 0 else 1.0,
        seed=int(given("seed", default.seed)),
        ignore_eos=bool(s.ignore_eos),
    )


def check_request_ids(request: chat_pb2.GenerateRequest) -> None:
    check_id("user_id", request.user_id, required=False)
    check_id("request_id", request.request_id, required=False)


def check_context(prompt_tokens: int, sampling: Sampling, limits: Limits) -> None:
    if prompt_tokens + sampling.max_new_tokens > limits.max_context:
        raise InvalidArgument(
            "messages",
            f"the prompt is {prompt_tokens} tokens; with max_new_tokens "
            f"{sampling.max_new_tokens} that exceeds the model's context of "
            f"{limits.max_context} tokens",
        )


def feedback_from_pb(
    fb: feedback_pb2.Feedback, max_text_chars: int, where: str = "", source: str = ""
) -> Feedback:
    """Check one Feedback message; `where` prefixes field names (`feedback[3].`) in a stream."""
    check_id(f"{where}event_id", fb.event_id, required=True)
    check_id(f"{where}response_id", fb.response_id, required=True)
    check_id(f"{where}user_id", fb.user_id, required=False)
    signal = fb.WhichOneof("signal")
    value, text = 0.0, ""
    if signal is None:
        raise InvalidArgument(
            f"{where}signal",
            "set one of thumb, rating, click, dwell_ms, copy, regenerate, comment, correction",
        )
    if signal == "thumb":
        if fb.thumb == feedback_pb2.THUMB_UNSPECIFIED:
            raise InvalidArgument(f"{where}thumb", "must be THUMB_UP or THUMB_DOWN")
        value = 1.0 if fb.thumb == feedback_pb2.THUMB_UP else -1.0
    elif signal == "rating":
        if not 1 <= fb.rating <= 5:
            raise InvalidArgument(f"{where}rating", f"{fb.rating} is outside 1..5")
        value = float(fb.rating)
    elif signal == "dwell_ms":
        value = float(fb.dwell_ms)
    elif signal in ("comment", "correction"):
        text = getattr(fb, signal)
        if not text.strip():
            raise InvalidArgument(f"{where}{signal}", "must not be empty")
        if len(text) > max_text_chars:
            raise InvalidArgument(
                f"{where}{signal}",
                f"{len(text)} characters; the limit is {max_text_chars} "
                "(--max-feedback-text-chars)",
            )
    kind = _KINDS[signal]
    return Feedback(
        event_id=fb.event_id,
        response_id=fb.response_id,
        user_id=fb.user_id,
        kind=kind,
        value=value,
        text=text,
        source=source,
    )
