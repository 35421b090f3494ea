"""`kaizen serve`: registered into the kaizen CLI through the kaizen.commands entry point."""

from __future__ import annotations

import argparse

from kaizen.config import add_options, from_options


def register(commands: argparse._SubParsersAction) -> None:
    from server.config import ServeConfig

    parser = commands.add_parser(
        "serve",
        help="answer chat requests over gRPC and log them for learning",
        description="Serve the model over gRPC (ChatService, FeedbackService, ModelService, "
        "health, reflection), record every answer and feedback event in the replay buffer, "
        "and hot-swap each new version the learner publishes to the registry.",
    )
    add_options(parser, ServeConfig)
    parser.set_defaults(func=lambda args: _serve(from_options(ServeConfig, args)))


def _serve(config) -> int:
    from server.app import serve

    return serve(config)
