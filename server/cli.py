"""`kaizen serve`: registered into the kaizen CLI through the kaizen.commands entry point."""

from __future__ import annotations

import argparse

from kaizen.config import add_options, from_options

JWT_SECRET_ENV = "KAIZEN_JWT_SECRET"


def register(commands: argparse._SubParsersAction) -> None:
    from server.config import ServeConfig

    parser = commands.add_parser(
        "serve",
        help="answer chat requests over gRPC and log them for learning",
        description="Serve the model over gRPC (ChatService, FeedbackService, ModelService, "
        "health, reflection), record every answer and feedback event in the replay buffer, "
        "and hot-swap each new version the learner publishes to the registry: first as a "
        "canary for --canary-share of users, promoted or rolled back by a sequential test "
        "on their feedback.",
    )
    add_options(parser, ServeConfig)
    parser.set_defaults(func=lambda args: _serve(ServeConfig, args))


def _serve(cls, args) -> int:
    import sys

    from kaizen.auth import read_secret
    from kaizen.rewards import RewardConfigError
    from server.app import serve

    try:
        config = from_options(cls, args)
        jwt_secret = read_secret(config.jwt_secret_file, JWT_SECRET_ENV, "--jwt-secret-file")
    except ValueError as exc:  # a flag out of range: the message names it
        print(f"kaizen serve: {exc}", file=sys.stderr)
        return 2
    try:
        return serve(config, jwt_secret)
    except RewardConfigError as exc:
        print(f"kaizen serve: --rewards {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # credentials or TLS files: the message names the flag
        print(f"kaizen serve: {exc}", file=sys.stderr)
        return 2
