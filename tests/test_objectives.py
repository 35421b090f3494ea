"""Each objective moves the model the way its feedback asks; each guard trips when it should."""

from __future__ import annotations

import dataclasses
import math
import random
import time

import pytest
import torch
import torch.nn.functional as F

from kaizen.events import Feedback, FeedbackKind, Generation, Sampling
from kaizen.modeling import chat_prompt_ids
from kaizen.registry import PROMOTED, ROLLED_BACK, Registry
from kaizen.sampling import processed_logprobs, token_logprobs
from kaizen.sim.preferences import concise, follow_up, likes_concise, likes_follow_up
from learner import metrics
from learner.config import LearnerConfig
from learner.examples import Answer, Pair, Scored, Shaper, Target, collate
from learner.judge import CommentJudge, labelled_comments
from learner.loop import Learner
from learner.objectives import (
    MAX_LOG_RATIO,
    Forward,
    clipped_weight,
    dpo_loss,
    forward_terms,
    kto_loss,
    processed_response_logprobs,
    reinforce_loss,
    response_logprobs,
    sft_loss,
)
from tests.conftest import policy_logprobs


@pytest.fixture
def config(tiny_model, tmp_path):
    return LearnerConfig(
        model=tiny_model,
        buffer=f"sqlite:///{tmp_path}/buffer.db",
        registry=tmp_path / "registry",
        publish_every=2,
        batch_size=4,
        lr=1e-2,
        metrics_port=-1,
        batch_wait_s=0.0,
        poll_s=0.05,
        gate_holdout=0.0,  # every event trains; the gate's own tests hold some out
        max_user_share=1.0,  # few simulated users; the influence caps have their own test
    )


def sampled(learner: Learner, response_id: str, answer: str, user: str = "u") -> Generation:
    """An answer as the server would log it, sampled at temperature 1 from the learner's
    current weights (so its behaviour log-probabilities are the policy's own)."""
    tok = learner.tokenizer
    messages = [{"role": "user", "content": "Where is Lyon?"}]
    prompt = chat_prompt_ids(tok, messages)
    response = tok.encode(answer, add_special_tokens=False) + [learner.shaper.end_of_turn]
    return Generation(
        response_id=response_id,
        user_id=user,
        request_id="",
        model_version="v0",
        messages=messages,
        prompt_tokens=prompt,
        response_tokens=response,
        behaviour_logprobs=policy_logprobs(learner.model, prompt, response),
        text=answer,
        finish_reason="stop",
        sampling=Sampling(temperature=1.0, seed=1),
        created_at=time.time(),
    )


def logprob(learner: Learner, answer: Answer) -> float:
    return sum(policy_logprobs(learner.model, answer.prompt, answer.response))


def train(learner: Learner, events: list[tuple[Generation, Feedback]], steps: int = 4) -> None:
    for g, _ in events:
        if learner.buffer.generation(g.response_id) is None:
            learner.buffer.append_generation(g)
    learner.buffer.append_feedback([f for _, f in events])
    learner.fill()
    batch = list(learner.pending)
    assert batch, "the objective found nothing to train on"
    for _ in range(steps):
        assert learner.step(batch).ok


def thumb(g: Generation, up: bool, n: int = 0) -> Feedback:
    return Feedback(
        f"t{g.response_id}{n}", g.response_id, g.user_id, FeedbackKind.THUMB, 1 if up else -1
    )


@pytest.mark.parametrize("objective", ["reinforce", "kto"])
@pytest.mark.parametrize("up", [True, False])
def test_thumbs_move_the_answer_up_or_down(config, objective, up):
    learner = Learner(dataclasses.replace(config, objective=objective))
    g = sampled(learner, "r1", "Lyon is in France.")
    before = logprob(learner, Answer.of(g))
    train(learner, [(g, thumb(g, up))])
    after = logprob(learner, Answer.of(g))
    assert (after > before) if up else (after < before)


