"""Assemble and run the server: model, engine, registry watcher, gRPC, health, metrics."""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import kaizen
from kaizen import modeling
from kaizen.auth import Authenticator
from kaizen.bucket import Buckets, load_or_create_secret
from kaizen.buffer import ReplayBuffer, open_buffer
from kaizen.events import Sampling
from kaizen.guard import greedy_answers, guard_evals_from_flag
from kaizen.registry import Registry
from kaizen.rewards import load_rewards
from kaizen.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    feedback_pb2,
    feedback_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
)
from server import metrics
from server.auth import AuthInterceptor
from server.config import ServeConfig
from server.convert import Limits
from server.engine import Engine
from server.health import HealthWatch
from server.http import HttpDoor
from server.interceptor import AccessPrincipal, ErrorInterceptor
from server.limits import Limiter
from server.retention import Retention
from server.rollout import Rollout
from server.servicers import ChatService, FeedbackService, ModelService
from server.weights import RegistryWatcher, read_adapter

log = logging.getLogger(__name__)

SERVICES = (
    chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name,
    feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name,
    model_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
)


@dataclass
class RunningServer:
    grpc_server: grpc.Server
    port: int
    metrics_port: int
    engine: Engine
    watcher: RegistryWatcher
    rollout: Rollout
    buffer: ReplayBuffer
    health: HealthWatch
    _metrics_http: object
    retention: Retention | None = None
    http: HttpDoor | None = None  # the OpenAI-compatible door (--http-port); .port

    def stop(self, grace_s: float = 5.0) -> None:
        """Turn health NOT_SERVING, refuse new RPCs (UNAVAILABLE) and HTTP connections,
        let the ones in flight finish for up to `grace_s` (--drain-timeout-s), then release
        everything."""
        self.health.stop()
        drained = self.grpc_server.stop(grace_s)  # drains in the background
        if self.http is not None:
            self.http.stop(grace_s)
        drained.wait()
        if self.retention is not None:
            self.retention.stop()
        self.watcher.stop()
        self.rollout.close()  # another replica takes the rollout lease now
        self.engine.stop()
        self.buffer.close()
        self._metrics_http.shutdown()


NO_AUTH = (
    "no credentials configured: give --auth-keys FILE (create one with `kaizen auth key "
    "create --keys FILE --name NAME --scopes chat,feedback,admin`) and/or "
    "--jwt-secret-file FILE (or KAIZEN_JWT_SECRET) for user tokens; or, only on a machine "
    "nobody else can reach, --insecure-no-auth"
)


def authenticator(config: ServeConfig, jwt_secret: bytes | None) -> Authenticator | None:
    """The server's authenticator, or None when it runs open (--insecure-no-auth)."""
    if config.insecure_no_auth:
        if config.auth_keys is not None or jwt_secret is not None:
            raise ValueError("--insecure-no-auth: not together with --auth-keys or a JWT secret")
        return None
    if config.auth_keys is None and jwt_secret is None:
        raise ValueError(NO_AUTH)
    keys = Path(config.auth_keys) if config.auth_keys is not None else None
    return Authenticator(keys, jwt_secret)


def server_credentials(config: ServeConfig) -> grpc.ServerCredentials | None:
    """TLS (and with --tls-client-ca, mutual TLS) from PEM files; None for plaintext."""
    if config.tls_cert is None:
        return None

    def pem(flag: str, path) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(f"{flag}: cannot read {path}: {exc.strerror}") from None

    pair = (pem("--tls-key", config.tls_key), pem("--tls-cert", config.tls_cert))
    if config.tls_client_ca is None:
        return grpc.ssl_server_credentials([pair])
    ca = pem("--tls-client-ca", config.tls_client_ca)
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=True)


