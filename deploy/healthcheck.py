"""The image's HEALTHCHECK: exit 0 when healthy, 1 when not.

`kaizen serve`: its grpc.health.v1 status for the whole server ("") on
$KAIZEN_HEALTH_GRPC (default 127.0.0.1:50051, plaintext) must be SERVING; the server
turns it NOT_SERVING when its decode loop is dead or stuck. `kaizen learn` serves no
gRPC: its container sets $KAIZEN_HEALTH_URL (its /metrics), which must answer 200.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def healthy() -> bool:
    url = os.environ.get("KAIZEN_HEALTH_URL")
    if url:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status == 200
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = os.environ.get("KAIZEN_HEALTH_GRPC", "127.0.0.1:50051")
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=3
        )
    return reply.status == health_pb2.HealthCheckResponse.SERVING


if __name__ == "__main__":
    try:
        ok = healthy()
    except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy", said why
        print(f"unhealthy: {exc}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0 if ok else 1)