@pytest.mark.parametrize("objective, gain", [("sft", 1.0), ("joint", 1.0), ("kto", 0.1)])
def test_a_correction_becomes_the_answer_to_imitate(config, objective, gain):
    learner = Learner(dataclasses.replace(config, objective=objective))
    g = sampled(learner, "r1", "Lyon is a city in Germany on the Rhine, famous for cheese.")
    fix = Feedback("c1", "r1", "u", FeedbackKind.CORRECTION, text="Lyon is in France.")
    wanted = learner.shaper.correction(g, fix.text)
    before = logprob(learner, wanted)
    train(learner, [(g, fix)])
    assert logprob(learner, wanted) - before > gain  # kto's sigmoid moves it more gently


def test_dpo_prefers_the_correction_to_the_original(config):
    learner = Learner(dataclasses.replace(config, objective="dpo"))
    g = sampled(learner, "r1", "Lyon is a city in Germany.")
    fix = Feedback("c1", "r1", "u", FeedbackKind.CORRECTION, text="Lyon is in France.")
    wanted, original = learner.shaper.correction(g, fix.text), Answer.of(g)
    margin = logprob(learner, wanted) - logprob(learner, original)
    train(learner, [(g, fix)])
    assert logprob(learner, wanted) - logprob(learner, original) > margin + 1.0


def test_a_regenerated_answer_loses_to_the_liked_one(config):
    learner = Learner(dataclasses.replace(config, objective="dpo"))
    bad = sampled(learner, "r1", "I cannot tell you that.")
    good = sampled(learner, "r2", "Lyon is in France.")
    margin = logprob(learner, Answer.of(good)) - logprob(learner, Answer.of(bad))
    regenerate = Feedback("g1", "r1", "u", FeedbackKind.REGENERATE)
    train(learner, [(bad, regenerate), (good, thumb(good, True))])
    assert logprob(learner, Answer.of(good)) - logprob(learner, Answer.of(bad)) > margin + 1.0


def test_the_joint_feedback_head_learns_to_predict_rewards(config):
    learner = Learner(dataclasses.replace(config, objective="joint"))
    good = sampled(learner, "r1", "Lyon is in France.")
    bad = sampled(learner, "r2", "No idea, sorry, ask someone else please.")

    def predicted() -> list[float]:
        learner.model.eval()
        answers = [Answer.of(good), Answer.of(bad)]
        ids, attention, mask, behaviour, temperature, top_p = collate(
            answers, learner.tokenizer.pad_token_id, learner.device
        )
        with torch.no_grad():
            out = learner.model(input_ids=ids, attention_mask=attention, output_hidden_states=True)
            f = forward_terms(
                out.logits,
                out.logits,
                ids,
                mask,
                behaviour,
                temperature,
                top_p,
                out.hidden_states[-1],
            )
            return learner.head(f.hidden).tolist()

    assert predicted() == [0.0, 0.0]  # the head starts at zero
    train(learner, [(good, thumb(good, True)), (bad, thumb(bad, False))], steps=10)
    up, down = predicted()
    assert up > 0.3 and down < -0.3


def test_the_shaper_makes_targets_pairs_and_scores():
    class Tok:
        def encode(self, text, add_special_tokens=False):
            return [len(w) for w in text.split()]

        def convert_tokens_to_ids(self, token):
            return 99

        unk_token_id = 0
        eos_token_id = 98

    def gen(rid: str, user: str = "u", prompt: str = "hi") -> Generation:
        return Generation(
            rid,
            user,
            "",
            "v0",
            [{"role": "user", "content": prompt}],
            [1, 2],
            [3, 4],
            [-0.5, -0.5],
            "a b",
            "stop",
            Sampling(temperature=0.8),
            0.0,
        )

    shaper = Shaper(Tok(), sft_min_reward=0.5)
    liked = shaper.examples(gen("a"), FeedbackKind.THUMB, 1.0)
    assert [type(e) for e in liked] == [Scored, Target]  # well rated: also a target
    assert [type(e) for e in shaper.examples(gen("b"), FeedbackKind.DWELL, 0.2)] == [Scored]
    fixed = shaper.examples(gen("c"), FeedbackKind.CORRECTION, -0.5, "one three")
    assert [type(e) for e in fixed] == [Scored, Target, Pair]
    assert fixed[1].answer.response == (3, 5, 99) and fixed[1].answer.behaviour is None
    assert fixed[2].chosen == fixed[1].answer and fixed[2].rejected == Answer.of(gen("c"))
    # regenerate, then the same user likes another answer to the same prompt: a pair
    assert [type(e) for e in shaper.examples(gen("d"), FeedbackKind.REGENERATE, -0.5)] == [Scored]
    other_user = shaper.examples(gen("e", user="someone else"), FeedbackKind.THUMB, 1.0)
    assert Pair not in [type(e) for e in other_user]
    read_only = shaper.examples(gen("e2"), FeedbackKind.DWELL, 0.3)  # read, not liked
    assert Pair not in [type(e) for e in read_only]
    pair = shaper.examples(gen("f"), FeedbackKind.COPY, 0.5)[-1]
    assert isinstance(pair, Pair) and pair.rejected == Answer.of(gen("d"))
    assert shaper.regenerated == {}  # used once


