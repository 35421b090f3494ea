"""`kaizen bench`: registered into the kaizen CLI through the kaizen.commands entry point."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("bench", help="measure serving and learning on this machine")
    parser.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
