"""The decode loop: iteration-level (continuous) batching over LoRA versions of one base.

One thread owns the model. Each iteration it seats waiting requests in free slots of the
preallocated KV cache (server/kvcache.py), decodes one token for every row whose prompt is
cached, prefills the next piece of the seated prompts (at most `prefill_chunk` tokens in
one forward, so a long prompt takes several iterations while the others keep decoding),
streams each row's token to its caller, and evicts rows that finished or were cancelled —
so a freed slot is refilled at the next step, not when the whole batch ends. Joining and
leaving move no cached keys or values: a row is a slot index. The chat template's shared
start (its system turn) is computed once per version: later rows of that version get a
copy of its keys and values in their slot and prefill only what follows.

Every row is pinned at admission to one version (the serving one, or another version the
request names, such as a canary) and decoded with that version's adapter for its whole
life: peft's mixed-batch LoRA forward gives each row its own adapter inside one batch. A
new version is copied into a free adapter slot between two steps; rows already running
finish on the version they started with, so no answer mixes versions.
"""

from __future__ import annotations

import collections
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field

import torch

from kaizen.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from kaizen.events import Sampling
from kaizen.registry import BASE_VERSION, version_number
from kaizen.sampling import processed_logprobs
from server import metrics
from server.kvcache import SlotCache, attention_shape
from server.lora import FoldedLora, foldable

log = logging.getLogger(__name__)
LATE_DECISION_S = 60.0  # a decision the loop has taken is applied within this, or it is dead

BASE_SLOT = "__base__"  # peft's name for "no adapter" in a mixed batch
# With no row decoding, no one's next token waits on a prefill: one forward may take this
# many pieces' worth (a wave of 16 chat prompts at once, rather than in two steps that
# each delay the rows the first one started), still bounded so that a long prompt's
# forward and its activations stay a few pieces in size.
IDLE_PREFILL_PIECES = 8


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
    """A prompt waiting for, or being decoded in, the batch. Events arrive on `events`."""

    prompt_ids: list[int]
    sampling: Sampling  # seed already resolved (never 0)
    version: str | None = None  # pin to this loaded version; None = the serving one
    canary: bool = False  # (unpinned) decode with the canary version while there is one
    events: queue.Queue = field(default_factory=queue.Queue)  # Token* then Finished | Failed
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)
    _state: str = "waiting"  # -> "running" (admitted) | "expired" (waited too long)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def cancel(self) -> None:
        self.cancelled.set()

    def admit(self) -> bool:
        """Called by the decode loop; False if the caller already gave up waiting."""
        with self._lock:
            if self._state != "waiting":
                return False
            self._state = "running"
            return True

    def expire(self) -> bool:
        """Called by the caller; False if the decode loop already admitted the request."""
        with self._lock:
            if self._state != "waiting":
                return False
            self._state = "expired"
            return True

    @property
    def waiting(self) -> bool:
        return self._state == "waiting"

    @property
    def dead(self) -> bool:
        return self.cancelled.is_set() or self._state == "expired"


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
    """A version the decode loop serves; replaced whole, so readers never see half a swap."""

    version: str
    adapter: Adapter | None  # None for v0, the base model
    since: float  # unix seconds
    install_ms: float = 0.0  # how long the decode loop paused to install it


def resolve_seed(sampling: Sampling) -> Sampling:
    if sampling.seed:
        return sampling
    return Sampling(
        sampling.max_new_tokens,
        sampling.temperature,
        sampling.top_p,
        secrets.randbits(63) or 1,
        sampling.ignore_eos,
    )