def test_importance_ratio_is_one_on_policy_and_clipped_off_policy():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7, requires_grad=True)
    ids = torch.randint(0, 7, (2, 4))
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    behaviour = (response_logprobs(logits / 0.5, ids) * mask).detach()  # sampled at T = 0.5
    t = torch.tensor([0.5, 0.5])
    f = forward_terms(logits, logits.detach(), ids, mask, behaviour, t)
    assert torch.allclose(f.ratio, torch.ones(2), atol=1e-5)
    assert torch.allclose(f.kl, torch.zeros(2), atol=1e-6)
    # logged by a policy that gave these tokens far less mass: ratio ≫ 1 + ε; with a
    # positive advantage the clipped surrogate gives no gradient (PPO's trust region)
    far = forward_terms(logits, logits.detach(), ids, mask, behaviour - 3.0 * mask, t)
    assert (far.ratio > 10).all()
    loss = reinforce_loss(far, torch.tensor([1.0, 1.0]), eps=0.2)
    loss.backward()
    assert float(logits.grad.abs().sum()) == 0.0
    # an unsampled answer (a correction: temperature 0) has ratio 1
    unsampled = forward_terms(logits, logits.detach(), ids, mask, behaviour - 3.0, torch.zeros(2))
    assert torch.equal(unsampled.ratio.detach(), torch.ones(2))


def test_reinforce_surrogate_by_hand():
    """On policy (ratio 1) the loss is −mean(A), and its gradient is −A·∇ mean_t log π."""
    f = Forward(
        logp=torch.zeros(2),
        ref_logp=torch.zeros(2),
        tokens=torch.ones(2),
        kl=torch.zeros(2),
        ratio=torch.ones(2, requires_grad=True),
    )
    loss = reinforce_loss(f, torch.tensor([0.5, -1.5]), eps=0.2)
    assert float(loss.detach()) == pytest.approx(0.5)
    loss.backward()
    assert f.ratio.grad.tolist() == pytest.approx([-0.25, 0.75])


def test_a_nonfinite_gradient_drops_the_step_and_is_counted(config):
    learner = Learner(dataclasses.replace(config, objective="sft"))
    g = sampled(learner, "r1", "Lyon is in France.")
    example = Target(Answer.of(g))
    weights = [p.detach().clone() for p in learner.params]
    hook = learner.params[0].register_hook(lambda grad: grad * float("nan"))
    trips = metrics.GUARD_TRIPS.labels("nonfinite_grad")._value.get()
    result = learner.step([example])
    hook.remove()
    assert not result.ok and result.reason == "nonfinite_grad"
    assert metrics.GUARD_TRIPS.labels("nonfinite_grad")._value.get() == trips + 1
    assert all(torch.equal(a, b) for a, b in zip(weights, learner.params, strict=True))


