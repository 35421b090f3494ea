"""`kaizen learn`: registered into the kaizen CLI through the kaizen.commands entry point."""

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
        "KL guard on a fixed probe set refuses it.",
    )
    add_options(parser, LearnerConfig)
    parser.set_defaults(func=lambda args: _learn(from_options(LearnerConfig, args)))


def _learn(config) -> int:
    import signal
    import sys
    import threading

    import prometheus_client

    from learner.loop import Learner
    from learner.rewards import RewardConfigError

    try:
        learner = Learner(config)
    except RewardConfigError as exc:
        print(f"kaizen learn: --rewards {exc}", file=sys.stderr)
        return 2
    if config.metrics_port >= 0:
        http, _ = prometheus_client.start_http_server(config.metrics_port)
        metrics_at = f"metrics on http://127.0.0.1:{http.server_port}/metrics"
    else:
        metrics_at = "no metrics endpoint"
    print(
        f"kaizen learn: from {learner.version}, cursor {learner.progress.cursor}, "
        f"on {learner.device}; {metrics_at}",
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    learner.run(stop)
    learner.buffer.close()
    return 0
