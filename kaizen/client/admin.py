"""`kaizen admin`: operate a running server from a terminal (no grpcurl needed).

    kaizen admin info|versions [--target HOST:PORT]
    kaizen admin promote|rollback VERSION [--reason TEXT]
    kaizen admin forget --user ID

The credential (an API key with scope `admin`; `info` takes any) comes from --key-file
or $KAIZEN_API_KEY, never from the command line; --ca FILE talks TLS.
"""

from __future__ import annotations

import json
import os
import sys

import grpc

from kaizen.client import CREDENTIAL_ENV, add_connection_options, connect, connection_options
from kaizen.v1 import model_pb2, model_pb2_grpc


def _stub(args) -> tuple[grpc.Channel, model_pb2_grpc.ModelServiceStub]:
    credential, root_ca = connection_options(args, dict(os.environ))
    channel = connect(args.target, credential, root_ca=root_ca)
    return channel, model_pb2_grpc.ModelServiceStub(channel)


def _info(stub, args) -> None:
    info = stub.GetModelInfo(model_pb2.GetModelInfoRequest(), timeout=args.timeout_s)
    print(f"base model  {info.base_model} ({info.base_model_path})")
    for v in info.versions:
        since = v.serving_since.ToDatetime().isoformat(timespec="seconds")
        print(f"{v.state:<10}  {v.version} since {since} UTC")
    print(f"swaps       {info.swaps}")


def _versions(stub, args) -> None:
    reply = stub.ListVersions(model_pb2.ListVersionsRequest(), timeout=args.timeout_s)
    print(f"{'version':<8}  {'state':<12}  {'parent':<6}  reason")
    for v in reply.versions:
        print(f"{v.version:<8}  {v.state:<12}  {v.parent or '-':<6}  {v.reason}")
        if args.evidence and v.evidence_json:
            print("          " + json.dumps(json.loads(v.evidence_json), sort_keys=True))


def _promote(stub, args) -> None:
    request = model_pb2.PromoteRequest(version=args.version, reason=args.reason)
    v = stub.Promote(request, timeout=args.timeout_s)
    print(f"{v.version}: {v.state} ({v.reason})")


def _rollback(stub, args) -> None:
    request = model_pb2.RollbackRequest(version=args.version, reason=args.reason)
    v = stub.Rollback(request, timeout=args.timeout_s)
    print(f"{v.version}: {v.state} ({v.reason})")


def _forget(stub, args) -> None:
    done = stub.ForgetUser(model_pb2.ForgetUserRequest(user_id=args.user), timeout=args.timeout_s)
    again = " (already forgotten before)" if done.already_forgotten else ""
    print(
        f"forgot {args.user!r}: {done.answers_deleted} answers and {done.feedback_deleted} "
        f"feedback events deleted{again}"
    )


def _run(action):
    def run(args) -> int:
        try:
            channel, stub = _stub(args)
        except (ValueError, OSError) as exc:
            print(f"kaizen admin: {exc}", file=sys.stderr)
            return 2
        try:
            action(stub, args)
        except grpc.RpcError as exc:
            print(f"kaizen admin: {exc.code().name} {exc.details()}", file=sys.stderr)
            return 1
        finally:
            channel.close()
        return 0

    return run


def add_parser(commands) -> None:
    admin = commands.add_parser(
        "admin",
        help="operate a running server: info, versions, promote, rollback, forget",
        description="Talk to a running `kaizen serve` as an operator. The credential "
        f"comes from --key-file or ${CREDENTIAL_ENV} (an API key with scope admin).",
    )
    add_connection_options(admin, "the API key")
    admin.add_argument("--timeout-s", type=float, default=30.0, help="per call (default: 30)")
    sub = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    sub.add_parser("info", help="the versions being served, since when").set_defaults(
        func=_run(_info)
    )
    versions = sub.add_parser("versions", help="every version with its state and reason")
    versions.add_argument(
        "--evidence", action="store_true", help="also the gate's and canary's figures"
    )
    versions.set_defaults(func=_run(_versions))
    for name, action, what in (
        ("promote", _promote, "serve VERSION to everyone now (the canary, or any servable one)"),
        ("rollback", _rollback, "stop serving VERSION (the canary, or the serving version)"),
    ):
        p = sub.add_parser(name, help=what)
        p.add_argument("version", help="e.g. v3")
        p.add_argument("--reason", default="", help="recorded with the decision")
        p.set_defaults(func=_run(action))
    forget = sub.add_parser("forget", help="delete a user's answers and feedback from the buffer")
    forget.add_argument("--user", required=True, help="the user id")
    forget.set_defaults(func=_run(_forget))