def test_the_probe_kl_guard_refuses_to_publish_and_restores_the_weights(config):
    strict = Learner(dataclasses.replace(config, objective="sft", max_probe_kl=1e-6))
    g = sampled(strict, "r1", "Lyon is in France.")
    published = [p.detach().clone() for p in strict.params]
    train(strict, [(g, thumb(g, True))])
    strict.train_pending()
    assert strict.probe_kl() > 1e-6
    trips = metrics.GUARD_TRIPS.labels("probe_kl")._value.get()
    assert strict.publish() is None
    assert metrics.GUARD_TRIPS.labels("probe_kl")._value.get() == trips + 1
    registry = Registry(config.registry)
    # recorded for the record as rejected, with the reason: never served, never resumed
    assert registry.versions() == ["v1"] and "probe KL" in registry.rejected("v1")
    assert not registry.servable("v1") and registry.latest_accepted() == "v0"
    assert strict.version == "v0"
    assert strict.probe_kl() == pytest.approx(0.0, abs=1e-6)  # back to the base weights
    assert all(torch.equal(a, b) for a, b in zip(published, strict.params, strict=True))
    assert strict.progress.cursor == 1 and strict.progress.rejected == 1

    # the same training under a loose bound publishes, and says how many were refused
    loose = dataclasses.replace(config, objective="sft", max_probe_kl=10.0)
    strict.config = loose
    g2 = sampled(strict, "r2", "Lyon is in France.")
    train(strict, [(g2, thumb(g2, True))])
    strict.train_pending()
    assert strict.publish() == "v2"
    assert registry.manifest("v2").metadata["rejected_since_last"] == 1
    assert registry.latest_accepted() == registry.latest_servable() == "v2"


def test_an_answer_nobody_reacted_to_gets_the_no_reaction_reward(config, tmp_path):
    rewards = tmp_path / "r.toml"
    rewards.write_text("[implicit]\nno_reaction = -0.2\nno_reaction_window_s = 60\n")
    learner = Learner(dataclasses.replace(config, objective="reinforce", rewards=rewards))
    old = dataclasses.replace(sampled(learner, "old", "Lyon."), created_at=time.time() - 120)
    answered = dataclasses.replace(sampled(learner, "ans", "Lyon!"), created_at=time.time() - 120)
    young = sampled(learner, "young", "Lyon?")
    for g in (old, answered, young):
        learner.buffer.append_generation(g)
    learner.buffer.append_feedback([thumb(answered, True)])
    learner.fill()
    rewards_seen = sorted(ex.reward for ex in learner.pending)
    assert rewards_seen == [-0.2, 1.0]  # the silent old answer, and the thumb; not the young one
    learner.train_pending()
    assert learner.progress.silent_cursor == 2  # young (seq 3) is checked once it is old enough


def test_the_labelled_comments_are_balanced_and_the_judge_scores_in_range(config):
    labelled = labelled_comments()
    assert len(labelled) >= 50
    assert 0.4 < sum(ok for _, ok in labelled) / len(labelled) < 0.6
    learner = Learner(config)
    scores = learner.judge.score([c for c, _ in labelled[:8]] + ["ok"])
    assert all(-1 <= s <= 1 for s in scores)
    assert scores[-1] == pytest.approx(0.0, abs=1e-4)  # centred on a comment that says nothing


@pytest.mark.slow
def test_the_base_model_judges_most_comments_right():
    from kaizen.modeling import DEFAULT_MODEL_DIR, load_model, load_tokenizer

    model = load_model(DEFAULT_MODEL_DIR, torch.device("cpu"), torch.float32)
    judge = CommentJudge(model, load_tokenizer(DEFAULT_MODEL_DIR), torch.device("cpu"))
    assert judge.accuracy(labelled_comments()).accuracy >= 0.7


@pytest.mark.parametrize(
    "preference, likes", [(concise, likes_concise), (follow_up, likes_follow_up)]
)
def test_a_simulated_users_correction_is_an_answer_they_like(preference, likes):
    rng = random.Random(0)
    long_answer = (
        "Sure! Here is a detailed explanation. Lyon is a large city in the east of France, "
        "where the Rhône and the Saône meet. It is known for its food, its old town, and its "
        "silk history, and it has about half a million people in the city itself."
    )
    assert not likes("Where is Lyon?", long_answer)
    fixed = preference.correct("Where is Lyon?", long_answer, rng)
    assert likes("Where is Lyon?", fixed), fixed


def held_out_ids(learner: Learner, n: int, prefix: str) -> list[str]:
    ids = (f"{prefix}{i}" for i in range(10_000))
    return [rid for rid in ids if learner.held_out(rid)][:n]