def sample_rows(
    logits: torch.Tensor, rows: list[Sampling], generators: list[torch.Generator]
) -> tuple[list[int], list[float]]:
    """Draw one token per row; return the tokens and their log-probabilities under the
    distribution each row actually sampled from (temperature, then nucleus).

    The distribution is `kaizen.sampling`'s, the one the learner scores its importance
    ratios against. Everything runs once for the whole batch except one uniform draw per
    row from the row's own generator, so a seed reproduces its answer in any batch: the
    token is where that uniform falls in the row's cumulative distribution (inverse CDF).
    Sixteen `torch.multinomial` calls, one per generator, cost 18 ms a step on this
    machine's CPU, a fifth of the step; the batched cumsum and search cost about 1 ms.
    The cumulative sum is float32 and in place: each token's width in it is its
    probability to within half an ulp of the running sum (≤ 6e-8), a token of probability
    0 has width exactly 0, and a second (float64) buffer of B × V had cost 3 ms a step in
    page faults.
    """
    logits = logits.float()  # (B, V)
    device = logits.device
    temps = torch.tensor([s.temperature for s in rows], device=device)
    top_p = torch.tensor([s.top_p for s in rows], device=device)
    logp = processed_logprobs(logits, temps, top_p)  # (B, V)
    cdf = logp.exp().cumsum_(-1)  # (B, V)
    draws = torch.cat(
        [torch.rand(1, generator=g, device=device) for g in generators]
    )  # (B,) one per row, from its own generator
    # first token whose cumulative mass exceeds the draw: never one of probability 0
    drawn = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True)
    drawn = drawn.clamp_(max=logits.shape[-1] - 1)[:, 0]  # (B,)
    greedy = temps <= 0  # the chosen token had probability 1: logged as 0
    tokens = torch.where(greedy, logits.argmax(-1), drawn) if greedy.any() else drawn
    logprobs = logp.gather(1, tokens[:, None])[:, 0].masked_fill(greedy, 0.0)
    return tokens.tolist(), logprobs.tolist()


class WaitQueue:
    """Bounded FIFO of live requests; cancelled or expired ones do not take a place."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: collections.deque[Request] = collections.deque()
        self._ready = threading.Condition()

    def put(self, request: Request) -> None:
        with self._ready:
            if len(self._items) >= self.maxsize:
                self._items = collections.deque(r for r in self._items if not r.dead)
            if len(self._items) >= self.maxsize:
                raise ResourceExhausted(
                    f"server busy: {self.maxsize} requests already waiting (--max-queue)"
                )
            self._items.append(request)
            self._ready.notify()

    def take(self, n: int, wait_s: float) -> list[Request]:
        """Up to `n` requests; waits up to `wait_s` for the first one."""
        with self._ready:
            if not self._items and wait_s > 0:
                self._ready.wait(wait_s)
            taken = []
            while self._items and len(taken) < n:
                taken.append(self._items.popleft())
            return taken

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class _Row:
    """A request being decoded (decode thread only)."""

    request: Request
    version: str
    slot: str  # peft adapter name, or BASE_SLOT
    generator: torch.Generator
    produced: int = 0
    last: int = 0  # the token sampled last, fed at the next step
    kv_slot: int = -1  # its slot in the KV cache, from admission on
    cached: int = 0  # prompt tokens in its KV slot; decoding once it is the whole prompt

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.request.prompt_ids)


def attention_mask(model, mask: torch.Tensor) -> torch.Tensor:
    """The slot cache's boolean mask as `model`'s attention takes it (eager adds a float one)."""
    if model.config._attn_implementation == "sdpa":
        return mask
    dtype = model.get_input_embeddings().weight.dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask, torch.finfo(dtype).min
    )


def attention_keys_per_token(config) -> float:
    """How many cached keys one query attends over for the multiply-adds that one token
    costs in a layer's weights (the projections and the MLP): the context at which a
    prefill token's attention costs as much again as the rest of it."""
    heads, kv_heads, head_dim = attention_shape(config)
    text = config.get_text_config()
    hidden = text.hidden_size
    inner = getattr(text, "intermediate_size", None) or 4 * hidden
    weights = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * inner
    return weights / (2 * heads * head_dim)  # per key: q·k and the weighted v


class _Batch:
    """The running batch: the row in each occupied slot of the KV cache."""

    def __init__(self, cache: SlotCache) -> None:
        self.cache = cache
        self.seats: list[_Row | None] = [None] * cache.max_batch  # by KV slot
        self.prefilling: list[_Row] = []  # seated rows whose prompt is not all cached, FIFO

    @property
    def rows(self) -> list[_Row]:
        return [row for row in self.seats if row is not None]

    @property
    def decoding(self) -> list[_Row]:
        return [row for row in self.seats if row is not None and not row.prefilling]

    def __len__(self) -> int:
        return self.cache.max_batch - self.cache.free_slots

    def seat(self, row: _Row) -> None:
        """A KV slot for a newcomer, which starts by prefilling its prompt."""
        row.kv_slot = self.cache.take()
        self.seats[row.kv_slot] = row
        self.prefilling.append(row)

    def leave(self, row: _Row) -> None:
        self.seats[row.kv_slot] = None
        self.cache.release(row.kv_slot)
        if row in self.prefilling:
            self.prefilling.remove(row)

    def clear(self) -> None:
        self.seats = [None] * self.cache.max_batch
        self.prefilling = []
        self.cache.reset()


