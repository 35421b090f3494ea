"""`kaizen bench learn`: does the product learn what its users reward, without forgetting?

Starts `kaizen serve` and `kaizen learn` as separate processes on a fresh buffer and
registry, measures the liked rate on held-out prompts (the preference function applied
to answers with a fixed seed per prompt), lets simulated users chat and send feedback
until N events, stops the learner, waits until the server serves the last version it
published, and measures again. Then, in this process and in fp32: perplexity of the
shipped general text under the base and the final version, and the KL of the final
version to the base on its own held-out answers. The learning curve (liked rate of the
users' traffic by version, 95 % Wilson band, and the two held-out measurements) goes to
a PNG.
"""

from __future__ import annotations

import math
import shlex
import shutil
import time
from pathlib import Path

import torch

from bench.config import LearnBench
from bench.load import kaizen_server, say
from bench.swap import wait_serving_version
from kaizen import modeling
from kaizen.registry import BASE_VERSION, Registry, version_number
from kaizen.sim.demo import start_kaizen
from kaizen.sim.preferences import load_preference
from kaizen.sim.simulate import Simulator, Tally, heldout_answers, load_prompts
from learner.objectives import token_kl
from learner.replay import general_text_windows, perplexity


def run(config: LearnBench, preference=None, measure=None) -> dict[str, object]:
    """The run; `preference` replaces --preference's (say, a coalition of tastes) and
    `measure(before, after)` adds figures computed from the held-out answers, each a list
    of (prompt, answer, version), to the report."""
    preference = preference or load_preference(config.preference)
    liked = getattr(preference, "liked", None)
    if liked is None:
        raise ValueError(f"--preference: {config.preference} has no liked(prompt, answer)")
    heldout = load_prompts("heldout")[: config.heldout]
    train = load_prompts("train")
    out = config.out.resolve()
    if out.exists() and any(out.iterdir()):
        if not (out / "learn.log").exists():  # never wipe a directory this did not write
            raise ValueError(f"--out: {out} is not empty and not from a kaizen bench learn run")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    sample = dict(max_new_tokens=config.max_new_tokens, temperature=config.temperature)

    server_args = shlex.split(config.server_args)
    with kaizen_server(
        config.model, out, 16, config.max_new_tokens, config.dtype, server_args
    ) as server:
        say(f"measuring the base model on {len(heldout)} held-out prompts")
        before = heldout_answers(server.channel, heldout, **sample)
        learner = start_kaizen(
            [
                "learn",
                "--model",
                str(config.model),
                "--buffer",
                server.buffer_url,
                "--registry",
                str(server.registry_dir),
                "--objective",
                config.objective,
                "--metrics-port",
                "-1",
                *shlex.split(config.learner_args),
            ],
            out / "learn.log",
        )
        try:
            _wait_learner(learner, out / "learn.log")
            sim = Simulator(
                server.channel, preference, train, config.users, seed=config.seed, **sample
            )
            last = [0.0]

            def progress(sent: int, answers: int, tally: Tally) -> None:
                if time.monotonic() - last[0] < 15 and sent < config.events:
                    return
                last[0] = time.monotonic()
                versions = tally.by_version()
                newest = max(versions, key=version_number)
                say(
                    f"{sent}/{config.events} events, {answers} answers, "
                    f"{time.monotonic() - started:.0f} s; serving {newest}: "
                    f"liked {versions[newest]['liked_rate']:.0%} of "
                    f"{versions[newest]['answers']:.0f}"
                )

            sim_started = time.monotonic()
            deadline = started + config.max_wall_s
            tally = sim.run(config.events, config.concurrency, progress, deadline)
            sim_s = time.monotonic() - sim_started
            users_stopped = time.time()
        finally:
            learner.terminate()
            learner_exit = learner.wait(timeout=900)  # mid-publish on a busy CPU: minutes
        if learner_exit != 0:
            raise RuntimeError(f"kaizen learn exited with {learner_exit}: see {out}/learn.log")
        registry = Registry(server.registry_dir)
        if _canary(server_args):  # measure what the rollout decided to serve
            final = _settle_canary(server.channel, server_args)
        else:
            final = registry.latest_servable()  # a candidate a guard refused is never served
            if final != BASE_VERSION:
                wait_serving_version(server.channel, final)
        say(f"measuring {final} on the held-out prompts")
        after = heldout_answers(server.channel, heldout, **sample)
        mixed = sorted({v for _, _, v in after} - {final})
        if mixed:
            raise RuntimeError(f"the held-out answers after came from {mixed} besides {final}")
        rollout = (
            _rollout(server.channel, out / "buffer.db", users_stopped)
            if _canary(server_args)
            else None
        )

    rate_before = sum(liked(p, a) for p, a, _ in before) / len(before)
    rate_after = sum(liked(p, a) for p, a, _ in after) / len(after)
    say("perplexity and KL to the base model, in fp32")
    drift = _drift(config.model, registry, final, after)
    manifests = [registry.manifest(v).metadata for v in registry.versions()]
    accepted = [m for m in manifests if not m.get("rejected")]
    curve = _curve(tally, rate_before, rate_after, final, config, out / "learning_curve.png")
    report = {
        "preference": config.preference,
        "objective": config.objective,
        "events": sum(tally.events.values()),
        "answers": sum(tally.answers.values()),
        "liked_rate_before": round(rate_before, 4),
        "liked_rate_after": round(rate_after, 4),
        "liked_rate_change_pts": round(100 * (rate_after - rate_before), 1),
        "heldout_prompts": len(heldout),
        "versions_published": len(accepted),
        "final_version": final,
        "versions_rejected": len(manifests) - len(accepted),
        "rejected_because": [m["rejected"] for m in manifests if m.get("rejected")],
        "learner_steps": int(accepted[-1].get("steps", 0)) if accepted else 0,
        "kl_to_reference": drift["kl_to_reference"],
        "perplexity_base": drift["perplexity_base"],
        "perplexity_final": drift["perplexity_final"],
        "perplexity_change_pct": drift["perplexity_change_pct"],
        "events_by_kind": dict(sorted(tally.events.items())),
        "liked_rate_by_version": curve,
        "simulation_s": round(sim_s, 1),
        "wall_s": round(time.monotonic() - started, 1),
        "learning_curve_png": str(out / "learning_curve.png"),
        "learner_args": config.learner_args,
        "server_args": config.server_args,
        "rollout": rollout,
    }
    if measure is not None:
        report.update(measure(before, after))
    return report