@pytest.mark.parametrize("taught", ["bad", "good"])
def test_the_replay_gate_refuses_a_candidate_worse_on_held_out_traffic(config, taught):
    learner = Learner(
        dataclasses.replace(
            config,
            objective="sft",
            gate_holdout=0.5,
            gate_min_events=8,
            gate_min_ess=0.0,  # the margin's test; the ESS floor has its own
            max_probe_kl=10.0,
        )
    )
    good, bad = "Lyon is in France.", "Lyon is a kind of cheese."
    events = []
    for i, rid in enumerate(held_out_ids(learner, 16, "h")):  # users like good, not bad
        g = sampled(learner, rid, good if i % 2 else bad, user=f"u{i}")
        events.append((g, thumb(g, up=bool(i % 2))))
    # …but the training slice teaches the other answer
    trained = [rid for rid in (f"t{i}" for i in range(100)) if not learner.held_out(rid)][:4]
    for rid in trained:
        g = sampled(learner, rid, bad if taught == "bad" else good)
        events.append((g, thumb(g, up=True)))
    train(learner, events, steps=6)
    learner.train_pending()
    assert len(learner.heldout) == 16  # the gate's events were kept, not trained on
    trips = metrics.GUARD_TRIPS.labels("replay_gate")._value.get()

    published = learner.publish()
    registry = Registry(config.registry)
    gate = registry.manifest("v1").metadata["gate"]
    assert gate["judged"] and gate["events"] == 16 and gate["last"] == "v0"
    if taught == "bad":
        assert published is None
        assert registry.rejected("v1").startswith("replay gate: snips says")
        assert gate["difference_low"] < -gate["margin"] and gate["difference"] < 0
        assert metrics.GUARD_TRIPS.labels("replay_gate")._value.get() == trips + 1
        assert learner.version == "v0" and registry.latest_servable() == "v0"
    else:
        assert published == "v1" and not registry.rejected("v1")
        assert gate["difference_low"] >= -gate["margin"]


def test_the_replay_gate_abstains_below_its_effective_sample_size_floor(config, caplog):
    """The candidate the gate approves in the test above ("good"), judged with a floor on
    the weights' ESS above what its 16 held-out events give: it abstains, says why, logs
    it and counts it; with the floor just below, the same candidate is approved."""
    learner = Learner(
        dataclasses.replace(
            config, objective="sft", gate_holdout=0.5, gate_min_events=8, max_probe_kl=10.0
        )
    )
    good, bad = "Lyon is in France.", "Lyon is a kind of cheese."
    events = []
    for i, rid in enumerate(held_out_ids(learner, 16, "h")):
        g = sampled(learner, rid, good if i % 2 else bad, user=f"u{i}")
        events.append((g, thumb(g, up=bool(i % 2))))
    trained = [rid for rid in (f"t{i}" for i in range(100)) if not learner.held_out(rid)][:4]
    for rid in trained:
        g = sampled(learner, rid, good)
        events.append((g, thumb(g, up=True)))
    train(learner, events, steps=6)
    learner.train_pending()

    learner.config = dataclasses.replace(learner.config, gate_min_ess=0.0)
    free = learner.gate()
    assert free["judged"] and "refused" not in free  # approved without a floor
    ess = min(free["candidate_ess"], free["last_ess"])
    assert ess < 16  # the candidate moved: the weights are not all 1

    learner.config = dataclasses.replace(learner.config, gate_min_ess=ess + 0.5)
    candidate = [p.detach().clone() for p in learner.params]
    trips = metrics.GUARD_TRIPS.labels("replay_gate")._value.get()
    with caplog.at_level("WARNING", logger="learner.loop"):
        assert learner.publish() is None
    registry = Registry(config.registry)
    reason = registry.rejected("v1")
    assert reason.startswith("replay gate abstains")
    assert f"effective sample size is {ess:.1f} of 16" in reason
    assert f"--gate-min-ess {ess + 0.5:g}" in reason
    assert any("replay gate abstains" in r.getMessage() for r in caplog.records)
    gate = registry.manifest("v1").metadata["gate"]
    assert gate["abstained"] and gate["min_ess"] == ess + 0.5
    assert gate["difference_low"] >= -gate["margin"]  # the bound alone would have approved
    assert metrics.GUARD_TRIPS.labels("replay_gate")._value.get() == trips + 1
    assert learner.version == "v0" and registry.latest_servable() == "v0"

    def the_candidate() -> None:
        with torch.no_grad():
            for p, value in zip(learner.params, candidate, strict=True):
                p.copy_(value)

    # the same candidate with the floor just below its ESS: approved
    the_candidate()
    floor = learner.config
    learner.config = dataclasses.replace(floor, gate_min_ess=ess - 0.5)
    gate = learner.gate()
    assert "abstained" not in gate and "refused" not in gate
    assert min(gate["candidate_ess"], gate["last_ess"]) == ess

    # the servers run a canary (their rollout authority records it): an abstaining gate
    # defers to the live test, unless told to reject; without a canary it refuses (above)
    registry.record_policy({"canary_share": 0.1, "alpha": 0.05})
    learner.config = dataclasses.replace(floor, gate_abstain="reject")
    the_candidate()
    assert learner.publish() is None and registry.rejected("v2").startswith("replay gate abst")
    learner.config = floor
    the_candidate()
    with caplog.at_level("WARNING", logger="learner.loop"):
        assert learner.publish() == "v3"
    gate = registry.manifest("v3").metadata["gate"]
    assert gate["abstained"] and gate["deferred"] == "to the servers' canary (share 0.1)"
    assert not registry.rejected("v3") and registry.latest_servable() == "v3"
    assert any("deferring to the servers' canary" in r.getMessage() for r in caplog.records)


