"""The learner: rewards, the REINFORCE loss, its direction, its guards, exactly-once restarts."""

from __future__ import annotations

import collections
import dataclasses
import re
import threading
import time
from dataclasses import replace

import pytest
import torch

from kaizen.buffer import SQLiteBuffer
from kaizen.events import Feedback, FeedbackKind, Generation, Sampling
from kaizen.registry import Registry
from kaizen.rewards import (
    RewardConfig,
    RewardConfigError,
    load_rewards,
    reward,
    to_toml,
)
from learner.config import LearnerConfig
from learner.examples import Scored
from learner.loop import Learner
from learner.objectives import token_kl
from tests.conftest import policy_logprobs


def fb(kind: FeedbackKind, value: float = 0.0, text: str = "") -> Feedback:
    return Feedback("e", "r", "u", kind, value, text)


@pytest.mark.parametrize(
    "event, expected",
    [
        (fb(FeedbackKind.THUMB, 1), 1.0),
        (fb(FeedbackKind.THUMB, -1), -1.0),
        (fb(FeedbackKind.RATING, 1), -1.0),
        (fb(FeedbackKind.RATING, 3), 0.0),
        (fb(FeedbackKind.RATING, 5), 1.0),
        (fb(FeedbackKind.COPY), 0.5),
        (fb(FeedbackKind.CLICK), 0.1),
        (fb(FeedbackKind.DWELL, 1_000), 0.15),  # no answer at hand: 2 s to read
        (fb(FeedbackKind.DWELL, 120_000), 0.3),
        (fb(FeedbackKind.REGENERATE), -0.5),
        (fb(FeedbackKind.CORRECTION, text="Paris."), -0.5),
        (fb(FeedbackKind.COMMENT, text="too long"), None),
    ],
)
def test_reward_of_each_kind(event, expected):
    assert reward(event) == (pytest.approx(expected) if expected is not None else None)


def answer(words: int, created_at: float = 0.0) -> Generation:
    return Generation(
        response_id="r",
        user_id="u",
        request_id="",
        model_version="v0",
        messages=[{"role": "user", "content": "q"}],
        prompt_tokens=[1],
        response_tokens=[2],
        behaviour_logprobs=[-1.0],
        text=" ".join(["word"] * words),
        finish_reason="stop",
        sampling=Sampling(),
        created_at=created_at,
    )


def test_dwell_is_normalised_by_the_answer_length():
    ten_seconds = fb(FeedbackKind.DWELL, 10_000)
    short, long = answer(20), answer(200)  # 5 s and 50 s to read at 4 words/s
    assert reward(ten_seconds, generation=short) == pytest.approx(0.3)
    assert reward(ten_seconds, generation=long) == pytest.approx(0.3 * 10 / 50)


def test_rewards_decay_with_the_answers_age():
    config = RewardConfig(half_life_s=3600)
    thumb = fb(FeedbackKind.THUMB, 1)
    assert reward(thumb, config, answer(5, created_at=1000.0), now=1000.0) == 1.0
    assert reward(thumb, config, answer(5, created_at=1000.0), now=4600.0) == pytest.approx(0.5)
    assert reward(thumb, RewardConfig(), answer(5, created_at=0.0), now=1e9) == 1.0


def test_the_shipped_reward_file_holds_the_defaults_and_round_trips(tmp_path):
    assert load_rewards() == RewardConfig()
    custom = RewardConfig(copy=0.25, regenerate=-1.0, half_life_s=60.0)
    (tmp_path / "r.toml").write_text(to_toml(custom))
    assert load_rewards(tmp_path / "r.toml") == custom


