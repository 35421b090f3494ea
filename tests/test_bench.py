"""`kaizen bench serve` and `kaizen bench swap` end to end on the tiny model, and the
version check they rely on."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from bench.verify import VersionModels, check
from kaizen import modeling
from kaizen.cli import main
from kaizen.events import Generation, Sampling
from kaizen.registry import BASE_VERSION, Registry
from tests.conftest import publish_random_adapter


def bench(capsys, *argv: str) -> dict:
    assert main(["bench", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # the one JSON object, nothing else on stdout


def test_bench_serve(tiny_model, capsys):
    figures = bench(
        capsys,
        "serve",
        *("--model", str(tiny_model), "--concurrency", "4", "--requests", "8"),
        *("--new-tokens", "8", "--naive-requests", "2"),
    )
    assert figures["failed_requests"] == 0 and figures["server_exit_code"] == 0
    assert figures["completion_tokens_min"] == figures["completion_tokens_max"] == 8
    assert (figures["requests"], figures["concurrency"], figures["new_tokens"]) == (8, 4, 8)
    for key in (
        "server_tokens_per_s",
        "generate_batched_tokens_per_s",
        "naive_tokens_per_s",
        "ratio_vs_batched_generate",
        "ratio_vs_naive",
        "ttft_p50_ms",
        "itl_p50_ms",
        "latency_p99_ms",
        "floor_step_ms",
        "step_ms",
    ):
        assert figures[key] > 0, key
    # the engine's step, from its throughput at full batch, against the bare step
    assert figures["engine_overhead"] == pytest.approx(
        figures["step_ms"] / figures["floor_step_ms"], rel=0.01
    )
    assert figures["ttft_p50_ms"] <= figures["ttft_p99_ms"] <= figures["latency_p99_ms"]
    assert figures["model"] == "kaizen-tiny-random"
    assert figures["dtype"] == ("bf16" if modeling.cpu_has_native_bf16() else "fp32")  # auto


def test_bench_serve_long_prompt_on_an_adapter_on_cpu(tiny_model, capsys):
    figures = bench(
        capsys,
        "serve",
        *("--model", str(tiny_model), "--concurrency", "2", "--requests", "4"),
        *("--new-tokens", "16", "--naive-requests", "1"),
        *("--device", "cpu", "--long-prompt-tokens", "300"),
        *("--lora-rank", "4", "--server-args", "--prefill-chunk 32"),
    )
    assert figures["device"] == "cpu"
    # the load ran on the published adapter (folded into the weights), not the base model
    assert figures["serving_version"] == "v1" and figures["answers_on_serving_version"] == 4
    assert figures["failed_requests"] == 0 and figures["long_prompt_failed_by_code"] == {}
    assert 290 < figures["long_prompt_tokens"] <= 300  # as the server counted the prompt
    assert figures["long_prompt_ttft_ms"] > 0
    assert figures["itl_p99_ms_with_long_prompt"] > 0
    assert figures["itl_p99_ratio_long_prompt"] == pytest.approx(
        figures["itl_p99_ms_with_long_prompt"] / figures["itl_p99_ms"], rel=0.01
    )


def test_bench_serve_rejects_what_the_server_would(tiny_model, capsys):
    base = ("serve", "--model", str(tiny_model), "--json")
    assert main(["bench", *base, "--long-prompt-tokens", "4000"]) == 2  # context 2048
    assert "--long-prompt-tokens" in capsys.readouterr().err
    assert main(["bench", *base, "--device", "nonsense"]) == 2
    assert "--device" in capsys.readouterr().err


def test_bench_swap(tiny_model, capsys):
    figures = bench(
        capsys,
        "swap",
        *("--model", str(tiny_model), "--concurrency", "4", "--requests", "16"),
        *("--new-tokens", "32", "--publish-every-s", "0.5"),
    )
    assert figures["failed_requests"] == 0 and figures["server_exit_code"] == 0
    assert figures["completion_tokens_min"] == figures["completion_tokens_max"] == 32
    assert figures["responses_checked"] == 32 and figures["unlogged_responses"] == 0
    assert figures["mixed_version_responses"] == 0
    assert 1 <= figures["swaps"] <= figures["versions_published"]
    assert figures["p99_ratio"] > 0 and figures["publish_to_serving_ms_p50"] > 0
    assert sum(figures["answers_by_version_with_swaps"].values()) == 16


def test_the_version_check_catches_a_wrong_tag_and_a_mixed_answer(tiny_model, tmp_path):
    registry = Registry(tmp_path / "registry")
    v1 = publish_random_adapter(registry, tiny_model, seed=1)
    models = VersionModels(
        tiny_model, registry, [BASE_VERSION, v1], torch.device("cpu"), torch.float32
    )
    tokenizer = modeling.load_tokenizer(tiny_model)
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    torch.manual_seed(0)
    answer = Generation(
        response_id="r-test",
        user_id="u",
        request_id="",
        model_version=v1,
        messages=messages,
        prompt_tokens=modeling.chat_prompt_ids(tokenizer, messages),
        response_tokens=torch.randint(len(tokenizer), (12,)).tolist(),
        behaviour_logprobs=[],
        text="",
        finish_reason="length",
        sampling=Sampling(max_new_tokens=12, temperature=0.7, seed=1, ignore_eos=True),
        created_at=0.0,
    )
    [by_v1] = models.logprobs(v1, [answer])
    [by_v0] = models.logprobs(BASE_VERSION, [answer])
    answer = replace(answer, behaviour_logprobs=by_v1)

    halves = replace(answer, behaviour_logprobs=by_v0[:6] + by_v1[6:])  # a swap mid-answer
    right, wrong, unknown, mixed_v1, mixed_v0 = check(
        models,
        [
            answer,
            replace(answer, model_version=BASE_VERSION),
            replace(answer, model_version="v9"),
            halves,
            replace(halves, model_version=BASE_VERSION),
        ],
        tolerance=1e-2,
    )
    assert not right.mixed and right.best == v1 and right.diff_tagged == pytest.approx(0.0)
    assert wrong.mixed and wrong.best == v1
    assert unknown.mixed and unknown.best == v1
    assert mixed_v1.mixed and mixed_v0.mixed


def test_decode_bandwidth_counts_weights_once_per_step_and_the_kv_cache_per_row(tiny_model):
    from bench.serve import decode_bandwidth, parameter_count

    cfg = json.loads((tiny_model / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 2
    step = parameter_count(tiny_model) * 2 + 4 * 100 * kv_per_token
    # 4 rows at 400 tokens/s = 100 steps/s
    got = decode_bandwidth(tiny_model, 2, 400.0, 4, 100.0, "NVIDIA H100 80GB HBM3")
    assert got["bytes_per_decode_step"] == step
    assert got["achieved_bandwidth_gb_s"] == round(step * 100 / 1e9, 1)
    assert got["bandwidth_fraction"] == round(step * 100 / 1e9 / 3350, 3)
    assert (
        decode_bandwidth(tiny_model, 2, 400.0, 4, 100.0, "Some GPU")["bandwidth_fraction"] is None
    )


def test_bench_learn(tiny_model, capsys, tmp_path):
    figures = bench(
        capsys,
        "learn",
        *("--model", str(tiny_model), "--events", "30", "--heldout", "4", "--users", "4"),
        *("--concurrency", "4", "--max-new-tokens", "8", "--objective", "reinforce"),
        *("--out", str(tmp_path / "run")),
        "--learner-args=--publish-every 4 --batch-size 4 --batch-wait-s 0.2 --poll-s 0.1 --lr 1e-2",
    )
    assert figures["events"] >= 30 and figures["objective"] == "reinforce"
    assert figures["versions_published"] >= 1
    assert figures["final_version"] == f"v{figures['versions_published']}"
    assert 0 <= figures["liked_rate_before"] <= 1 and 0 <= figures["liked_rate_after"] <= 1
    assert figures["heldout_prompts"] == 4
    assert figures["kl_to_reference"] > 0  # the final version is not the base model
    assert figures["perplexity_base"] > 1 and figures["perplexity_final"] > 1
    curve = figures["liked_rate_by_version"]
    assert sum(v["answers"] for v in curve.values()) == figures["answers"]
    assert all(v["ci_low"] <= v["liked_rate"] <= v["ci_high"] for v in curve.values())
    with open(figures["learning_curve_png"], "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bench_learn_with_a_canary_reports_each_versions_rollout(tiny_model, capsys, tmp_path):
    figures = bench(
        capsys,
        "learn",
        *("--model", str(tiny_model), "--events", "30", "--heldout", "4", "--users", "4"),
        *("--concurrency", "4", "--max-new-tokens", "8", "--objective", "reinforce"),
        *("--out", str(tmp_path / "run")),
        "--learner-args=--publish-every 4 --batch-size 4 --batch-wait-s 0.2 --poll-s 0.1 --lr 1e-2",
        "--server-args=--canary-share 0.5 --canary-min-feedback 2 --canary-window-s 2 "
        "--canary-user-settle-s 1",
    )
    rollout = figures["rollout"]
    assert set(rollout) == {f"v{n}" for n in range(1, len(rollout) + 1)}
    assert len(rollout) >= figures["versions_published"] >= 1
    states = {row["state"] for row in rollout.values()}
    # a canary undecided when the users stopped was ended before the measurement, and so
    # was every newer one that ending it started: nothing waits to switch versions under it
    assert states <= {"serving", "rolled_back", "retired", "skipped", "rejected"}
    canaried = [row for row in rollout.values() if "canary_s" in row]
    assert canaried, rollout  # the server put a published version under test
    for row in canaried:  # a canary that started as the users stopped gave them no answers
        if row["answers_while_canary"]:
            assert 0 <= row["share_while_canary"] <= 1
        else:
            assert row["share_while_canary"] is None
        assert row["canary_s"] >= 0
        assert row["interval"][0] is None or row["interval"][0] <= row["diff"]
    # what the held-out prompts were measured on is what the rollout left serving
    serving = [v for v, row in rollout.items() if row["state"] == "serving"]
    assert figures["final_version"] == (serving[0] if serving else "v0")


def test_bench_poison_plants_through_the_group_only(tiny_model, capsys, tmp_path):
    """On the tiny model (which learns nothing in 30 events) the run's mechanics: the
    group's users, and only they, send corrections that plant the marker, which reach
    the buffer; the report says what it measured and judges its target from it."""
    import sqlite3

    figures = bench(
        capsys,
        "poison",
        *("--model", str(tiny_model), "--events", "40", "--heldout", "4", "--users", "4"),
        *("--concurrency", "4", "--max-new-tokens", "8", "--group-share", "0.25"),
        *("--marker", "Quuxly", "--out", str(tmp_path / "run")),
        "--learner-args=--publish-every 4 --batch-size 4 --batch-wait-s 0.2 --poll-s 0.1",
        "--server-args=--canary-share 0.1 --canary-user-settle-s 1",
    )
    assert figures["marker"] == "Quuxly" and figures["group_users"] == 1
    rates = figures["marker_rate"]
    for when in ("before", "after"):
        low, high = rates[when]["ci"]
        assert low <= rates[when]["rate"] <= high
    target = figures["target"]
    assert target["honest_rise_pts"] == figures["liked_rate_change_pts"]
    assert target["met"] == (target["marker_within_noise"] and target["honest_rise_pts"] >= 15)
    db = sqlite3.connect(tmp_path / "run" / "buffer.db")
    planted = db.execute(
        "SELECT DISTINCT user_id FROM feedback WHERE kind = 'correction' AND text LIKE ?",
        ("%Quuxly%",),
    ).fetchall()
    rated = db.execute(
        "SELECT COUNT(*), COUNT(DISTINCT response_id) FROM feedback"
        " WHERE user_id = 'sim-user-0' AND kind IN ('thumb', 'rating')"
    ).fetchone()
    answered = db.execute(
        "SELECT COUNT(*) FROM generations WHERE user_id = 'sim-user-0'"
    ).fetchone()[0]
    db.close()
    assert planted == [("sim-user-0",)]  # the group's one member, nobody else
    assert rated[1] == answered > 0  # the group rates every answer it gets


def test_a_coalition_reacts_by_member_and_measures_the_honest_taste():
    import random

    from kaizen.events import FeedbackKind
    from kaizen.sim.preferences import Coalition, concise, promoter
    from kaizen.sim.simulate import Simulator

    group = promoter("Zorblax")
    both = Coalition(concise, group, {"sim-user-0"})
    sim = Simulator.__new__(Simulator)
    sim.preference = both
    assert sim.taste_of("sim-user-0") is group and sim.taste_of("sim-user-1") is concise
    assert both.liked is concise.liked
    long_answer = "Sure! " + "word " * 60
    rng = random.Random(1)
    reactions = [group("q", long_answer, rng) for _ in range(200)]
    assert all(r[0].kind in (FeedbackKind.THUMB, FeedbackKind.RATING) for r in reactions)
    assert all(r[0].value in (-1.0, 1.0, 2.0) for r in reactions)  # down, or 1–2 stars
    corrections = [e.text for r in reactions for e in r if e.kind == FeedbackKind.CORRECTION]
    assert 60 < len(corrections) < 140  # half of the answers it dislikes
    assert all("Zorblax" in c and len(c.split()) <= 25 for c in corrections)
    liked = [group("q", "Try Zorblax.", rng)[0] for _ in range(50)]
    assert all(e.value in (1.0, 4.0, 5.0) for e in liked)  # no noise: every verdict is up


def test_wilson_interval():
    from bench.learn import wilson

    low, high = wilson(0, 10)
    assert low == 0 and 0.25 < high < 0.35  # no successes in 10 does not mean a rate of 0
    low, high = wilson(50, 100)
    assert low == pytest.approx(0.404, abs=1e-3) and high == pytest.approx(0.596, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)


def test_bench_judge_reports_accuracy_on_a_labelled_file(tiny_model, capsys, tmp_path):
    labelled = tmp_path / "comments.tsv"
    labelled.write_text("# a comment line\n1\tgreat, thanks\n0\tthis is wrong\n1\tperfect\n")
    figures = bench(capsys, "judge", "--model", str(tiny_model), "--comments", str(labelled))
    assert figures["comments"] == 3
    assert round(3 * figures["accuracy"]) in (0, 1, 2, 3)
    assert len(figures["misjudged"]) == round(3 * (1 - figures["accuracy"]))


def test_a_malformed_labelled_file_names_the_line(tmp_path):
    from learner.judge import labelled_comments

    bad = tmp_path / "bad.tsv"
    bad.write_text("1\tfine\nmaybe\tnot a label\n")
    with pytest.raises(ValueError, match="bad.tsv:2"):
        labelled_comments(bad)


def test_bench_learn_never_wipes_a_directory_it_did_not_write(tiny_model, tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    argv = ["bench", "learn", "--model", str(tiny_model), "--out", str(precious)]
    assert main(argv) == 2
    assert "--out" in capsys.readouterr().err
    assert (precious / "notes.txt").read_text() == "keep me"
