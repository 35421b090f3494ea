"""Simulated users: their tastes, their noisy sparse feedback, and a run against the server."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from kaizen.cli import main
from kaizen.events import FeedbackKind
from kaizen.sim.preferences import (
    Reaction,
    concise,
    follow_up,
    likes_concise,
    likes_follow_up,
    load_preference,
    react,
)
from kaizen.sim.simulate import Simulator, liked_rate, load_prompts


def always_thumbs_up(prompt: str, answer: str, rng: random.Random) -> list[Reaction]:
    return [Reaction(FeedbackKind.THUMB, 1.0), Reaction(FeedbackKind.DWELL, 1500.0)]


@pytest.mark.parametrize(
    "answer, liked",
    [
        ("Paris.", True),
        ("The capital of France is Paris.", True),
        ("Sure! The capital of France is Paris.", False),  # preamble
        (" ".join(["word"] * 31), False),
        ("", False),
    ],
)
def test_concise_likes_short_direct_answers(answer, liked):
    assert likes_concise("What is the capital of France?", answer) is liked


@pytest.mark.parametrize(
    "answer, liked",
    [
        ("Paris is the capital. Would you like to know more about it?", True),
        ("Paris. What else can I help you with?**", True),
        ("Paris is the capital of France.", False),
        ("Why?", False),  # too short to be a question back
    ],
)
def test_follow_up_likes_answers_that_ask_back(answer, liked):
    assert likes_follow_up("Tell me about Paris", answer) is liked


def test_feedback_is_sparse_noisy_and_mostly_implicit():
    rng = random.Random(0)
    liked_runs = [react(True, "a short answer here", rng, "meh") for _ in range(2000)]
    disliked_runs = [react(False, "a short answer here", rng, "meh") for _ in range(2000)]
    explicit = {FeedbackKind.THUMB, FeedbackKind.RATING}

    def verdicts(runs):
        return [e for run in runs for e in run if e.kind in explicit]

    silent = sum(not any(e.kind in explicit for e in run) for run in liked_runs)
    assert 0.6 < silent / len(liked_runs) < 0.8  # most answers get no verdict
    up = [
        e.value > 0 if e.kind == FeedbackKind.THUMB else e.value >= 4 for e in verdicts(liked_runs)
    ]
    down = [
        e.value < 0 if e.kind == FeedbackKind.THUMB else e.value <= 2
        for e in verdicts(disliked_runs)
    ]
    assert 0.8 < sum(up) / len(up) < 0.97 and 0.8 < sum(down) / len(down) < 0.97  # noisy
    kinds = Counter(e.kind for run in liked_runs + disliked_runs for e in run)
    assert kinds[FeedbackKind.DWELL] > kinds[FeedbackKind.THUMB]
    assert (
        kinds[FeedbackKind.COPY] and kinds[FeedbackKind.REGENERATE] and kinds[FeedbackKind.COMMENT]
    )
    assert not any(e.kind == FeedbackKind.COPY for run in disliked_runs for e in run)


def test_preferences_load_by_name_or_module_path():
    assert load_preference("concise") is concise and load_preference("follow_up") is follow_up
    mine = load_preference("tests.test_simulate:always_thumbs_up")
    assert mine("q", "a", random.Random(0)) == always_thumbs_up("q", "a", random.Random(0))
    for bad in ("verbose", "tests.test_simulate:nothing_here", "no_such_module:f"):
        with pytest.raises(ValueError, match="--preference"):
            load_preference(bad)


def test_the_shipped_prompt_sets_are_varied_and_disjoint():
    train, heldout = load_prompts("train"), load_prompts("heldout")
    assert len(train) >= 300 and len(heldout) >= 60
    assert len(set(train)) == len(train)
    assert not {p.lower() for p in train} & {p.lower() for p in heldout}


def test_simulated_users_chat_and_their_feedback_is_stored(server, channel):
    sim = Simulator(channel, always_thumbs_up, ["Hi there", "What is 2 + 2?"], max_new_tokens=4)
    tally = sim.run(events=10, concurrency=2)
    assert sum(tally.events.values()) >= 10
    stored = server.buffer.read_samples(0, 1000)
    assert len(stored) == sum(tally.events.values())
    assert Counter(str(s.feedback.kind) for s in stored) == tally.events
    assert {s.generation.user_id for s in stored} <= {f"sim-user-{i}" for i in range(20)}


def test_liked_rate_is_repeatable_on_one_version(channel):
    prompts = load_prompts("heldout")[:6]
    first = liked_rate(channel, likes_concise, prompts, max_new_tokens=8)
    second = liked_rate(channel, likes_concise, prompts, max_new_tokens=8)
    assert first == second and first[1] == Counter({"v0": 6})


def test_kaizen_simulate_runs_against_a_server_and_refuses_bad_flags(
    server, capsys, api_key, tmp_path, monkeypatch
):
    address = f"127.0.0.1:{server.port}"
    monkeypatch.delenv("KAIZEN_API_KEY", raising=False)
    assert main(["simulate", "--server", address, "--events", "1"]) == 1  # no credential
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    key_file = tmp_path / "key"
    key_file.write_text(api_key + "\n")
    run = ["simulate", "--server", address, "--key-file", str(key_file)]
    assert main([*run, "--events", "5", "--max-new-tokens", "4"]) == 0
    assert "feedback events" in capsys.readouterr().out
    monkeypatch.setenv("KAIZEN_API_KEY", api_key)
    assert main(["simulate", "--server", address, "--events", "2", "--max-new-tokens", "4"]) == 0
    assert main(["simulate", "--server", address, "--preference", "verbose"]) == 2
    assert main(["simulate", "--server", address, "--events", "0"]) == 2
    assert "--events: must be 1 or more" in capsys.readouterr().err
