"""Assemble and run the server: model, engine, registry watcher, gRPC, health, metrics."""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kaizen import modeling
from kaizen.buffer import ReplayBuffer, open_buffer
from kaizen.events import Sampling
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
from server.config import ServeConfig
from server.convert import Limits
from server.engine import Engine
from server.interceptor import ErrorInterceptor
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
    health: health.HealthServicer
    _metrics_http: object

    def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new RPCs, finish the ones in flight, then release everything."""
        for name in ("", *SERVICES):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.grpc_server.stop(grace_s).wait()
        self.watcher.stop()
        self.engine.stop()
        self.buffer.close()
        self._metrics_http.shutdown()


def start(config: ServeConfig) -> RunningServer:
    rewards = load_rewards(config.rewards)  # a bad file fails before the model loads
    info = modeling.model_info(config.model)
    device = modeling.pick_device(config.device)
    dtype = modeling.pick_dtype(config.dtype, device)
    tokenizer = modeling.load_tokenizer(config.model)
    model = modeling.load_model(config.model, device, dtype)
    stop_ids = modeling.stop_token_ids(tokenizer)
    log.info("loaded %s from %s on %s (%s)", info.name, config.model, device, dtype)

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
    )
    rollout = Rollout(
        engine,
        registry,
        buffer,
        lambda version: read_adapter(registry, version, info.name),
        config.canary_policy(),
        rewards,
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
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="kaizen-rpc"),
        interceptors=[ErrorInterceptor()],
    )
    chat_pb2_grpc.add_ChatServiceServicer_to_server(
        ChatService(engine, tokenizer, stop_ids, buffer, limits, rollout), server
    )
    feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(
        FeedbackService(buffer, rollout), server
    )
    model_pb2_grpc.add_ModelServiceServicer_to_server(
        ModelService(
            engine,
            rollout,
            registry,
            watcher.rejected,
            info.name,
            str(config.model),
            time.time(),
            config.admin_token,
        ),
        server,
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"--port: cannot listen on {config.host}:{config.port}")
    metrics_http, _ = prometheus_client.start_http_server(config.metrics_port, addr=config.host)
    server.start()
    for name in ("", *SERVICES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(
        server,
        port,
        metrics_http.server_port,
        engine,
        watcher,
        rollout,
        buffer,
        health_servicer,
        metrics_http,
    )


def serve(config: ServeConfig) -> int:
    running = start(config)
    print(
        f"kaizen serve: gRPC on {config.host}:{running.port}, metrics on "
        f"http://{config.host}:{running.metrics_port}/metrics, serving {running.engine.version}",
        flush=True,
    )
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    stopping.wait()
    log.info("shutting down: finishing requests in flight")
    running.stop()
    return 0
