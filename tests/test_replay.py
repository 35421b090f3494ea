"""`kaizen replay`: offline evaluation of versions on logged traffic, and the export."""

from __future__ import annotations

import json

import pytest

from kaizen.cli import main
from kaizen.v1 import feedback_pb2
from learner.config import ReplayEvaluateConfig
from learner.replay import EXPORT_SCHEMA, evaluate, report_png, table
from tests.conftest import ask, publish_random_adapter, wait_until

PROMPTS = ["What is the capital of France?", "Name a colour.", "How do birds fly?"]


@pytest.fixture
def logged(server, stubs, registry, tiny_model, serve_config):
    """24 sampled answers from v0 with thumbs (and a correction, a dwell), then v1."""
    answers = []
    for i in range(24):
        a = stubs.chat.Generate(
            ask(PROMPTS[i % 3], max_new_tokens=8, temperature=0.8, seed=i + 1, user_id=f"u{i}")
        )
        answers.append(a)
        stubs.feedback.SubmitFeedback(
            feedback_pb2.Feedback(
                event_id=f"t{i}",
                response_id=a.response_id,
                user_id=f"u{i}",
                thumb=feedback_pb2.THUMB_UP if i % 3 == 0 else feedback_pb2.THUMB_DOWN,
            )
        )
    stubs.feedback.SubmitFeedback(
        feedback_pb2.Feedback(
            event_id="c1", response_id=answers[1].response_id, user_id="u1", correction="Blue."
        )
    )
    stubs.feedback.SubmitFeedback(
        feedback_pb2.Feedback(
            event_id="d1", response_id=answers[2].response_id, user_id="u2", dwell_ms=5000
        )
    )
    v1 = publish_random_adapter(registry, tiny_model, seed=3)
    wait_until(lambda: registry.rollout(v1) is not None, what="the server promoting v1")
    return answers, v1


def replay_config(serve_config, tiny_model, **changes) -> ReplayEvaluateConfig:
    values = dict(
        candidate="v1",
        against="v0",
        model=tiny_model,
        buffer=serve_config.buffer,
        registry=serve_config.registry,
        dtype="fp32",  # as the test server logged them: the base's own answers weigh 1
        resamples=200,
    )
    return ReplayEvaluateConfig(**{**values, **changes})