def _config_key(config) -> tuple:
    """What must match for an adapter's weights to be copied into another's slot."""
    return (
        config.r,
        config.lora_alpha,
        tuple(sorted(config.target_modules)),
        config.use_rslora,
        config.use_dora,
        str(config.rank_pattern),
        str(config.alpha_pattern),
        config.bias,
        tuple(config.modules_to_save or ()),
    )


class Engine:
    def __init__(
        self,
        model,
        stop_ids: set[int],
        pad_id: int,
        device: torch.device,
        max_batch: int = 16,
        max_queue: int = 256,
        max_queue_wait_s: float = 30.0,
        max_len: int | None = None,
        prefix_ids: list[int] | None = None,
        prefill_chunk: int = 128,
    ) -> None:
        """`max_len`: tokens one request may hold in the KV cache (prompt and answer), by
        default the model's context; the server refuses longer requests at the door.
        `prefix_ids`: the tokens most prompts begin with (the chat template's system turn):
        their keys and values are computed once per version and copied into each slot
        that needs them. `prefill_chunk`: token-equivalents one prefill forward computes
        at most while rows decode (`_prefill_plan`), so a long prompt is prefilled over
        several steps while the running rows go on decoding."""
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, not {prefill_chunk}")
        self.prefix_ids = list(prefix_ids or [])
        self.prefill_chunk = prefill_chunk
        self._keys_per_token = attention_keys_per_token(model.config)
        self._prefixes: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # by version
        self.base = model
        self.peft = None  # a PeftModel wrapping `base`, from the first installed adapter on
        self.stop_ids = stop_ids
        self.pad_id = pad_id
        self.device = device
        self.max_batch = max_batch
        self.max_queue_wait_s = max_queue_wait_s
        self.serving = Serving(BASE_VERSION, None, time.time())
        self.canary: Serving | None = None
        self.swaps = 0
        self.failed: dict[str, str] = {}  # version -> why installing it failed
        self._waiting = WaitQueue(max_queue)
        self._staged: dict[str, Adapter] = {}  # role ("serving" | "canary") -> adapter
        self._staged_lock = threading.RLock()
        self._decisions: list[tuple[str, str, threading.Event, list[bool]]] = []
        self._slots: dict[str, str | None] = {}  # peft adapter name -> version it holds
        self._slot_keys: dict[str, tuple] = {}
        self._next_slot = 0
        self._active_slot: str | None = None  # peft's active adapter, for one-slot steps
        self._slot_params: dict[str, dict[str, torch.Tensor]] = {}
        self._slot_foldable: dict[str, bool] = {}
        self._fold: FoldedLora | None = None  # from the first installed adapter on
        self._batch = _Batch(self._make_cache(model, max_batch, max_len))
        self._running = threading.Event()
        self._thread: threading.Thread | None = None
        self.beat = time.monotonic()  # the decode loop's last sign of life (each iteration)
        metrics.SERVING_VERSION.set(0)

    @staticmethod
    def _make_cache(model, max_batch: int, max_len: int | None) -> SlotCache:
        config = model.config
        if config._attn_implementation not in ("sdpa", "eager"):
            raise ValueError(
                f"the slot KV cache feeds a 4-D mask to sdpa or eager attention; the model "
                f"uses {config._attn_implementation!r}"
            )
        weight = model.get_input_embeddings().weight
        max_len = max_len or config.get_text_config().max_position_embeddings
        cache = SlotCache(config, max_batch, max_len, weight.dtype, weight.device)
        log.info(
            "KV cache: %d slots of %d tokens, %.2f GiB (%s, %s)",
            max_batch,
            max_len,
            cache.nbytes / 2**30,
            weight.dtype,
            weight.device,
        )
        return cache

    # -- called from RPC threads -------------------------------------------------------

    def submit(self, request: Request) -> Request:
        if not self._running.is_set():
            raise Unavailable("the server is not serving (starting up or shutting down)")
        if request.version is not None and request.version not in self.loaded_versions():
            raise InvalidArgument("version", f"{request.version} is not loaded on this server")
        self._waiting.put(request)
        metrics.QUEUE_DEPTH.set(len(self._waiting))
        return request

    def loaded_versions(self) -> set[str]:
        versions = {self.serving.version}
        canary = self.canary
        if canary is not None:
            versions.add(canary.version)
        return versions

    # -- called from the registry watcher ----------------------------------------------

    def stage(self, adapter: Adapter, role: str = "serving") -> None:
        """Install `adapter` between two decode steps (a newer staged one replaces it)."""
        with self._staged_lock:
            staged = self._staged.get(role)
            if staged is None or version_number(adapter.version) > version_number(staged.version):
                self._staged[role] = adapter

    def newest_known(self) -> str:
        """The newest version served, canaried or staged."""
        with self._staged_lock:
            known = [a.version for a in self._staged.values() if a is not None]
        known.append(self.version)
        canary = self.canary
        if canary is not None:
            known.append(canary.version)
        return max(known, key=version_number)

    def restore(self, adapter: Adapter | None) -> None:
        """Serve `adapter` (None: the base model) from the next step on, even though it is
        older than the serving version: an operator's rollback."""
        with self._staged_lock:
            self._staged["restore"] = adapter

    def wait_serving(self, version: str, timeout_s: float = 10.0) -> bool:
        """Wait until the decode loop serves `version` (after `restore`)."""
        deadline = time.monotonic() + timeout_s
        while self.serving.version != version:
            if time.monotonic() > deadline or not self._running.is_set():
                return False
            time.sleep(0.005)
        return True

    # -- rollout decisions (any thread; applied by the decode loop between two steps) ----

    def promote_canary(self, version: str, timeout_s: float = 10.0) -> bool:
        """The canary becomes the serving version. False if `version` is not the canary
        (never installed, failed, or already gone) or if the decode loop did not take the
        decision within `timeout_s`: then the decision is withdrawn, so False always
        means it was not promoted, now or later."""
        return self._decide("promote", version, timeout_s, withdraw=True)

    def drop_canary(self, version: str, timeout_s: float = 10.0) -> bool:
        """Stop routing to the canary (its rows finish on it). False if it is not the canary,
        or not yet: a drop the loop has not taken in `timeout_s` stays queued and applies
        at the next step (dropping is always safe)."""
        return self._decide("drop", version, timeout_s, withdraw=False)

    def _decide(self, op: str, version: str, timeout_s: float, withdraw: bool) -> bool:
        if not self._running.is_set():  # no decode loop (starting, stopping): apply here
            with self._staged_lock:
                self.install_staged()
                return self._apply(op, version)
        entry = (op, version, threading.Event(), [])
        done, result = entry[2], entry[3]
        with self._staged_lock:
            self._decisions.append(entry)
        if done.wait(timeout_s) or not withdraw:
            return bool(result and result[0])
        with self._staged_lock:
            if any(e is entry for e in self._decisions):  # never taken: nothing happened
                self._decisions = [e for e in self._decisions if e is not entry]
                log.warning("%s of %s withdrawn: the decode loop did not take it", op, version)
                return False
        done.wait(LATE_DECISION_S)  # the loop holds it: it is being applied right now
        return bool(result and result[0])

    def unstage_restore(self, adapter: Adapter | None) -> bool:
        """Withdraw a `restore` the decode loop has not taken yet; False if it has."""
        with self._staged_lock:
            if "restore" in self._staged and self._staged["restore"] is adapter:
                del self._staged["restore"]
                return True
        return False

    def _apply(self, op: str, version: str) -> bool:
        canary = self.canary
        if canary is None or canary.version != version:
            return False
        if op == "promote":
            self.serving = Serving(canary.version, canary.adapter, time.time(), canary.install_ms)
            self.swaps += 1
            metrics.SERVING_VERSION.set(version_number(version))
        self.canary = None
        log.info("canary %s %s", version, "promoted to serving" if op == "promote" else "dropped")
        return True

    # -- the decode thread -------------------------------------------------------------

    def start(self) -> None:
        self._running.set()
        self._thread = threading.Thread(target=self._loop, name="kaizen-decode", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._running.clear()
        if self._thread is not None:
            self._thread.join()
        gone = Failed(Unavailable("server shut down"))
        for row in self._batch.rows:  # nobody will decode these any more: tell their callers
            row.request.events.put(gone)
        self._batch.clear()
        with self._staged_lock:  # nobody will apply these any more: release their callers
            for *_, done, _result in self._decisions:
                done.set()
            self._decisions = []
        while waiting := self._waiting.take(self.max_batch, 0):
            for r in waiting:
                r.events.put(gone)

    def alive(self, stuck_after_s: float) -> tuple[bool, str]:
        """Whether the decode loop runs and moves: (ok, why not)."""
        if self._thread is None or not self._thread.is_alive():
            return False, "the decode loop is not running"
        quiet = time.monotonic() - self.beat
        if quiet > stuck_after_s:
            return False, f"the decode loop has not moved for {quiet:.0f} s"
        return True, ""

    def _loop(self) -> None:
        while self._running.is_set():
            self.beat = time.monotonic()
            self.install_staged()
            try:
                self._iterate()
            except Exception as exc:
                log.exception("a decode step over %d rows failed", len(self._batch))
                for row in self._batch.rows:
                    row.request.events.put(Failed(exc))
                self._batch.clear()

    def _iterate(self) -> None:
        batch = self._batch
        newcomers = self._admit(
            self._waiting.take(self.max_batch - len(batch), wait_s=0 if len(batch) else 0.05)
        )
        for row in newcomers:  # all seated first: if a prefix forward fails, the loop
            batch.seat(row)  # fails every one of them with it
        for row in newcomers:
            self._copy_prefix(row)
        metrics.QUEUE_DEPTH.set(len(self._waiting))
        for row in list(batch.prefilling):  # a prefilling row has no token stream to end
            if row.request.cancelled.is_set():
                batch.leave(row)
                row.request.events.put(Finished(row.version, "cancelled"))
        if not len(batch):
            metrics.RUNNING.set(0)
            self._retire_slots()
            return
        started = time.perf_counter()
        metrics.RUNNING.set(len(batch))
        rows, logits = batch.decoding, []
        if rows:
            logits.append(self._decode_step(rows, batch.cache))
        if batch.prefilling:  # after the decode step: their slots were holes in it
            done, done_logits = self._prefill(batch, decoding=bool(rows))
            rows = rows + done
            logits.append(done_logits)
        if rows:
            self._sample_and_emit(rows, torch.cat(logits))
        metrics.DECODE_STEP.observe(time.perf_counter() - started)

    def _copy_prefix(self, row: _Row) -> None:
        """Put the shared prefix's keys and values in the newly seated row's slot when its
        prompt starts with the prefix."""
        prompt, n = row.request.prompt_ids, len(self.prefix_ids)
        if n and len(prompt) > n and prompt[:n] == self.prefix_ids:
            self._batch.cache.write_prefix(row.kv_slot, self._prefix_of(row))
            row.cached = n
            metrics.PREFIX_REUSED.inc()

    @torch.inference_mode()
    def _prefix_of(self, row: _Row) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The shared prefix's keys and values under the row's version: computed by one
        forward into a one-slot scratch cache the first time a row of the version needs
        them, so even the first wave of a new version's rows prefills only what follows."""
        prefix = self._prefixes.get(row.version)
        if prefix is None:
            n, layer = len(self.prefix_ids), self._batch.cache.layers[0]
            scratch = SlotCache(self.base.config, 1, n, layer.keys.dtype, layer.keys.device)
            mask, positions = scratch.plan_prefill([scratch.take()], [n], n)
            self._forward(
                [row],
                input_ids=torch.tensor([self.prefix_ids], device=self.device),
                attention_mask=attention_mask(self.base, mask),
                position_ids=positions,
                cache=scratch,
                logits_to_keep=1,
            )
            prefix = self._prefixes[row.version] = scratch.read_prefix(0, n)
            metrics.PREFILL_TOKENS.inc(n)
        return prefix

    def _admit(self, requests: list[Request]) -> list[_Row]:
        rows = []
        now = time.monotonic()
        for r in requests:
            if r.cancelled.is_set():
                continue  # the caller is gone; nobody reads its events
            if now - r.enqueued_at > self.max_queue_wait_s:
                if r.expire():
                    r.events.put(Failed(self.queue_deadline_error()))
                continue
            if not r.admit():
                continue  # expired while waiting: its caller already answered
            metrics.QUEUE_WAIT.observe(now - r.enqueued_at)
            canary = self.canary
            version = r.version or (
                canary.version if r.canary and canary is not None else self.serving.version
            )
            slot = self._slot_of(version)
            if slot is None:  # a pinned version retired while the request waited
                r.events.put(Failed(Unavailable(f"version {version} is no longer served")))
                continue
            need = len(r.prompt_ids) + r.sampling.max_new_tokens
            if need > self._batch.cache.max_len:
                r.events.put(Failed(self._too_long(need)))
                continue
            generator = torch.Generator(device=self.device).manual_seed(r.sampling.seed)
            rows.append(_Row(r, version, slot, generator))
        return rows

    def _too_long(self, need: int) -> InvalidArgument:
        return InvalidArgument(
            "max_new_tokens",
            f"the prompt and max_new_tokens need {need} tokens; a request may hold "
            f"{self._batch.cache.max_len} in the KV cache",
        )

    def queue_deadline_error(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"the request waited more than {self.max_queue_wait_s:g} s for a batch slot "
            "(--max-queue-wait-s); the server is overloaded"
        )

    def _slot_of(self, version: str) -> str | None:
        if version == BASE_VERSION:
            return BASE_SLOT
        for slot, held in self._slots.items():
            if held == version:
                return slot
        return None

    def _forward(self, rows: list[_Row], **inputs):
        if self.peft is None:
            return self.base(**inputs, use_cache=True)
        slots = {r.slot for r in rows}
        (slot,) = slots if len(slots) == 1 else (None,)
        if slot == BASE_SLOT:  # the base model's rows only: peft's adapters off
            self._fold.bare()
        elif slot is not None and self._folds(slot):
            self._fold.merged(slot)  # the serving version alone: its LoRA folded in
        elif slot is not None:
            # One adapter for every row: peft's plain path, 15-20 % faster than the
            # mixed-batch one (bench on SmolLM2-135M, bf16, B = 16).
            self._fold.unmerged()
            if self._active_slot != slot:
                self.peft.base_model.set_adapter(slot)
                self._active_slot = slot
        else:
            self._fold.unmerged()
            return self.peft(**inputs, use_cache=True, adapter_names=[r.slot for r in rows])
        return self.peft(**inputs, use_cache=True)

    def _folds(self, slot: str) -> bool:
        """Whether a forward of `slot` alone runs with its LoRA folded into the weights:
        the serving version's, while no canary is routed to and no seated row is on
        another version. Folding per forward instead (a mixed decode step, then a prefill
        of the new version's rows alone) flipped the layers twice a step while versions
        changed hands, and `kaizen bench swap` lost 15 % of its tokens/s to it."""
        alone = self.canary is None and self._slots.get(slot) == self.serving.version
        return (
            alone
            and self._slot_foldable[slot]
            and all(row.slot == slot for row in self._batch.rows)
        )

    @torch.inference_mode()
    def _decode_step(self, rows: list[_Row], cache: SlotCache) -> torch.Tensor:
        """One token for every decoding row (in slot order); their logits."""
        mask, positions = cache.plan_decode([row.kv_slot for row in rows])
        next_ids = torch.tensor([[row.last] for row in rows], device=self.device)
        out = self._forward(
            rows,
            input_ids=next_ids,
            attention_mask=attention_mask(self.base, mask),
            position_ids=positions,
            cache=cache,
        )
        return out.logits[:, -1, :]

    def _prefill_plan(self, waiting: list[_Row], budget: float) -> tuple[list[_Row], int]:
        """The prefilling rows (oldest first) whose next pieces fit one forward of at most
        `budget` token-equivalents, and the forward's width: at least one row, its piece
        cut to the budget.

        A forward of R rows × W columns whose pieces end at up to E cached tokens costs
        R·W·(1 + E/K): every token goes through the weights once, and attends over up to
        E keys at 1/K of that each (K from the model's shapes, `attention_keys_per_token`).
        Without the second term a 128-token piece cost 154 ms here at the start of a
        2,000-token prompt and 350 ms at its end, and the other rows' tokens waited for it.
        """
        keys = self._keys_per_token
        chosen, width, deepest = [], 0, 0
        for row in waiting:
            left = len(row.request.prompt_ids) - row.cached
            alone = max(1, int(budget / (1 + (row.cached + budget) / keys)))
            wider = max(width, min(left, alone))
            deeper = max(deepest, row.cached)
            if chosen and (len(chosen) + 1) * wider * (1 + (deeper + wider) / keys) > budget:
                break
            chosen.append(row)
            width, deepest = wider, deeper
        return chosen, width

    @torch.inference_mode()
    def _prefill(self, batch: _Batch, decoding: bool) -> tuple[list[_Row], torch.Tensor]:
        """The next piece of each chosen prefilling row's prompt, in one left-padded forward
        written into the rows' slots; returns the rows whose whole prompt is now cached,
        with their last-token logits, which their first token is sampled from."""
        budget = self.prefill_chunk * (1 if decoding else IDLE_PREFILL_PIECES)
        rows, width = self._prefill_plan(batch.prefilling, budget)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        pieces, starts = [], []
        for i, row in enumerate(rows):  # left padding: every row's last token aligns
            piece = row.request.prompt_ids[row.cached : row.cached + width]
            ids[i, width - len(piece) :] = torch.tensor(piece)
            pieces.append(len(piece))
            starts.append(row.cached)
        mask, positions = batch.cache.plan_prefill(
            [row.kv_slot for row in rows], pieces, width, starts
        )
        out = self._forward(
            rows,
            input_ids=ids.to(self.device),
            attention_mask=attention_mask(self.base, mask),
            position_ids=positions,
            cache=batch.cache,
            logits_to_keep=1,
        )
        metrics.PREFILL_TOKENS.inc(sum(pieces))
        done = []
        for i, row in enumerate(rows):
            row.cached += pieces[i]
            if not row.prefilling:
                batch.prefilling.remove(row)
                done.append(i)
        return [rows[i] for i in done], out.logits[done, -1, :]

    def _sample_and_emit(self, rows: list[_Row], logits: torch.Tensor) -> None:
        tokens, logprobs = sample_rows(
            logits, [r.request.sampling for r in rows], [r.generator for r in rows]
        )
        metrics.BATCH_SIZE.observe(len(rows))
        versions = collections.Counter(r.version for r in rows)
        if len(versions) > 1:
            metrics.MIXED_STEPS.inc()
        for version, n in versions.items():
            metrics.GENERATED_TOKENS.labels(version).inc(n)
        for i, row in enumerate(rows):
            r = row.request
            r.events.put(Token(tokens[i], logprobs[i]))
            row.produced += 1
            row.last = tokens[i]
            reason = None
            if tokens[i] in self.stop_ids and not r.sampling.ignore_eos:
                reason = "stop"
            elif row.produced >= r.sampling.max_new_tokens:
                reason = "length"
            elif r.cancelled.is_set():
                reason = "cancelled"
            if reason is not None:
                self._batch.leave(row)
                r.events.put(Finished(row.version, reason))

    # -- installing versions (decode thread, between two steps) -------------------------

    def install_staged(self) -> None:
        """Install what was staged, then apply the rollout decisions asked for since: a
        canary staged and dropped in the same breath is installed, then dropped."""
        with self._staged_lock:
            staged, self._staged = self._staged, {}
            decisions, self._decisions = self._decisions, []
        if "restore" in staged:
            self._restore(staged["restore"])
        for role in ("serving", "canary"):
            adapter = staged.get(role)
            if adapter is not None:
                self._install_role(adapter, role)
        for op, version, done, result in decisions:
            result.append(self._apply(op, version))
            done.set()

    def _restore(self, adapter: Adapter | None) -> None:
        if adapter is None:
            self.serving = Serving(BASE_VERSION, None, time.time())
        elif self._slot_of(adapter.version) is None:
            self._install_role(adapter, "serving", force=True)
            return
        else:  # still in a slot (rows decoding on it): no copy needed
            self.serving = Serving(adapter.version, adapter, time.time())
        self.swaps += 1
        metrics.SERVING_VERSION.set(version_number(self.serving.version))
        log.info("restored %s as the serving version", self.serving.version)

    def _install_role(self, adapter: Adapter, role: str, force: bool = False) -> None:
        current = self.serving
        if role == "serving" and not force:
            if version_number(adapter.version) <= version_number(current.version):
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
        record = Serving(adapter.version, adapter, time.time(), pause * 1e3)
        if role == "serving":
            metrics.SERVING_VERSION.set(version_number(adapter.version))
            log.info(
                "now serving %s (was %s; install took %.1f ms)",
                adapter.version,
                self.version,
                pause * 1e3,
            )
            self.serving = record  # one atomic store
            self.swaps += 1
        else:
            log.info("canary %s installed (%.1f ms)", adapter.version, pause * 1e3)
            self.canary = record

    def _install(self, adapter: Adapter) -> None:
        """Copy the adapter's weights into a free slot (adding one if none fits)."""
        from peft import PeftModel, set_peft_model_state_dict

        self._retire_slots()
        if self._fold is not None:  # peft changes its layers only as peft made them
            self._fold.unmerged()
        key = _config_key(adapter.config)
        free = [s for s, held in self._slots.items() if held is None]
        slot = next((s for s in free if self._slot_keys[s] == key), None)
        if slot is None:
            # A new slot. The first of its shape comes with a spare, so that the next
            # version is a copy too while this one still has rows. Free slots shaped for
            # another config go away.
            first_of_shape = key not in self._slot_keys.values()
            new_slots = [f"slot{self._next_slot + i}" for i in range(1 + first_of_shape)]
            self._next_slot += len(new_slots)
            slot = new_slots[0]
            # the adapter in the serving dtype (peft would make it float32 beside bf16)
            if self.peft is None:
                self.peft = PeftModel(
                    self.base, adapter.config, adapter_name=slot, autocast_adapter_dtype=False
                )
            else:
                self.peft.add_adapter(slot, adapter.config, autocast_adapter_dtype=False)
            for spare in new_slots[1:]:
                self.peft.add_adapter(spare, adapter.config, autocast_adapter_dtype=False)
            for old in free:
                self.peft.delete_adapter(old)
                del self._slots[old], self._slot_keys[old]
                self._slot_params.pop(old, None)
                self._slot_foldable.pop(old, None)
            self.peft.eval()
            self._active_slot = None  # adding or deleting adapters may move peft's active one
            self._fold = FoldedLora(self.peft)  # the adapted layers may have changed
            for new in new_slots:
                self._slots[new], self._slot_keys[new] = None, key
                self._slot_foldable[new] = foldable(adapter.config)
        self._fold.forget(slot)  # a folded copy of it holds the version it held before
        if not self._copy_into(slot, adapter.state_dict):
            result = set_peft_model_state_dict(self.peft, adapter.state_dict, adapter_name=slot)
            missing = [k for k in result.missing_keys if f".{slot}." in k and "lora_" in k]
            if result.unexpected_keys or missing:
                raise ValueError(
                    f"{adapter.version}: adapter does not fit the base model "
                    f"(unexpected {result.unexpected_keys[:3]}, missing {missing[:3]})"
                )
        self._slots[slot] = adapter.version

    @torch.no_grad()
    def _copy_into(self, slot: str, state_dict: dict[str, torch.Tensor]) -> bool:
        """Copy a plain LoRA state dict into the slot's tensors in place (a few ms, no
        module walk); False when it is not exactly the slot's A/B matrices."""
        params = self._slot_params.get(slot)
        if params is None:
            marker = f".{slot}."
            params = {
                name.replace(marker, "."): p
                for name, p in self.peft.named_parameters()
                if marker in name and ".lora_" in name
            }
            self._slot_params[slot] = params
        if set(state_dict) != set(params) or any(
            state_dict[k].shape != p.shape for k, p in params.items()
        ):
            return False
        for key, param in params.items():
            param.copy_(state_dict[key])
        return True

    def _retire_slots(self) -> None:
        """Free the slots of versions neither routed to nor decoding any row."""
        live = self.loaded_versions() | {row.version for row in self._batch.rows}
        for slot, held in self._slots.items():
            if held is not None and held not in live:
                self._slots[slot] = None
        for version in set(self._prefixes) - live:  # computed with weights no longer here
            del self._prefixes[version]

    @property
    def version(self) -> str:
        return self.serving.version

    @property
    def model(self):
        return self.base