def _flag(server_args: list[str], name: str, default: float) -> float:
    """The value these `kaizen serve` flags give `name` (`--x V` or `--x=V`; the last one
    wins), else `default`."""
    value = default
    for i, flag in enumerate(server_args):
        if flag.startswith(name + "="):
            value = float(flag.split("=", 1)[1])
        elif flag == name and i + 1 < len(server_args):
            value = float(server_args[i + 1])
    return value


def _canary(server_args: list[str]) -> bool:
    """Whether these `kaizen serve` flags turn the canary on."""
    return _flag(server_args, "--canary-share", 0.0) > 0


def _settle_canary(channel, server_args: list[str]) -> str:
    """After the users stop, what the rollout serves: the canary's last users become final
    `--canary-user-settle-s` after their first rated answer, so wait that long (and two
    registry polls) for its last decision; then end a canary still undecided, as its
    window would (with no users left it can never be decided), and the canary of every
    newer version that ending it lets start (the 2,000-event run measured v12 with v18,
    started by v16's rollback, answering part of the held-out prompts), so the prompts
    are answered by one version: the evaluator might be routed to a canary, and a decision
    in the middle of the measurement would switch versions under it."""
    from server.canary import CanaryPolicy

    settle = _flag(server_args, "--canary-user-settle-s", CanaryPolicy().user_settle_s)
    say(f"waiting {settle + 2:.0f} s for the canary's last users to count")
    time.sleep(settle + 2.0)
    from kaizen.v1 import model_pb2, model_pb2_grpc

    stub = model_pb2_grpc.ModelServiceStub(channel)
    for _ in range(120):  # ending one canary starts the newest pending version's: end it too
        versions = stub.ListVersions(model_pb2.ListVersionsRequest()).versions
        states = {info.version: info.state for info in versions}
        if not any(state in ("canary", "pending") for state in states.values()):
            break
        for version, state in states.items():
            if state == "canary":
                say(f"ending {version}'s canary: undecided when the users stopped")
                stub.Rollback(
                    model_pb2.RollbackRequest(
                        version=version, reason="bench learn: undecided when the users stopped"
                    ),
                    timeout=60,
                )
        time.sleep(2.0)  # a registry poll or two: the rollout starts the next canary
    else:
        raise RuntimeError(f"bench learn: canaries kept starting after the users stopped: {states}")
    return _serving(channel)


