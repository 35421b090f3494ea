"""`kaizen learn` and `kaizen replay`: registered into the kaizen CLI through the
kaizen.commands entry point."""

from __future__ import annotations

import argparse

from kaizen.config import add_options, from_options


def register(commands: argparse._SubParsersAction) -> None:
    from learner.config import LearnerConfig

    parser = commands.add_parser(
        "learn",
        help="learn from logged feedback and publish new versions",
        description="Tail the replay buffer from a persisted cursor, turn feedback into "
        "rewards (--rewards), supervised targets and preference pairs (corrections, "
        "regenerations, comments scored by a judge), update a LoRA adapter with --objective "
        "(KL to the base model, clipped importance ratios against the logged behaviour), and "
        "publish a new version to the registry every --publish-every examples, unless the "
        "KL guard on a probe set of general text, the replay gate on held-out traffic or "
        "the guard evals (--guard-evals: facts it must keep, flattery it must not learn) "
        "refuse it.",
    )
    add_options(parser, LearnerConfig)
    parser.set_defaults(func=lambda args: _run_config(LearnerConfig, args, _learn))
    _register_replay(commands)


def _register_replay(commands: argparse._SubParsersAction) -> None:
    from learner.config import ReplayEvaluateConfig, ReplayExportConfig

    parser = commands.add_parser(
        "replay",
        help="evaluate versions offline on logged traffic; export the logs",
        description="Offline replay over the replay buffer: counterfactual estimates of a "
        "version's reward from logged answers and feedback, and an export for analysis.",
    )
    sub = parser.add_subparsers(dest="replay_command", required=True, metavar="COMMAND")
    evaluate = sub.add_parser(
        "evaluate",
        help="estimate versions' mean reward on logged traffic (IPS, SNIPS, DR, DM)",
        description="Replay the newest logged answers with rewarded feedback under each "
        "--candidate and --against: inverse propensity scoring, self-normalised IPS, "
        "doubly robust and direct-method estimates of each one's mean reward with "
        "bootstrap intervals, the effective sample size, preference accuracy on "
        "liked/disliked pairs and corrections, KL to the base model and perplexity "
        "drift; several versions are ranked by --rank-by. A table, or --json; --report "
        "draws a PNG.",
    )
    add_options(evaluate, ReplayEvaluateConfig)
    evaluate.set_defaults(func=lambda args: _run_config(ReplayEvaluateConfig, args, _evaluate))
    export = sub.add_parser(
        "export",
        help="write logged answers joined with their feedback as jsonl or parquet",
        description="One row per answer that got feedback: the answer, how it was sampled, "
        "its behaviour log-probability, its feedback events with their rewards, and its "
        "mean reward. The schema is in the README.",
    )
    add_options(export, ReplayExportConfig)
    export.set_defaults(func=lambda args: _run_config(ReplayExportConfig, args, _export))


def _run_config(cls, args, setup) -> int:
    """Build the config and set the command up; `setup` returns the work to do. A bad
    flag, reward file, registry or buffer (a ValueError met before any work, whose message
    names it) is one line on stderr and exit code 2, not a traceback."""
    import sys

    from kaizen.rewards import RewardConfigError

    try:
        work = setup(from_options(cls, args))
    except ValueError as exc:
        flag = "--rewards " if isinstance(exc, RewardConfigError) else ""
        print(f"kaizen {args.command}: {flag}{exc}", file=sys.stderr)
        return 2
    return work()


def _evaluate(config):
    from learner.replay import evaluate

    result = evaluate(config)
    return lambda: _show(config, result)


def _show(config, result) -> int:
    import json

    from learner.replay import report_png, table

    if config.report is not None:
        report_png(result, config.report)
    if config.json:
        for row in result["versions"].values():
            row.pop("log10_weights")
        print(json.dumps(result, indent=2))
    else:
        print(table(result))
        if config.report is not None:
            print(f"report: {config.report}")
    return 0


def _export(config):
    from kaizen.buffer import open_buffer
    from kaizen.rewards import load_rewards
    from learner.replay import export

    rewards = load_rewards(config.rewards)
    buffer = open_buffer(config.buffer, must_exist=True)
    try:
        n = export(buffer, rewards, config.out, config.format)
        states = buffer.feedback_states()
    finally:
        buffer.close()
    left_out = (
        f"; left out: {states['superseded']} superseded and {states['withdrawn']} withdrawn "
        "feedback events"
    )
    return lambda: print(
        f"kaizen replay export: {n} answers to {config.out} ({config.format}){left_out}"
    )


def _learn(config):
    from learner import distributed
    from learner.loop import Learner

    distributed.init(config.device)  # under torchrun: join its process group
    learner = Learner(config)
    return lambda: _run_learner(learner, config)


def _run_learner(learner, config) -> int:
    import signal
    import threading

    import prometheus_client

    from learner import distributed

    metrics_at = "no metrics endpoint"
    if config.metrics_port >= 0 and distributed.is_main():  # rank 0 speaks for the learner
        http, _ = prometheus_client.start_http_server(config.metrics_port, addr=config.metrics_host)
        metrics_at = f"metrics on http://{config.metrics_host}:{http.server_port}/metrics"
    ranks = f" (rank 0 of {distributed.world()})" if distributed.world() > 1 else ""
    if distributed.is_main():
        print(
            f"kaizen learn: from {learner.version}, cursor {learner.progress.cursor}, "
            f"on {learner.device}{ranks}; {metrics_at}",
            flush=True,
        )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    learner.run(stop)
    learner.buffer.close()
    distributed.close()
    return 0
