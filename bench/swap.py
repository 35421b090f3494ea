"""`kaizen bench swap`: what hot swaps cost the requests in flight, and whether any mixes versions.

1. Start `kaizen serve`, publish one adapter and wait until it serves (its install, the
   first of the process, wraps the model's layers: `first_install_ms`), then run the
   load alone: latency without swaps, serving an adapter as in phase 3.
2. Build random LoRA adapters (enough for phase 3 at --publish-every-s, from phase 1's
   duration) while the server idles, so that publishing under load is only a file copy.
3. Run the same load while a thread publishes a new version every --publish-every-s
   seconds (the first at once) and another polls GetModelInfo every 50 ms: latency with
   swaps, the decode loop's pause per install, and the time from publish to serving.
4. Stop the server and recompute every answer's logged log-probabilities under each
   published version (bench/verify.py): an answer not reproduced by the version it is
   tagged with, or reproduced better by another, mixes versions.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import torch

from bench.config import SwapBench
from bench.load import LoadResult, kaizen_server, percentile, run_load, say, warm_up
from bench.report import environment
from bench.verify import TOLERANCE, VersionModels, check
from kaizen import modeling
from kaizen.buffer import open_buffer
from kaizen.registry import BASE_VERSION, Registry, version_number
from kaizen.v1 import model_pb2, model_pb2_grpc

POLL_S = 0.05  # how often GetModelInfo is asked which version is serving
MAX_ADAPTERS = 64
LORA = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}


def run(config: SwapBench) -> dict[str, object]:
    info = modeling.model_info(config.model)
    device = modeling.pick_device("auto")
    dtype = modeling.pick_dtype(config.dtype, device)
    N, C, T = config.requests, config.concurrency, config.new_tokens
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="kaizen-bench-swap-") as tmp:
        workdir = Path(tmp)
        say(f"starting kaizen serve on {info.name} ({config.dtype}) in {workdir}")
        with kaizen_server(config.model.resolve(), workdir, C, T, config.dtype) as server:
            registry = Registry(server.registry_dir)
            say(f"publishing a first adapter (r={LORA['r']}): both phases serve an adapter")
            (first_adapter,) = build_adapters(config.model, workdir / "first", 1, seed=10_000)
            first = publish(registry, first_adapter, info.name)
            first_install_ms = wait_serving_version(server.channel, first).install_ms
            warm_up(server.channel, T, C)
            say(f"phase 1, no swaps: {N} requests of {T} tokens, {C} at a time")
            calm = run_load(server.channel, N, C, T, first_seed=1)
            count = min(MAX_ADAPTERS, math.ceil(2 * calm.wall_s / config.publish_every_s) + 2)
            say(f"building {count} random LoRA adapters (r={LORA['r']})")
            adapters = build_adapters(config.model, workdir / "adapters", count)
            say(f"phase 2, a new version every {config.publish_every_s} s: the same load")
            publisher = Publisher(registry, adapters, info.name, config.publish_every_s)
            poller = ServingPoller(server.channel)
            with poller, publisher:
                swapping = run_load(server.channel, N, C, T, first_seed=1 + N)
        server_exit_code = server.exit_code

        published = publisher.published
        answers = (*calm.ok, *swapping.ok)
        say(f"checking {len(answers)} answers against v0 and {len(published)} published versions")
        buffer = open_buffer(server.buffer_url)
        try:
            logged = [buffer.generation(r.response_id) for r in answers]
        finally:
            buffer.close()
        generations = [g for g in logged if g is not None]
        versions = [BASE_VERSION, first, *published]
        models = VersionModels(config.model, registry, versions, device, dtype)
        verdicts = check(models, generations, TOLERANCE[dtype])

    for v in verdicts:
        if v.mixed:
            say(
                f"mixed: {v.response_id} tagged {v.tagged} (diff {v.diff_tagged:.4f}), "
                f"best fit {v.best} (diff {v.diff_best:.4f})"
            )
    diffs = [v.diff_tagged for v in verdicts if math.isfinite(v.diff_tagged)]
    swapped = poller.swapped()
    install_ms = [s.install_ms for s in swapped if s.install_ms > 0]
    publish_to_serving_ms = [
        (_unix_s(s.serving_since) - _unix_s(s.published_at)) * 1e3
        for s in swapped
        if s.HasField("published_at")
    ]
    if swapped and not install_ms:
        say("warning: GetModelInfo reports no install_ms for the versions it swapped in")
    p99_calm = calm.latency_ms()["latency_p99_ms"]
    p99_swapping = swapping.latency_ms()["latency_p99_ms"]
    records = [*calm.records, *swapping.records]
    tokens = [r.completion_tokens for r in records if r.ok]
    return {
        "swaps": len(swapped),
        "requests": N,
        "failed_requests": sum(not r.ok for r in records),
        "failed_by_code": dict(Counter(calm.errors) + Counter(swapping.errors)),
        "mixed_version_responses": sum(v.mixed for v in verdicts),
        "responses_checked": len(verdicts),
        "unlogged_responses": len(logged) - len(generations),
        "logprob_diff_max": _round(max(diffs, default=None), 5),
        "logprob_tolerance": TOLERANCE[dtype],
        "p99_ms_with_swaps": p99_swapping,
        "p99_ms_without_swaps": p99_calm,
        "p99_ratio": _round(_ratio(p99_swapping, p99_calm), 3),
        "p50_ms_with_swaps": swapping.latency_ms()["latency_p50_ms"],
        "p50_ms_without_swaps": calm.latency_ms()["latency_p50_ms"],
        "tokens_per_s_with_swaps": round(swapping.tokens_per_s, 1),
        "tokens_per_s_without_swaps": round(calm.tokens_per_s, 1),
        "swap_pause_ms_p50": _round(percentile(install_ms, 50), 1),
        "swap_pause_ms_p99": _round(percentile(install_ms, 99), 1),
        "swap_pause_ms_max": _round(max(install_ms, default=None), 1),
        "first_install_ms": _round(first_install_ms, 1),
        "publish_to_serving_ms_p50": _round(percentile(publish_to_serving_ms, 50), 1),
        "versions_published": len(published),
        "answers_by_version_with_swaps": _answers_by_version(swapping),
        "completion_tokens_min": min(tokens, default=0),
        "completion_tokens_max": max(tokens, default=0),
        "concurrency": C,
        "new_tokens": T,
        "publish_every_s": config.publish_every_s,
        "server_exit_code": server_exit_code,
        **environment(device, dtype, info.name),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def build_adapters(model_dir: Path, out: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` random LoRA adapters for the base model, each saved in its own directory.

    init_lora_weights=False leaves both LoRA matrices at nn.Linear's default init, so B is
    not zero as usual but uniform in ±1/√r: at alpha/r = 2 that moves the tokens' log-probs
    by ~0.3 nats on the tiny test model and ~0.6 on SmolLM2-135M, far above the tolerance
    of the version check. Each adapter redraws them from that distribution with its seed.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = modeling.load_model(model_dir, torch.device("cpu"), torch.float32)
    model = get_peft_model(base, LoraConfig(**LORA, init_lora_weights=False))
    lora = [p for name, p in model.named_parameters() if "lora_" in name]
    paths = []
    for k in range(count):
        generator = torch.Generator().manual_seed(seed + k)
        with torch.no_grad():
            for p in lora:  # (out, in): A is (r, d_in), B is (d_out, r)
                bound = 1 / math.sqrt(p.shape[1])
                p.uniform_(-bound, bound, generator=generator)
        model.save_pretrained(out / f"adapter-{k:03d}")
        paths.append(out / f"adapter-{k:03d}")
    return paths


def publish(registry: Registry, adapter: Path, base_model: str) -> str:
    """Publish a prebuilt adapter directory as the next version; return its name."""
    with registry.publish(base_model, {"bench_adapter": adapter.name}) as staging:
        for f in adapter.iterdir():
            shutil.copyfile(f, staging / f.name)
    return registry.latest()


def wait_serving_version(
    channel: grpc.Channel, version: str, timeout_s: float = 120.0
) -> model_pb2.ServedVersion:
    stub = model_pb2_grpc.ModelServiceStub(channel)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        serving = stub.GetModelInfo(model_pb2.GetModelInfoRequest(), timeout=10).versions[0]
        if serving.version == version:
            return serving
        time.sleep(POLL_S)
    raise RuntimeError(f"the server did not serve {version} within {timeout_s:g} s")


class Publisher:
    """Publishes the prebuilt adapters as new versions, one every `every_s` seconds."""

    def __init__(
        self, registry: Registry, adapters: list[Path], base_model: str, every_s: float
    ) -> None:
        self.registry = registry
        self.adapters = adapters
        self.base_model = base_model
        self.every_s = every_s
        self.published: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-publisher", daemon=True)

    def __enter__(self) -> Publisher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        for adapter in self.adapters:
            self.published.append(publish(self.registry, adapter, self.base_model))
            if self._stop.wait(self.every_s):
                return
        say(f"warning: all {len(self.adapters)} adapters published before the load ended")


class ServingPoller:
    """Asks GetModelInfo every POLL_S which version is serving; keeps each one's first sight."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.stub = model_pb2_grpc.ModelServiceStub(channel)
        self.seen: dict[str, model_pb2.ServedVersion] = {}  # in the order first seen
        self.errors: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-poller", daemon=True)

    def __enter__(self) -> ServingPoller:
        self._poll()  # the version serving before any publish
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.errors:
            say(f"warning: GetModelInfo failed during the load: {dict(self.errors)}")

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self._poll()

    def _poll(self) -> None:
        try:
            info = self.stub.GetModelInfo(model_pb2.GetModelInfoRequest(), timeout=10)
        except grpc.RpcError as exc:
            self.errors[exc.code().name] += 1
            return
        serving = info.versions[0]
        self.seen.setdefault(serving.version, serving)

    def swapped(self) -> list[model_pb2.ServedVersion]:
        """The versions seen serving after the first one."""
        return list(self.seen.values())[1:]


def _answers_by_version(load: LoadResult) -> dict[str, int]:
    counts = Counter(r.model_version for r in load.ok)
    return {v: counts[v] for v in sorted(counts, key=version_number)}


def _unix_s(ts) -> float:
    return ts.ToNanoseconds() / 1e9


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