def _serving(channel) -> str:
    from kaizen.v1 import model_pb2, model_pb2_grpc

    info = model_pb2_grpc.ModelServiceStub(channel).GetModelInfo(model_pb2.GetModelInfoRequest())
    return info.versions[0].version


def _rollout(channel, buffer: Path, users_stopped: float) -> dict[str, dict[str, object]]:
    """Per published version, as the server's ListVersions tells it: its state, why, and
    for a version that was canaried, the canary test's figures and the share of all
    answers it gave while under test (never more than the canary share, unless it was
    promoted). A canary still under test is counted until the users stopped, not over
    the held-out measurement, which does not go through the canary's users."""
    import json
    import sqlite3

    from kaizen.v1 import model_pb2, model_pb2_grpc

    stub = model_pb2_grpc.ModelServiceStub(channel)
    versions = stub.ListVersions(model_pb2.ListVersionsRequest()).versions
    db = sqlite3.connect(buffer)
    report = {}
    for info in versions:
        if info.version == BASE_VERSION:
            continue
        row: dict[str, object] = {"state": info.state, "reason": info.reason}
        canary = json.loads(info.evidence_json or "{}").get("canary") or {}
        if "started_at" in canary:
            start = canary["started_at"]
            end = canary.get("decided_at") or max(start, users_stopped)
            total, mine = db.execute(
                "SELECT COUNT(*), SUM(model_version = ?) FROM generations"
                " WHERE created_at BETWEEN ? AND ?",
                (info.version, start, end),
            ).fetchone()
            row.update(
                canary_s=round(end - start, 1),
                answers_while_canary=total,
                share_while_canary=round((mine or 0) / total, 4) if total else None,
                arms=canary.get("arms"),
                diff=canary.get("diff"),
                interval=[canary.get("low"), canary.get("high")],
            )
        row["answers"] = db.execute(
            "SELECT COUNT(*) FROM generations WHERE model_version = ?", (info.version,)
        ).fetchone()[0]
        report[info.version] = row
    db.close()
    return report