def test_a_reward_file_overrides_only_the_keys_it_names(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[implicit]\ncopy = 0.9\n")
    config = load_rewards(path)
    assert config.copy == 0.9 and config.thumb == 1.0 and config.regenerate == -0.5
    assert reward(fb(FeedbackKind.COPY), config) == pytest.approx(0.9)


@pytest.mark.parametrize(
    "text, names",
    [
        ("[implicit]\ncopi = 0.5\n", "implicit.copi: unknown key"),
        ("[bonus]\nx = 1\n", "unknown section [bonus]"),
        ("[explicit]\nthumb = 'yes'\n", "explicit.thumb: must be a number"),
        ("[implicit]\nregenerate = -3\n", "implicit.regenerate: -3 is outside"),
        ("[implicit]\nreading_words_per_s = 0\n", "implicit.reading_words_per_s: must be above 0"),
        ("[decay]\nhalf_life_s = -1\n", "decay.half_life_s: must be 0 or more"),
        ("[explicit\n", "not valid TOML"),
    ],
)
def test_a_bad_reward_file_is_refused_naming_the_key(tmp_path, text, names):
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(RewardConfigError, match=re.escape(names)):
        load_rewards(path)


def test_kaizen_learn_refuses_a_bad_reward_file_before_loading_anything(tmp_path, capsys):
    from kaizen.cli import main

    path = tmp_path / "r.toml"
    path.write_text("[implicit]\ncopi = 0.5\n")
    assert main(["learn", "--rewards", str(path), "--model", str(tmp_path / "none")]) == 2
    assert "implicit.copi: unknown key" in capsys.readouterr().err


def test_kl_is_zero_when_policy_equals_reference_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    assert torch.allclose(token_kl(logits, logits), torch.zeros(2, 5), atol=1e-6)
    assert (token_kl(logits, torch.randn(2, 5, 11))[:, 1:] > 0).all()


def make_generation(tokenizer, response_id: str, answer: str, user: str = "u") -> Generation:
    from kaizen.modeling import chat_prompt_ids

    messages = [{"role": "user", "content": "Say something."}]
    response = tokenizer.encode(answer, add_special_tokens=False) + [2]
    return Generation(
        response_id=response_id,
        user_id=user,
        request_id="",
        model_version="v0",
        messages=messages,
        prompt_tokens=chat_prompt_ids(tokenizer, messages),
        response_tokens=response,
        behaviour_logprobs=[-1.0] * len(response),
        text=answer,
        finish_reason="stop",
        sampling=Sampling(temperature=1.0, seed=1),
        created_at=time.time(),
    )


@pytest.fixture
def learner_config(tiny_model, tmp_path):
    return LearnerConfig(
        model=tiny_model,
        buffer=f"sqlite:///{tmp_path}/buffer.db",
        registry=tmp_path / "registry",
        objective="reinforce",
        publish_every=2,
        batch_size=2,
        lr=1e-2,
        metrics_port=-1,
        batch_wait_s=0.0,
        poll_s=0.05,
        gate_holdout=0.0,  # every event trains; the gate's own tests hold some out
        max_user_share=1.0,  # one simulated user sends everything; the caps' test sets it
    )


def as_sampled(learner: Learner, g: Generation) -> Generation:
    """`g` with the behaviour log-probabilities the learner's current policy gives it, as
    if the server had just sampled it (temperature 1) from the same weights."""
    logged = policy_logprobs(learner.model, g.prompt_tokens, g.response_tokens)
    return dataclasses.replace(g, behaviour_logprobs=logged)


def seq_logprob(learner: Learner, generation: Generation) -> float:
    return sum(policy_logprobs(learner.model, generation.prompt_tokens, generation.response_tokens))


@pytest.mark.parametrize("up", [True, False])
def test_a_step_moves_the_answer_the_way_its_feedback_asks(learner_config, up):
    learner = Learner(learner_config)
    g = as_sampled(learner, make_generation(learner.tokenizer, "r1", "Paris is the capital."))
    learner.buffer.append_generation(g)
    learner.buffer.append_feedback([Feedback("e1", "r1", "u", FeedbackKind.THUMB, 1 if up else -1)])
    before = seq_logprob(learner, g)
    learner.fill()
    for _ in range(3):  # the same sample three times: each step pushes the same way
        result = learner.step(list(learner.pending))
        assert result.ok
    after = seq_logprob(learner, g)
    assert (after > before) if up else (after < before)


def test_a_nonfinite_loss_drops_the_step_and_leaves_the_weights(learner_config):
    learner = Learner(learner_config)
    g = make_generation(learner.tokenizer, "r1", "Hello.")
    learner.buffer.append_generation(g)
    learner.buffer.append_feedback([Feedback("e1", "r1", "u", FeedbackKind.THUMB, 1)])
    learner.fill()
    ((scored,),) = [learner.pending]
    weights = [p.detach().clone() for p in learner.params]
    result = learner.step([Scored(scored.answer, float("nan"))])
    assert not result.ok and result.reason == "nonfinite_loss"
    assert all(torch.equal(a, b) for a, b in zip(weights, learner.params, strict=True))


def add_thumbs(buffer: SQLiteBuffer, tokenizer, start: int, count: int) -> None:
    for i in range(start, start + count):
        buffer.append_generation(make_generation(tokenizer, f"r{i}", f"Answer number {i}."))
        buffer.append_feedback(
            [Feedback(f"e{i}", f"r{i}", "u", FeedbackKind.THUMB, 1 if i % 2 else -1)]
        )


def test_a_restarted_learner_neither_repeats_nor_skips(learner_config):
    first = Learner(learner_config)
    add_thumbs(first.buffer, first.tokenizer, 0, 5)
    # Train until 4 samples are in: two versions published (cursor 2, then 4)...
    while first.progress.samples < 4:
        first.fill()
        first.train_pending()
        if first.since_publish >= learner_config.publish_every:
            first.publish()
    # ...then one more trained but never published, and the process dies.
    first.fill()
    first.train_pending()
    assert first.progress.cursor == 5 and first.version == "v2"
    first.buffer.close()

    second = Learner(learner_config)
    assert second.version == "v2" and second.progress.cursor == 4
    assert second.progress.steps == first.progress.steps - 1
    add_thumbs(second.buffer, second.tokenizer, 5, 1)
    second.fill()
    assert [ex.reward for ex in second.pending] == [-1.0, 1.0]  # e4 is thumbs down, e5 up
    assert second.read_cursor == 6
    manifest = Registry(learner_config.registry).manifest("v2")
    assert manifest.metadata["cursor"] == 4 and manifest.parent == "v1"


def test_run_publishes_every_n_examples_and_the_judge_scores_comments(learner_config):
    learner = Learner(learner_config)
    add_thumbs(learner.buffer, learner.tokenizer, 0, 4)
    g = make_generation(learner.tokenizer, "rc", "A reply.")
    learner.buffer.append_generation(g)
    learner.buffer.append_feedback([Feedback("ec", "rc", "u", FeedbackKind.COMMENT, text="hmm")])
    stop = threading.Event()
    runner = threading.Thread(target=learner.run, args=(stop,))
    runner.start()
    deadline = time.monotonic() + 60
    registry = Registry(learner_config.registry)
    try:
        while registry.latest() != "v2" or learner.progress.cursor < 5:
            assert time.monotonic() < deadline, "the learner did not publish two versions"
            time.sleep(0.05)
    finally:
        stop.set()
        runner.join()
    assert registry.versions() == ["v1", "v2"]
    assert learner.progress.samples == 5  # 4 thumbs, and the comment the judge scored
    judged = learner.rewards.comment * learner.judge.score(["hmm"])[0]
    assert learner.progress.window_rewards == [pytest.approx(judged)]
    assert registry.manifest("v1").metadata["window_examples"] == 2


def test_held_out_events_count_toward_publish_every(learner_config, caplog):
    """Issue 16: 4 events of which one falls in the gate's slice are 4 toward
    --publish-every 4, so the version comes; 2 events log what the learner waits for."""
    config = dataclasses.replace(learner_config, publish_every=4, batch_size=4, gate_holdout=0.5)
    learner = Learner(config)
    ids = [f"r{i}" for i in range(64)]
    held = [r for r in ids if learner.held_out(r)][:1]
    trained = [r for r in ids if not learner.held_out(r)][:5]
    rows = [*trained[:2], *held, *trained[2:3]]  # 2 trained, 1 held out, 1 trained
    for i, rid in enumerate(rows[:2]):
        learner.buffer.append_generation(make_generation(learner.tokenizer, rid, f"Answer {i}."))
        learner.buffer.append_feedback([Feedback(f"e{i}", rid, "u", FeedbackKind.THUMB, 1)])
    stop = threading.Event()
    runner = threading.Thread(target=learner.run, args=(stop,))
    caplog.set_level("INFO", logger="learner.loop")
    runner.start()
    registry = Registry(config.registry)
    try:
        wait = time.monotonic() + 60
        while "waiting for 2 more (--publish-every 4)" not in caplog.text:
            assert time.monotonic() < wait, f"no waiting line in the log:\n{caplog.text}"
            time.sleep(0.05)
        assert registry.versions() == []
        for i, rid in enumerate(rows[2:], start=2):
            text = f"Answer {i}."
            learner.buffer.append_generation(make_generation(learner.tokenizer, rid, text))
            learner.buffer.append_feedback([Feedback(f"e{i}", rid, "u", FeedbackKind.THUMB, 1)])
        while registry.latest() != "v1":
            assert time.monotonic() < wait, "a held-out event left the learner short"
            time.sleep(0.05)
    finally:
        stop.set()
        runner.join()
    meta = registry.manifest("v1").metadata
    assert (meta["window_examples"], meta["window_held_out"], meta["cursor"]) == (3, 1, 4)
    assert learner.since_publish == 0


def test_only_held_out_events_publish_nothing(learner_config):
    config = dataclasses.replace(learner_config, publish_every=2, batch_size=2, gate_holdout=0.5)
    learner = Learner(config)
    held = [r for r in (f"r{i}" for i in range(64)) if learner.held_out(r)][:3]
    for i, rid in enumerate(held):
        learner.buffer.append_generation(make_generation(learner.tokenizer, rid, f"Answer {i}."))
        learner.buffer.append_feedback([Feedback(f"e{i}", rid, "u", FeedbackKind.THUMB, 1)])
    learner.fill()
    assert not learner.pending and learner.since_publish == 3 and not learner.due()
    assert "nothing trained to publish" in learner.waiting()


def adapter_of(learner: Learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.model.named_parameters() if p.requires_grad}


def test_the_learner_rebases_onto_the_serving_version_after_a_rollback(learner_config, caplog):
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    from kaizen.registry import PROMOTED, ROLLED_BACK

    learner = Learner(learner_config)
    registry = Registry(learner_config.registry)
    for start in (0, 2):  # two versions, v1 then v2
        add_thumbs(learner.buffer, learner.tokenizer, start, 2)
        learner.fill()
        learner.train_pending()
        learner.publish()
    assert learner.version == "v2"
    learner.follow_servers()
    assert learner.version == "v2"  # nothing decided yet: nothing to follow
    registry.record_rollout("v1", PROMOTED, "canary promoted")
    learner.follow_servers()
    assert learner.version == "v2"  # v2 is v1's child, waiting for its turn: keep going

    caplog.set_level("WARNING", logger="learner.loop")
    registry.record_rollout("v2", ROLLED_BACK, "worse than v1")
    learner.follow_servers()
    assert learner.version == "v1"
    assert "rebasing onto v1" in caplog.text and "v2 was rolled back" in caplog.text
    saved = load_peft_weights(str(registry.path("v1")), device="cpu")
    mine = get_peft_model_state_dict(learner.model)
    assert set(saved) == set(mine)
    assert all(torch.equal(saved[k], mine[k]) for k in saved)
    add_thumbs(learner.buffer, learner.tokenizer, 4, 2)
    learner.fill()
    learner.train_pending()
    learner.publish()
    assert learner.version == "v3" and registry.manifest("v3").parent == "v1"
    undecided = {"outcome": "undecided", "decision": "rollback"}
    registry.record_rollout("v3", ROLLED_BACK, "undecided at the end of the window", undecided)
    learner.follow_servers()
    assert learner.version == "v3"  # not shown worse: what it learned is kept

    registry.record_rollout("v1", ROLLED_BACK, "operator rollback", by="operator")
    registry.record_rollout("v3", ROLLED_BACK, "worse than v1")
    learner.follow_servers()  # nothing promoted is left: the base model
    assert learner.version == "v0"
    assert all(
        torch.count_nonzero(p) == 0 for n, p in learner.model.named_parameters() if "lora_B" in n
    )


def test_an_operator_promotion_of_another_version_is_followed(learner_config, caplog):
    from kaizen.registry import PROMOTED

    learner = Learner(learner_config)
    registry = Registry(learner_config.registry)
    for start in (0, 2):
        add_thumbs(learner.buffer, learner.tokenizer, start, 2)
        learner.fill()
        learner.train_pending()
        learner.publish()
    registry.record_rollout("v2", PROMOTED, "canary promoted")
    learner.follow_servers()
    assert learner.version == "v2"  # its own version promoted: nothing to do
    caplog.set_level("WARNING", logger="learner.loop")
    registry.record_rollout("v1", PROMOTED, "v2 confuses users", by="operator")
    learner.follow_servers()
    assert learner.version == "v1" and "an operator promoted v1" in caplog.text


def test_no_one_user_or_key_gives_a_version_more_than_its_share(learner_config, caplog):
    """A flood from one user (or through one key) trains at most its cap per version;
    the rest is dropped, counted, logged; the next version gives them a new share."""
    config = replace(learner_config, publish_every=8, batch_size=8, max_user_share=0.25)

    def thumb(buffer, tokenizer, i: int, user: str, source: str = "") -> None:
        buffer.append_generation(make_generation(tokenizer, f"r{i}", f"Answer {i}.", user))
        buffer.append_feedback(
            [Feedback(f"e{i}", f"r{i}", user, FeedbackKind.THUMB, 1, source=source)]
        )

    learner = Learner(config)
    for i in range(10):
        thumb(learner.buffer, learner.tokenizer, i, "flooder")
    for i in range(10, 14):
        thumb(learner.buffer, learner.tokenizer, i, f"honest-{i}")
    learner.fill()
    owners = learner.buffer.owners([ex.answer.source for ex in learner.pending])
    by_user = collections.Counter(owners.values())
    assert by_user["flooder"] == 2  # 0.25 × 8
    assert all(by_user[f"honest-{i}"] == 1 for i in range(10, 14))
    assert learner.window_capped == {"user": 8}
    caplog.set_level("INFO", logger="learner.loop")
    learner.train_pending()
    learner.publish()
    assert "influence caps dropped 8 examples" in caplog.text
    assert Registry(config.registry).manifest("v1").metadata["window_capped"] == {"user": 8}
    assert learner.window_capped == {}  # a new version: a new share
    learner.buffer.close()

    # one API key carrying many users: the key's cap (0.5 × 8), each user under theirs
    keyed = Learner(replace(config, max_user_share=1.0, max_key_share=0.5))
    for i in range(14, 24):
        thumb(keyed.buffer, keyed.tokenizer, i, f"u{i}", source="key:partner")
    keyed.fill()
    assert len(keyed.pending) == 4 and keyed.window_capped == {"key": 6}