def start(config: ServeConfig, jwt_secret: bytes | None = None) -> RunningServer:
    """Start serving. Refuses (ValueError) without credentials unless the config says
    --insecure-no-auth; `jwt_secret` is the user tokens' key, read by the caller from a
    file or the environment."""
    metrics.BUILD_INFO.labels(kaizen.__version__).set(1)
    auth = authenticator(config, jwt_secret)
    credentials = server_credentials(config)
    if auth is None:
        log.warning(
            "--insecure-no-auth: every RPC is accepted without a credential; anyone who "
            "reaches %s:%s can chat as any user, teach the model and promote versions",
            config.host,
            config.port,
        )
    rewards = load_rewards(config.rewards)  # a bad file fails before the model loads
    guard = guard_evals_from_flag(config.guard_evals)  # so does a bad guard file
    info = modeling.model_info(config.model)
    device = modeling.pick_device(config.device)
    dtype = modeling.pick_dtype(config.dtype, device)
    tokenizer = modeling.load_tokenizer(config.model)
    model = modeling.load_model(config.model, device, dtype)
    stop_ids = modeling.stop_token_ids(tokenizer)
    log.info("loaded %s from %s on %s (%s)", info.name, config.model, device, dtype)
    if guard is not None:  # what the base model itself fails is set aside
        guard = guard.calibrated(greedy_answers(model, tokenizer, guard.probes))

    buffer = open_buffer(config.buffer)
    registry = Registry(config.registry)
    engine = Engine(
        model,
        stop_ids,
        tokenizer.pad_token_id,
        device,
        max_batch=config.max_batch,
        max_queue=config.max_queue,
        max_queue_wait_s=config.max_queue_wait_s,
        prefix_ids=modeling.shared_prefix_ids(tokenizer),
        prefill_chunk=config.prefill_chunk,
    )
    rollout = Rollout(
        engine,
        registry,
        buffer,
        lambda version: read_adapter(registry, version, info.name),
        config.canary_policy(),
        rewards,
        Buckets(load_or_create_secret(registry.root)),
        guard=guard,
        tokenizer=tokenizer,
        lease_s=config.rollout_lease_s,
    )
    watcher = RegistryWatcher(registry, engine, rollout, info.name, config.poll_registry_s)
    watcher.resume()  # the promoted version (and a canary) from the first request on
    engine.start()
    watcher.start()

    limits = Limits(
        max_new_tokens_cap=config.max_new_tokens_cap,
        default_sampling=Sampling(
            max_new_tokens=config.default_max_new_tokens, temperature=config.default_temperature
        ),
        max_context=info.max_context,
        max_feedback_text_chars=config.max_feedback_text_chars,
    )
    # replicas on Redis share their buckets there; on SQLite each server keeps its own
    shared = buffer if hasattr(buffer, "take_tokens") else None
    limiter = Limiter(config.rate_limits(), shared=shared)
    auth_interceptor = AuthInterceptor(auth)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="kaizen-rpc"),
        interceptors=[ErrorInterceptor(), auth_interceptor, AccessPrincipal()],
    )
    chat = ChatService(engine, tokenizer, stop_ids, buffer, limits, rollout, limiter)
    feedback = FeedbackService(buffer, limits, limiter, config.max_feedback_stream_bytes)
    model_service = ModelService(
        engine,
        rollout,
        registry,
        watcher.rejected,
        info.name,
        str(config.model),
        time.time(),
        buffer,
    )
    chat_pb2_grpc.add_ChatServiceServicer_to_server(chat, server)
    feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(feedback, server)
    model_pb2_grpc.add_ModelServiceServicer_to_server(model_service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{config.host}:{config.port}"
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"--port: cannot listen on {address}")
    metrics_http, _ = prometheus_client.start_http_server(
        config.metrics_port, addr=config.metrics_host
    )
    http = None
    if config.http_port >= 0:  # the same servicers and credentials behind an HTTP door
        http = HttpDoor(
            chat,
            feedback,
            model_service,
            auth_interceptor,
            workers=config.workers,
            max_in_flight=config.workers + config.max_queue,
        )
        http.start(
            config.http_host,
            config.http_port,
            config.tls_cert,
            config.tls_key,
            config.tls_client_ca,
        )
    server.start()
    watch = HealthWatch(health_servicer, ("", *SERVICES), engine, config.stuck_after_s)
    watch.start()
    retention = None
    if config.retention_days > 0:
        retention = Retention(buffer, config.retention_days)
        retention.start()
    return RunningServer(
        server,
        port,
        metrics_http.server_port,
        engine,
        watcher,
        rollout,
        buffer,
        watch,
        metrics_http,
        retention,
        http,
    )


def serve(config: ServeConfig, jwt_secret: bytes | None = None) -> int:
    running = start(config, jwt_secret)
    tls = "mTLS" if config.tls_client_ca else "TLS" if config.tls_cert else "plaintext"
    auth = "NO AUTH" if config.insecure_no_auth else "auth on"
    http = ""
    if running.http is not None:
        scheme = "https" if config.tls_cert else "http"
        http = f", OpenAI-compatible HTTP on {scheme}://{config.http_host}:{running.http.port}/v1"
    print(
        f"kaizen serve: gRPC on {config.host}:{running.port} ({tls}, {auth}){http}, metrics "
        f"on http://{config.metrics_host}:{running.metrics_port}/metrics, serving "
        f"{running.engine.version}",
        flush=True,
    )
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    stopping.wait()
    log.info(
        "shutting down: new calls get UNAVAILABLE; finishing those in flight (up to %g s)",
        config.drain_timeout_s,
    )
    running.stop(config.drain_timeout_s)
    return 0