def test_the_replay_gate_compares_with_what_servers_serve(config):
    learner = Learner(
        dataclasses.replace(
            config,
            objective="sft",
            gate_holdout=0.5,
            gate_min_events=8,
            gate_min_ess=0.0,  # the margin's test; the ESS floor has its own
            max_probe_kl=10.0,
        )
    )
    good, bad = "Lyon is in France.", "Lyon is a kind of cheese."
    events = []
    for i, rid in enumerate(held_out_ids(learner, 8, "h")):  # users like good, not bad
        g = sampled(learner, rid, good if i % 2 else bad, user=f"u{i}")
        events.append((g, thumb(g, up=bool(i % 2))))
    trained = [rid for rid in (f"t{i}" for i in range(100)) if not learner.held_out(rid)]
    for rid in trained[:2]:  # two accepted versions, each further towards the good answer
        g = sampled(learner, rid, good)
        train(learner, [*events, (g, thumb(g, up=True))], steps=3)
        events = []
        learner.train_pending()
        learner.publish()
    assert learner.version == "v2"
    registry = Registry(config.registry)

    # no canary: servers serve the learner's newest version, which these weights are
    assert learner.gate_against() == "v2" and learner.gate()["difference"] == 0
    mine = [p.detach().clone() for p in learner.params]

    registry.record_rollout("v1", PROMOTED, "canary promoted")  # a server serves v1 now
    gate = learner.gate()
    assert gate["last"] == "v1" and gate["difference"] != 0  # v1's weights, from the registry
    assert all(torch.equal(a, b) for a, b in zip(mine, learner.params, strict=True))

    registry.record_rollout("v1", ROLLED_BACK, "operator rollback")  # back to v0
    assert learner.gate_against() == "v0" and learner.gate()["last"] == "v0"
    assert all(torch.equal(a, b) for a, b in zip(mine, learner.params, strict=True))


# -- off-policy honesty: the ratio scores the distribution the server sampled from ---------


def sample_answers(model, prompt: list[int], rows: list[Sampling], steps: int):
    """Answers drawn token by token with the server's own sampler (`sample_rows`), one per
    row of `rows`, each with its own seeded generator: (responses, logged log μ)."""
    from server.engine import sample_rows

    generators = [torch.Generator().manual_seed(i + 1) for i in range(len(rows))]
    ids = torch.tensor([prompt] * len(rows))
    logged = []
    with torch.no_grad():
        for _ in range(steps):
            tokens, logprobs = sample_rows(model(input_ids=ids).logits[:, -1], rows, generators)
            ids = torch.cat([ids, torch.tensor(tokens)[:, None]], dim=1)
            logged.append(logprobs)
    return ids[:, len(prompt) :].tolist(), torch.tensor(logged).T.tolist()