def test_replay_evaluates_a_candidate_against_the_version_that_logged_the_traffic(
    logged, serve_config, tiny_model, tmp_path
):
    answers, v1 = logged
    result = evaluate(replay_config(serve_config, tiny_model))
    assert result["answers"] == 24 and result["logged_by"] == {"v0": 24}
    base, candidate = result["versions"]["v0"], result["versions"][v1]

    # v0 logged every answer: its weights are 1, so every estimate is the logged mean
    assert base["effective_sample_size"] == pytest.approx(24, rel=1e-3)
    for name in ("ips", "snips"):
        assert base["estimates"][name]["value"] == pytest.approx(
            result["logged_mean_reward"], abs=2e-3
        )
    assert base["kl_to_reference"] == pytest.approx(0, abs=1e-6)
    assert base["perplexity_change_pct"] == pytest.approx(0, abs=1e-6)

    # a random adapter moved away from the logging policy: fewer answers carry its estimate
    assert candidate["effective_sample_size"] < 0.9 * base["effective_sample_size"]
    assert candidate["kl_to_reference"] > 0.01
    for row in (base, candidate):
        for e in row["estimates"].values():
            assert e["low"] <= e["value"] <= e["high"]
        assert set(row["estimates"]) == {"ips", "snips", "dr", "dm"}
        assert 0 <= row["preference_accuracy"] <= 1
    assert result["preference_pairs"] >= 1  # the correction, at least

    text = table(result)
    assert "SNIPS [95 % CI]" in text and "effective sample size" in text and v1 in text
    png = tmp_path / "report.png"
    report_png(result, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replay_evaluate_on_the_command_line(logged, serve_config, tiny_model, capsys):
    common = ["--model", str(tiny_model), "--buffer", serve_config.buffer]
    common += ["--registry", str(serve_config.registry), "--dtype", "fp32"]
    argv = ["replay", "evaluate", *common, "--direct-method", "none", "--resamples", "50"]
    assert main([*argv, "--candidate", "v0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["against"] == "v1"  # by default, the version the server promoted
    assert set(result["versions"]) == {"v0", "v1"}
    assert set(result["versions"]["v1"]["estimates"]) == {"ips", "snips"}  # no DR asked
    sequence_ess = result["versions"]["v1"]["effective_sample_size"]

    # every version, each scored once, ranked; per-token weights do not collapse
    assert main([*argv, "--candidate", "all", "--weights", "token-mean", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["candidates"] == ["v0", "v1"] and sorted(result["ranking"]) == ["v0", "v1"]
    snips = {v: row["estimates"]["snips"]["value"] for v, row in result["versions"].items()}
    assert snips[result["ranking"][0]] >= snips[result["ranking"][1]]
    assert result["versions"]["v0"]["effective_sample_size"] == pytest.approx(24, rel=1e-3)
    assert result["versions"]["v1"]["effective_sample_size"] > sequence_ess

    assert main([*argv, "--candidate", "v0,v7"]) == 2
    assert "--candidate: v7 is not in" in capsys.readouterr().err
    assert main([*argv, "--candidate", "all", "--rank-by", "dr"]) == 2
    assert "--rank-by dr: needs --direct-method ridge" in capsys.readouterr().err
    missing = ["--buffer", f"sqlite:///{serve_config.registry}/nothing.db"]
    assert main([*argv, "--candidate", "v1", *missing]) == 2
    assert "--buffer:" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_replay_export_joins_answers_and_feedback(logged, serve_config, tmp_path, capsys, fmt):
    answers, _ = logged
    out = tmp_path / f"log.{fmt}"
    argv = ["replay", "export", "--buffer", serve_config.buffer, "--out", str(out)]
    assert main([*argv, "--format", fmt]) == 0
    assert "24 answers" in capsys.readouterr().out
    if fmt == "jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(out).to_pylist()
    assert len(rows) == 24 and set(rows[0]) == set(EXPORT_SCHEMA)
    by_id = {r["response_id"]: r for r in rows}
    corrected = by_id[answers[1].response_id]
    kinds = [e["kind"] for e in json.loads(corrected["feedback"])]
    assert kinds == ["thumb", "correction"]
    assert corrected["reward"] == pytest.approx((-1.0 - 0.5) / 2)  # thumb down, correction
    liked = by_id[answers[0].response_id]
    assert liked["reward"] == 1.0 and liked["behaviour_logprob"] < 0
    assert json.loads(liked["messages"])[0]["content"] == PROMPTS[0]


def test_a_nucleus_answer_the_server_logged_is_rescored_to_its_logged_log_probabilities(
    server, stubs, serve_config, tiny_model
):
    """Issue 19, end to end: answers the server samples at T = 0.7, top_p = 0.8 are
    re-scored by the learner's code path (the replay scorer's, the training ratio's) to
    the log μ the server logged for every token; the full tempered softmax is not."""
    import torch

    from kaizen import modeling
    from kaizen.buffer import open_buffer
    from learner.examples import Answer, collate
    from learner.objectives import processed_response_logprobs, response_logprobs

    response_ids = []
    for seed in (1, 2, 3):
        request = ask(PROMPTS[seed % 3], max_new_tokens=16, temperature=0.7, seed=seed)
        request.sampling.top_p = 0.8
        request.sampling.ignore_eos = True  # 16 tokens each
        response_ids.append(stubs.chat.Generate(request).response_id)
    buffer = open_buffer(serve_config.buffer, must_exist=True)
    try:
        generations = [buffer.generation(rid) for rid in response_ids]
    finally:
        buffer.close()
    answers = [Answer.of(g) for g in generations]
    assert all(a.behaviour is not None and len(a.response) == 16 for a in answers)
    assert [a.top_p for a in answers] == pytest.approx([0.8] * 3)

    model = modeling.load_model(tiny_model, torch.device("cpu"), torch.float32).eval()
    tokenizer = modeling.load_tokenizer(tiny_model)
    ids, attention, mask, behaviour, temperature, top_p = collate(
        answers, tokenizer.pad_token_id, torch.device("cpu")
    )
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits
    on = mask.bool()
    rescored = processed_response_logprobs(logits, ids, mask, temperature, top_p)
    assert torch.allclose(rescored[on], behaviour[on], atol=1e-5)
    full = response_logprobs(logits / temperature[:, None, None], ids)
    assert ((full[on] - behaviour[on]).abs() > 0.05).all()
