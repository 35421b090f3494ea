"""`kaizen bench`: registered into the kaizen CLI through the kaizen.commands entry point."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from kaizen.config import add_options, from_options


def register(commands: argparse._SubParsersAction) -> None:
    from bench.config import (
        CanaryBench,
        IngestBench,
        JudgeBench,
        LearnBench,
        PoisonBench,
        ServeBench,
        SwapBench,
    )

    parser = commands.add_parser("bench", help="measure serving and learning on this machine")
    benchmarks = parser.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    _add(
        benchmarks.add_parser(
            "serve",
            help="tokens/s and latency of kaizen serve under concurrent load",
            description="Start kaizen serve, stream --requests chat requests of exactly "
            "--new-tokens tokens from --concurrency client threads, and report tokens/s, time "
            "to first token, inter-token and request latency (p50, p99); then compare the "
            "tokens/s with plain batched model.generate and with one request at a time.",
        ),
        ServeBench,
        _serve,
    )
    _add(
        benchmarks.add_parser(
            "swap",
            help="request latency while new versions are hot-swapped in, and version purity",
            description="Start kaizen serve and run the same load twice: alone, then while a "
            "new random LoRA version is published every --publish-every-s seconds. Report p99 "
            "latency with and without swaps, the decode loop's pause per swap, the time from "
            "publish to serving, and how many answers mix versions (each answer's logged "
            "log-probabilities recomputed under the version it is tagged with).",
        ),
        SwapBench,
        _swap,
    )
    _add(
        benchmarks.add_parser(
            "learn",
            help="does the model learn what simulated users reward (liked rate before/after)",
            description="Start kaizen serve and kaizen learn, measure the liked rate of "
            "--preference on held-out prompts, let simulated users send --events feedback "
            "events, then measure again on the learner's last version; report versions "
            "published, KL to the base, perplexity change on held-out general text, and write "
            "a PNG learning curve to --out.",
        ),
        LearnBench,
        _learn,
    )
    _add(
        benchmarks.add_parser(
            "poison",
            help="can a coordinated group plant a brand in the served model (marker rate, "
            "honest liked rate)",
            description="Run bench learn with --group-share of the users acting together: "
            "they reward only answers that mention --marker and correct others to plug it; "
            "the rest want concise answers. Report the served model's marker rate and the "
            "honest liked rate on held-out prompts, before and after, and whether the "
            "target holds (marker within noise of the base model, honest rise ≥ 15 points).",
        ),
        PoisonBench,
        _poison,
    )
    _add(
        benchmarks.add_parser(
            "judge",
            help="accuracy of the comment judge on the shipped labelled comments",
            description="Score learner/data/comments.tsv (comments written for the project, "
            "labelled satisfied or not) with the comment judge and report its accuracy.",
        ),
        JudgeBench,
        _judge,
    )
    _add(
        benchmarks.add_parser(
            "canary",
            help="false promotion, false rollback and feedback to a decision of the canary "
            "test, over many simulated canaries",
            description="Simulate --runs canary experiments per reward shape (thumbs, the "
            "shipped reward mix, heavy users with their own tastes) and true Δ, and run the "
            "server's mSPRT per answer and per user, and a z interval peeked at after every "
            "event, on the same events. Report each test's promote rate with its 95 %% "
            "interval, rollback rate and median canary events to a decision.",
        ),
        CanaryBench,
        _canary,
    )
    _add(
        benchmarks.add_parser(
            "ingest",
            help="durable feedback events/s through StreamFeedback and StreamFeedbackBatches, "
            "beside the buffer's own limit",
            description="Seed the buffer with answers, time --clients threads calling the "
            "buffer's append_feedback with batches of --batch events (its own limit: the same "
            "durability, no gRPC), then start kaizen serve on it and have --clients clients "
            "send --events events per RPC, --batch per call, through "
            "FeedbackService.StreamFeedback (a message per event) and StreamFeedbackBatches "
            "(one message per call; --rpc picks one). Report events/s, the ratio to the limit "
            "and the p50/p99 ack latency per call; "
            "check that every event sent is stored exactly once.",
        ),
        IngestBench,
        _ingest,
    )


def _add(parser: argparse.ArgumentParser, config_cls: type, run: Callable) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of a table"
    )
    add_options(parser, config_cls)

    def main(args: argparse.Namespace) -> int:
        from bench.report import run_and_print

        try:
            config = from_options(config_cls, args)
        except ValueError as exc:
            parser.error(str(exc))
        title = f"kaizen {args.command} {args.bench_command}"
        try:
            return run_and_print(title, lambda: run(config), args.json)
        except ValueError as exc:  # a flag the run found unusable (the message names it)
            print(f"{title}: {exc}", file=sys.stderr)
            return 2

    parser.set_defaults(func=main)


def _serve(config) -> dict[str, object]:
    from bench.serve import run

    return run(config)


def _swap(config) -> dict[str, object]:
    from bench.swap import run

    return run(config)


def _learn(config) -> dict[str, object]:
    from bench.learn import run

    return run(config)


def _poison(config) -> dict[str, object]:
    from bench.poison import run

    return run(config)


def _canary(config) -> dict[str, object]:
    from bench.canary import run

    return run(config)


def _ingest(config) -> dict[str, object]:
    from bench.ingest import run

    return run(config)


def _judge(config) -> dict[str, object]:
    from bench.learn import judge

    return judge(config)