def test_nucleus_answers_are_rescored_to_the_log_probabilities_the_sampler_logged(config):
    """Issue 19: sampled with top_p = 0.8 at T = 0.7, re-scored by the learner's code path,
    every token's logged log μ comes back; the full tempered softmax would not give it."""
    learner = Learner(config)
    model = learner.model.eval()
    prompt = chat_prompt_ids(learner.tokenizer, [{"role": "user", "content": "Where is Lyon?"}])
    rows = [Sampling(temperature=0.7, top_p=0.8)] * 3 + [Sampling(temperature=1.3, top_p=0.5)]
    responses, logged = sample_answers(model, prompt, rows, steps=12)
    answers = [
        Answer.of(
            Generation(f"r{i}", "u", "", "v0", [], prompt, response, mu, "", "length", s, 0.0)
        )
        for i, (response, mu, s) in enumerate(zip(responses, logged, rows, strict=True))
    ]
    assert [a.top_p for a in answers] == pytest.approx([0.8, 0.8, 0.8, 0.5])
    ids, attention, mask, behaviour, temperature, top_p = collate(
        answers, learner.tokenizer.pad_token_id, learner.device
    )
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits
    rescored = processed_response_logprobs(logits, ids, mask, temperature, top_p)
    on = mask.bool()
    assert torch.allclose(rescored[on], behaviour[on], atol=1e-5)
    f = forward_terms(logits, logits, ids, mask, behaviour, temperature, top_p)
    assert torch.allclose(f.ratio, torch.ones(4), atol=1e-5)  # the logging policy: s = 1
    # the old scoring, the full softmax at the answer's temperature, is off by the
    # nucleus's mass on every token: its ratio was biased low however on-policy
    full = response_logprobs(logits / temperature[:, None, None], ids)
    assert ((full[on] - behaviour[on]).abs() > 0.05).all()
    old = forward_terms(logits, logits, ids, mask, behaviour, temperature)  # top_p ignored
    assert (old.ratio < 0.95).all()


def test_the_processed_distribution_is_the_samplers_own_ties_included():
    """Every token the sampler draws, across rows of tied logits at the nucleus boundary,
    has the log-probability `kaizen.sampling` gives it, and nothing outside its nucleus."""
    from server.engine import sample_rows

    torch.manual_seed(0)
    logits = torch.randn(4, 40)
    logits[:, :8] = 3.0  # eight tied top tokens: the sort's order picks who is cut
    rows = [
        Sampling(temperature=0.7, top_p=0.8),
        Sampling(temperature=1.0, top_p=0.3),
        Sampling(temperature=0.5, top_p=1.0),
        Sampling(temperature=1.3, top_p=0.95),
    ]
    t = torch.tensor([s.temperature for s in rows])
    p = torch.tensor([s.top_p for s in rows])
    full = processed_logprobs(logits, t, p)
    assert torch.allclose(full.exp().sum(-1), torch.ones(4), atol=1e-5)
    assert full[1].isfinite().sum() < 8  # the tie is cut through
    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    seen = set()
    for _ in range(200):
        tokens, logprobs = sample_rows(logits, rows, generators)
        got = token_logprobs(logits, torch.tensor(tokens), t, p)
        assert got.tolist() == pytest.approx(logprobs, abs=1e-6)
        assert full.gather(-1, torch.tensor(tokens)[:, None])[:, 0].tolist() == pytest.approx(
            logprobs, abs=1e-6
        )
        seen |= {(i, tok) for i, tok in enumerate(tokens)}
    assert {(i, tok) for i, tok in seen if not full[i, tok].isfinite()} == set()
    assert len({tok for i, tok in seen if i == 1}) == int(full[1].isfinite().sum())


