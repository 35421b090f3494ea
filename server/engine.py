"""The decode loop: batches concurrent requests and installs new weights between batches.

One thread owns the model. It takes every request waiting (up to `max_batch`), decodes
them together — left-padded prefill, then one token per row per step with a shared KV
cache — and streams each row's tokens to its caller. Each row has its own sampling
parameters and random generator. New weights are installed only between two batches,
so every answer comes from exactly one version, which tags it.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from kaizen.errors import ResourceExhausted, Unavailable
from kaizen.events import Sampling
from kaizen.registry import BASE_VERSION, version_number
from server import metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Token:
    token_id: int
    logprob: float  # log μ(token) under the row's sampling distribution


@dataclass(frozen=True)
class Finished:
    version: str
    finish_reason: str  # "stop" | "length" | "cancelled"


@dataclass(frozen=True)
class Failed:
    error: BaseException


@dataclass
class Request:
    """A prompt waiting for, or being decoded in, a batch. Events arrive on `events`."""

    prompt_ids: list[int]
    sampling: Sampling  # seed already resolved (never 0)
    events: queue.Queue = field(default_factory=queue.Queue)  # Token* then Finished | Failed
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter read from the registry, ready to install."""

    version: str
    config: object  # peft.LoraConfig
    state_dict: dict[str, torch.Tensor]
    manifest_sha256: str
    published_at: float


@dataclass(frozen=True)
class Serving:
    """What the decode loop serves now; replaced whole, so readers never see half a swap."""

    version: str
    adapter: Adapter | None  # None for v0, the base model
    since: float  # unix seconds


def resolve_seed(sampling: Sampling) -> Sampling:
    if sampling.seed:
        return sampling
    return Sampling(
        sampling.max_new_tokens, sampling.temperature, sampling.top_p, secrets.randbits(63) or 1
    )


def sample_rows(
    logits: torch.Tensor, rows: list[Sampling], generators: list[torch.Generator]
) -> tuple[list[int], list[float]]:
    """Draw one token per row; return the tokens and their log-probabilities under the
    distribution each row actually sampled from (temperature, then nucleus)."""
    logits = logits.float()  # (B, V)
    tokens, logprobs = [], []
    for i, s in enumerate(rows):
        if s.temperature <= 0:  # greedy: the chosen token had probability 1
            tokens.append(int(logits[i].argmax()))
            logprobs.append(0.0)
            continue
        logp = torch.log_softmax(logits[i] / s.temperature, dim=-1)  # (V,)
        if s.top_p < 1.0:
            sorted_logp, order = logp.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always)
            mass_before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()
            sorted_logp = sorted_logp.masked_fill(mass_before >= s.top_p, float("-inf"))
            logp = torch.full_like(logp, float("-inf")).scatter(0, order, sorted_logp)
            logp = torch.log_softmax(logp, dim=-1)
        token = int(torch.multinomial(logp.exp(), 1, generator=generators[i]))
        tokens.append(token)
        logprobs.append(float(logp[token]))
    return tokens, logprobs


