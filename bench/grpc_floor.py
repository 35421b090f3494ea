"""The transport's own floor for `kaizen bench ingest`: a gRPC server with kaizen's
FeedbackService methods that parses every message and stores nothing.

`kaizen bench ingest` starts it in a process of its own, as `kaizen serve` runs, with the
same grpcio sync server and handler threads, and has the same clients send it the same
messages: what kaizen's StreamFeedback reaches is then read against what grpcio itself
passes on this machine, one message per event (on the 2-core development VM: 18,700–19,700
messages/s at 4 clients, 51–57 µs of server CPU a message with nothing behind it; the
README's "Ingest" has the figures and the grpc.aio comparison). No auth, validation,
buffer or metrics: only parse and count.

    python -m bench.grpc_floor WORKERS   # prints "grpc floor on 127.0.0.1:PORT", serves
"""

from __future__ import annotations

import sys
from concurrent import futures

import grpc

from kaizen.v1 import feedback_pb2

SERVICE = "kaizen.v1.FeedbackService"


def _stream(request_iterator, context) -> feedback_pb2.FeedbackAck:
    return feedback_pb2.FeedbackAck(accepted=sum(1 for _ in request_iterator))


def _batches(request_iterator, context) -> feedback_pb2.FeedbackAck:
    return feedback_pb2.FeedbackAck(accepted=sum(len(b.events) for b in request_iterator))


def _handler(behaviour, message) -> grpc.RpcMethodHandler:
    return grpc.stream_unary_rpc_method_handler(
        behaviour,
        request_deserializer=message.FromString,
        response_serializer=feedback_pb2.FeedbackAck.SerializeToString,
    )


def main(argv: list[str]) -> int:
    workers = int(argv[0]) if argv else 32
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    methods = {
        "StreamFeedback": _handler(_stream, feedback_pb2.Feedback),
        "StreamFeedbackBatches": _handler(_batches, feedback_pb2.FeedbackBatch),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"grpc floor on 127.0.0.1:{port}", flush=True)
    sys.stdin.read()  # until the bench closes our stdin (or dies)
    server.stop(0).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