def test_the_sampler_draws_each_token_as_often_as_its_probability():
    """The inverse-CDF draw lands on each token in proportion to q, never on a token q
    drops, for a sampled row and a nucleus row (an off-by-one in the search would shift
    every count by one token)."""
    from server.engine import sample_rows

    logits = torch.tensor([[2.0, -1.0, 0.5, 1.5, -3.0, 0.0]] * 2)
    rows = [Sampling(temperature=1.0, top_p=1.0), Sampling(temperature=0.8, top_p=0.7)]
    t = torch.tensor([s.temperature for s in rows])
    p = torch.tensor([s.top_p for s in rows])
    q = processed_logprobs(logits, t, p).exp()
    n = 1000
    counts = torch.zeros(2, 6)
    for k in range(20):
        batch = [rows[i % 2] for i in range(n)]
        generators = [torch.Generator().manual_seed(k * n + i + 1) for i in range(n)]
        tokens, _ = sample_rows(logits[[i % 2 for i in range(n)]], batch, generators)
        for i, tok in enumerate(tokens):
            counts[i % 2, tok] += 1
    total = counts.sum(-1, keepdim=True)  # 10,000 draws a row
    sd = (q * (1 - q) / total).sqrt()
    assert ((counts / total - q).abs() <= 5 * sd + 1e-9).all(), (counts / total, q)
    assert (counts[q == 0] == 0).all() and (q[1] == 0).any()


def test_the_processed_log_probability_is_differentiable_on_the_kept_tokens():
    logits = torch.randn(3, 5, 16, requires_grad=True)
    tokens = logits.detach().argmax(-1)  # the most likely token is always kept
    t, p = torch.tensor([0.7, 1.0, 0.0]), torch.tensor([0.6, 0.9, 0.5])  # row 2: greedy, no cut
    token_logprobs(logits, tokens, t, p).sum().backward()
    by_token = logits.grad.clone()
    logits.grad = None
    full = processed_logprobs(logits, t, p)
    full.gather(-1, tokens[..., None]).sum().backward()
    assert torch.allclose(by_token, logits.grad, atol=1e-6)
    dropped = ~full.isfinite()
    assert dropped[:2].any() and (by_token[dropped] == 0).all()  # the cut is not learned through
    assert not dropped[2].any()  # greedy rows get the plain softmax at temperature 1


def test_a_token_outside_the_policys_nucleus_weighs_one_minus_eps_and_the_loss_is_finite():
    """q = 0 for a logged token the current nucleus drops: s ≈ 0, weight 1 − ε, every loss
    finite with finite gradients; the other answer keeps its on-policy ratio of 1."""
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    logits[:, :, 0] = -8.0  # token 0 is far out of any nucleus of mass 0.5
    logits.requires_grad_(True)
    ids = F.pad(logits.detach()[:, :-1].argmax(-1), (1, 0))  # the likeliest: always kept
    ids[0, 2] = 0  # but row 0 logged token 0 at t = 2
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1]])
    t, p = torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        behaviour = processed_response_logprobs(logits, ids, mask, t, p)
    assert torch.isinf(behaviour[0, 2]) and torch.isfinite(behaviour[1]).all()
    behaviour[0, 2] = -9.0  # an older policy, whose nucleus still held it, sampled it
    f = forward_terms(logits, logits.detach(), ids, mask, behaviour, t, p)
    assert torch.isfinite(f.ratio).all()
    ratio = f.ratio.detach()
    assert float(ratio[0]) == pytest.approx(math.exp(-MAX_LOG_RATIO))
    assert float(ratio[1]) == pytest.approx(1.0, abs=1e-5)
    eps = 0.2
    assert clipped_weight(f.ratio, eps).tolist() == pytest.approx([1 - eps, 1.0])
    losses = {
        "reinforce": reinforce_loss(f, torch.tensor([1.0, -1.0]), eps),
        "kto": kto_loss(f, torch.tensor([True, False]), eps, 0.1),
        "sft": sft_loss(f, eps),
        "dpo": dpo_loss(_row(f, 0), _row(f, 1), eps, 0.1),
    }
    for name, loss in losses.items():
        assert torch.isfinite(loss), name
        (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
        assert torch.isfinite(grad).all(), name
    # reinforce: an answer the policy cannot produce gives no policy gradient (PPO's clip)
    alone = reinforce_loss(_row(f, 0), torch.tensor([1.0]), eps)
    (grad,) = torch.autograd.grad(alone, logits)
    assert float(grad.abs().sum()) == 0.0


def _row(f: Forward, i: int) -> Forward:
    parts = (getattr(f, field.name) for field in dataclasses.fields(f))
    return Forward(*(None if x is None else x[i : i + 1] for x in parts))