class Engine:
    def __init__(
        self,
        model,
        stop_ids: set[int],
        pad_id: int,
        device: torch.device,
        max_batch: int = 16,
        max_queue: int = 256,
    ) -> None:
        self.base = model
        self.peft = None  # a PeftModel wrapping `base`, from the first installed adapter on
        self.stop_ids = stop_ids
        self.pad_id = pad_id
        self.device = device
        self.max_batch = max_batch
        self.serving = Serving(BASE_VERSION, None, time.time())
        self.swaps = 0
        self.failed: dict[str, str] = {}  # version -> why installing it failed
        self._waiting: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self._staged: Adapter | None = None
        self._staged_lock = threading.Lock()
        self._running = threading.Event()
        self._thread: threading.Thread | None = None
        metrics.SERVING_VERSION.set(0)

    # -- called from RPC threads -------------------------------------------------------

    def submit(self, request: Request) -> Request:
        if not self._running.is_set():
            raise Unavailable("the server is not serving (starting up or shutting down)")
        try:
            self._waiting.put_nowait(request)
        except queue.Full:
            raise ResourceExhausted(
                f"server busy: {self._waiting.maxsize} requests already waiting (--max-queue)"
            ) from None
        metrics.QUEUE_DEPTH.set(self._waiting.qsize())
        return request

    # -- called from the registry watcher ----------------------------------------------

    def stage(self, adapter: Adapter) -> None:
        """Install `adapter` at the next batch boundary (a newer staged one replaces it)."""
        with self._staged_lock:
            if self._staged is None or version_number(adapter.version) > version_number(
                self._staged.version
            ):
                self._staged = adapter

    def newest_known(self) -> str:
        with self._staged_lock:
            staged = self._staged
        return staged.version if staged is not None else self.version

    # -- the decode thread -------------------------------------------------------------

    def start(self) -> None:
        self._running.set()
        self._thread = threading.Thread(target=self._loop, name="kaizen-decode", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._running.clear()
        if self._thread is not None:
            self._thread.join()
        while True:  # nobody will decode these any more: tell their callers
            try:
                self._waiting.get_nowait().events.put(Failed(Unavailable("server shut down")))
            except queue.Empty:
                break

    def _loop(self) -> None:
        while self._running.is_set():
            self.install_staged()
            try:
                first = self._waiting.get(timeout=0.05)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._waiting.get_nowait())
                except queue.Empty:
                    break
            metrics.QUEUE_DEPTH.set(self._waiting.qsize())
            batch = [r for r in batch if not self._drop_if_cancelled(r)]
            if not batch:
                continue
            metrics.BATCH_SIZE.observe(len(batch))
            try:
                self._decode(batch)
            except Exception as exc:
                log.exception("decoding a batch of %d failed", len(batch))
                for r in batch:
                    r.events.put(Failed(exc))

    def _drop_if_cancelled(self, r: Request) -> bool:
        if r.cancelled.is_set():
            r.events.put(Finished(self.version, "cancelled"))
            return True
        return False

    def install_staged(self) -> None:
        with self._staged_lock:
            adapter, self._staged = self._staged, None
        if adapter is None or version_number(adapter.version) <= version_number(self.version):
            return
        started = time.perf_counter()
        try:
            self._install(adapter)
        except Exception as exc:
            log.exception("installing %s failed; still serving %s", adapter.version, self.version)
            self.failed[adapter.version] = f"install failed: {exc}"
            metrics.SWAPS.labels("failed").inc()
            return
        pause = time.perf_counter() - started
        metrics.SWAP_PAUSE_SECONDS.observe(pause)
        metrics.SWAPS.labels("ok").inc()
        metrics.SERVING_VERSION.set(version_number(adapter.version))
        log.info(
            "now serving %s (was %s; swap took %.1f ms)", adapter.version, self.version, pause * 1e3
        )
        self.serving = Serving(adapter.version, adapter, time.time())  # one atomic store
        self.swaps += 1

    def _install(self, adapter: Adapter) -> None:
        from peft import PeftModel, set_peft_model_state_dict

        name = adapter.version
        first = self.peft is None
        if first:
            self.peft = PeftModel(self.base, adapter.config, adapter_name=name)
        else:
            self.peft.add_adapter(name, adapter.config)
        try:
            result = set_peft_model_state_dict(self.peft, adapter.state_dict, adapter_name=name)
            missing = [k for k in result.missing_keys if name in k and "lora_" in k]
            if result.unexpected_keys or missing:
                raise ValueError(
                    f"{name}: adapter does not fit the base model "
                    f"(unexpected {result.unexpected_keys[:3]}, missing {missing[:3]})"
                )
        except Exception:
            if first:  # take the LoRA layers out again: the base model serves as before
                self.base, self.peft = self.peft.unload(), None
            else:
                self.peft.delete_adapter(name)
            raise
        self.peft.set_adapter(name)
        self.peft.eval()
        old = self.version
        if old != BASE_VERSION and old in self.peft.peft_config:
            self.peft.delete_adapter(old)

    @property
    def version(self) -> str:
        return self.serving.version

    @property
    def model(self):
        return self.peft if self.peft is not None else self.base

    @torch.inference_mode()
    def _decode(self, batch: list[Request]) -> None:
        version = self.version
        B = len(batch)
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, width), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding: every row's last prompt token aligns
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, width)
        cache = DynamicCache()
        generators = [
            torch.Generator(device=self.device).manual_seed(r.sampling.seed) for r in batch
        ]
        rows = [r.sampling for r in batch]
        done = [False] * B
        produced = [0] * B
        steps = max(r.sampling.max_new_tokens for r in batch)
        model = self.model
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        for step in range(steps):
            tokens, logprobs = sample_rows(out.logits[:, -1, :], rows, generators)
            metrics.GENERATED_TOKENS.labels(version).inc(done.count(False))
            for i, r in enumerate(batch):
                if done[i]:
                    continue
                r.events.put(Token(tokens[i], logprobs[i]))
                produced[i] += 1
                reason = None
                if tokens[i] in self.stop_ids:
                    reason = "stop"
                elif produced[i] >= r.sampling.max_new_tokens:
                    reason = "length"
                elif r.cancelled.is_set():
                    reason = "cancelled"
                if reason is not None:
                    done[i] = True
                    r.events.put(Finished(version, reason))
            if all(done) or step == steps - 1:
                break
            next_ids = torch.tensor(
                [[self.pad_id if done[i] else tokens[i]] for i in range(B)], device=self.device
            )
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=self.device)], -1)
            positions = positions[:, -1:] + 1
            out = model(
                input_ids=next_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