def _wait_learner(learner, log: Path, timeout_s: float = 300.0) -> None:
    """Block until `kaizen learn` has loaded and started tailing the buffer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if learner.poll() is not None:
            raise RuntimeError(f"kaizen learn exited with {learner.returncode}: see {log}")
        if "kaizen learn: from" in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise RuntimeError(f"kaizen learn did not start in {timeout_s:g} s: see {log}")


def _drift(
    model_dir: Path, registry: Registry, final: str, answers: list[tuple[str, str, str]]
) -> dict[str, float | None]:
    """Perplexity of the shipped general text under the base and `final`, and the mean
    per-token KL(final ‖ base) on `final`'s own held-out answers."""
    from peft import PeftModel

    device = torch.device("cpu")
    tokenizer = modeling.load_tokenizer(model_dir)
    base = modeling.load_model(model_dir, device, torch.float32)
    windows = general_text_windows(tokenizer)
    ppl_base = perplexity(base, windows)
    if final == BASE_VERSION:
        return {
            "kl_to_reference": 0.0,
            "perplexity_base": round(ppl_base, 3),
            "perplexity_final": round(ppl_base, 3),
            "perplexity_change_pct": 0.0,
        }
    model = PeftModel.from_pretrained(base, registry.path(final)).eval()
    ppl_final = perplexity(model, windows)
    kls, counts = [], []
    with torch.no_grad():
        for prompt, answer, _ in answers:
            p = modeling.chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
            a = tokenizer.encode(answer, add_special_tokens=False)
            if not a:
                continue
            ids = torch.tensor([p + a])
            logits = model(input_ids=ids).logits
            with model.disable_adapter():
                ref = model(input_ids=ids).logits
            kl = token_kl(logits, ref)[0, len(p) :]
            kls.append(float(kl.sum()))
            counts.append(len(a))
    return {
        "kl_to_reference": round(sum(kls) / max(1, sum(counts)), 6),
        "perplexity_base": round(ppl_base, 3),
        "perplexity_final": round(ppl_final, 3),
        "perplexity_change_pct": round(100 * (ppl_final / ppl_base - 1), 2),
    }


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a rate k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _curve(
    tally: Tally,
    before: float,
    after: float,
    final: str,
    config: LearnBench,
    png: Path,
) -> dict[str, dict[str, float]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = {}
    for version in sorted(tally.answers, key=version_number):
        n, k = tally.answers[version], tally.liked[version]
        low, high = wilson(k, n)
        rows[version] = {
            "answers": n,
            "liked_rate": round(k / n, 4),
            "ci_low": round(low, 4),
            "ci_high": round(high, 4),
        }
    xs = [version_number(v) for v in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.fill_between(
        xs,
        [r["ci_low"] for r in rows.values()],
        [r["ci_high"] for r in rows.values()],
        alpha=0.25,
        label="95 % Wilson interval",
    )
    ax.plot(xs, [r["liked_rate"] for r in rows.values()], marker="o", label="users' traffic")
    ax.scatter(
        [0, version_number(final)],
        [before, after],
        marker="*",
        s=150,
        color="black",
        zorder=3,
        label=f"held-out prompts ({config.heldout})",
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("model version")
    ax.set_ylabel(f"liked rate ({config.preference})")
    ax.set_ylim(0, 1)
    ax.set_title(f"kaizen bench learn: {config.preference}, {config.objective}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return rows


def judge(config) -> dict[str, object]:
    """The comment judge's accuracy on a labelled set of comments."""
    from learner.judge import CommentJudge, labelled_comments

    labelled = labelled_comments(config.comments)
    device = torch.device("cpu")
    tokenizer = modeling.load_tokenizer(config.model)
    model = modeling.load_model(config.model, device, torch.float32)
    started = time.monotonic()
    judge = CommentJudge(model, tokenizer, device)
    result = judge.accuracy(labelled)
    positives = [s for s, (_, ok) in zip(result.scores, labelled, strict=True) if ok]
    negatives = [s for s, (_, ok) in zip(result.scores, labelled, strict=True) if not ok]
    wrong = [c for s, (c, ok) in zip(result.scores, labelled, strict=True) if (s > 0) != ok]
    return {
        "model": modeling.model_info(config.model).name,
        "comments": result.n,
        "accuracy": round(result.accuracy, 4),
        "accuracy_on_satisfied": round(sum(s > 0 for s in positives) / max(1, len(positives)), 4),
        "accuracy_on_unsatisfied": round(
            sum(s <= 0 for s in negatives) / max(1, len(negatives)), 4
        ),
        "mean_score_satisfied": round(sum(positives) / max(1, len(positives)), 3),
        "mean_score_unsatisfied": round(sum(negatives) / max(1, len(negatives)), 3),
        "misjudged": wrong,
        "seconds": round(time.monotonic() - started, 1),
    }
