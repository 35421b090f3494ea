"""A KV cache that does not move: one preallocated slot per running request.

Per layer one key and one value tensor of shape (max_batch, kv_heads, max_len, head_dim),
as gpt-fast keeps them. A request takes a free slot index at admission; its prefill writes
the prompt's keys and values at positions 0..n-1 of that slot (in pieces, after a copied
shared prefix, when the engine says so), each decode step writes one more at the slot's
length, and leaving frees the index. Nothing cached is ever moved,
re-padded or re-sliced (a step over non-contiguous slots reads a gathered copy; the
slots stay put), and the attention mask is rebuilt each step from the slots' lengths
instead of grown.

Why a `Cache` subclass and not transformers' `StaticCache`: a static layer writes every
row of a forward at one shared `cache_position`, while kaizen's rows joined at different
steps and sit at different positions. Llama's attention only calls
`cache.update(keys, values, layer_idx)` and takes back the keys and values to attend
over, so a cache that knows each row's slot and position (`plan_prefill`,
`plan_decode`, set before each forward) needs no fork of the model. No custom attention
function is needed either: the 4-D mask built here is handed to the model's own
attention unchanged (`create_causal_mask` passes a 4-D mask through), and transformers'
SDPA path already attends a single query per row on the KV heads without repeating them.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

CLEAN_STEP = 256  # never-written cache columns are zeroed this many at a time, on first use


def attention_shape(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of a model's attention, from its config."""
    config = config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values for every slot; `SlotCache.update` writes and reads it."""

    is_sliding = False

    def __init__(self, shape: tuple[int, int, int, int], dtype, device) -> None:
        super().__init__()
        # empty, not zeros: on CPU the pages are only touched (and counted) once written
        self.keys = torch.empty(shape, dtype=dtype, device=device)  # (S, H, L, D)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.device = torch.device(device)
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # allocated up front: the slots outlive any one forward

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("SlotCache.update writes the slots")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[-2], 0

    def get_seq_length(self) -> int:
        return 0  # rows differ; the engine always passes position_ids and a 4-D mask

    def get_max_length(self) -> int:
        return self.keys.shape[-2]


class SlotCache(Cache):
    """`max_batch` slots of `max_len` tokens; rows join and leave by slot index."""

    def __init__(
        self, config, max_batch: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        _, kv_heads, head_dim = attention_shape(config)
        shape = (max_batch, kv_heads, max_len, head_dim)
        layers = [
            SlotLayer(shape, dtype, device)
            for _ in range(config.get_text_config().num_hidden_layers)
        ]
        super().__init__(layers=layers)
        self.max_batch, self.max_len = max_batch, max_len
        self.device = torch.device(device)
        self.lengths = [0] * max_batch  # tokens cached in each slot
        self._free = set(range(max_batch))
        self._clean = 0  # columns [0, _clean) of every slot hold finite values
        self._plan: tuple | None = None

    @property
    def nbytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def take(self) -> int:
        """The lowest free slot: running rows stay packed at the front, so most decode
        steps read their slots as one view."""
        slot = min(self._free)
        self._free.remove(slot)
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0
        self._free.add(slot)

    def reset(self) -> None:
        self.lengths = [0] * self.max_batch
        self._free = set(range(self.max_batch))
        self._plan = None

    def _index(self, slots: list[int]) -> slice | torch.Tensor:
        """How a forward's rows read their slots: a view when the slots are consecutive and
        in order, else an index tensor (a gathered copy)."""
        lo = slots[0]
        if slots == list(range(lo, lo + len(slots))):
            return slice(lo, lo + len(slots))
        return torch.tensor(slots, device=self.device)

    def _clean_up_to(self, width: int) -> None:
        """Zero the columns no request has written yet before anything reads them: masked
        keys and values still enter the attention product, and uninitialised memory may
        hold NaNs (0 × NaN is NaN)."""
        if width <= self._clean:
            return
        end = min(self.max_len, max(width, self._clean + CLEAN_STEP))
        for layer in self.layers:
            layer.keys[:, :, self._clean : end].zero_()
            layer.values[:, :, self._clean : end].zero_()
        self._clean = end

    def plan_prefill(
        self,
        slots: list[int],
        new_lens: list[int],
        width: int,
        starts: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Set up a forward over left-padded prompt pieces (P rows, `width` columns)
        entering `slots`, row i's after the `starts[i]` tokens its slot already holds (a
        reused prefix, or the chunks of a long prompt prefilled before): returns the
        (P, 1, T, K) mask and (P, T) position ids. `update` writes the new keys and values
        into the slots; when every slot was empty the rows attend only to themselves and
        get their own keys back (K = T), otherwise they read their slots (K = the longest
        row's length after this forward)."""
        device = self.device
        starts = starts or [0] * len(slots)
        lens = torch.tensor(new_lens, device=device)  # (P,)
        first = (width - lens)[:, None]  # (P, 1) first real column of each row
        cols = torch.arange(width, device=device)
        real = cols[None, :] >= first  # (P, T)
        offset = torch.tensor(starts, device=device)[:, None]  # (P, 1)
        positions = (cols[None, :] - first).clamp(min=0) + offset  # (P, T) absolute
        rows, src = real.nonzero(as_tuple=True)  # (N,) every real token, row-major
        slot_index = torch.tensor(slots, device=device)
        dst_slot = slot_index[rows]
        dst_pos = positions[rows, src]
        ends = [s + n for s, n in zip(starts, new_lens, strict=True)]
        self._clean_up_to(max(ends))
        for slot, end in zip(slots, ends, strict=True):
            self.lengths[slot] = end
        if not any(starts):
            causal = cols[None, :] <= cols[:, None]  # (T, T) query i sees keys j <= i
            # a padding query sees itself only, so no row is all masked (SDPA gives NaN)
            eye = torch.eye(width, dtype=torch.bool, device=device)
            mask = (causal[None] & real[:, None, :]) | eye
            self._plan = ("prefill", rows, src, dst_slot, dst_pos)
            return mask[:, None], positions
        keys = torch.arange(max(ends), device=device)  # (K,) slot positions
        # a real query at absolute position a sees the slot's keys 0..a; a padding query
        # sees key 0, which every slot here holds, so no row is all masked
        mask = keys[None, None, :] <= torch.where(real, positions, 0)[:, :, None]  # (P, T, K)
        self._plan = ("extend", rows, src, dst_slot, dst_pos, self._index(slots), max(ends))
        return mask[:, None], positions

    def write_prefix(self, slot: int, prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy a shared prefix's keys and values, (H, n, D) per layer, into the empty
        `slot` at positions 0..n-1: the next `plan_prefill` of that slot starts after it."""
        n = prefix[0][0].shape[1]
        self._clean_up_to(n)
        for layer, (keys, values) in zip(self.layers, prefix, strict=True):
            layer.keys[slot, :, :n] = keys
            layer.values[slot, :, :n] = values
        self.lengths[slot] = n

    def read_prefix(self, slot: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A copy of the first `n` positions of `slot`, (H, n, D) per layer."""
        return [
            (layer.keys[slot, :, :n].clone(), layer.values[slot, :, :n].clone())
            for layer in self.layers
        ]

    def plan_decode(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Set up a one-token forward over the rows in `slots` (ascending): returns the
        (R, 1, 1, W) mask and (R, 1) position ids, W the longest row's length after this
        token. Contiguous slots are read through views; others are gathered, a copy of
        their keys and values that costs less than computing the free slots between
        them would (measured on CPU, see the README)."""
        lengths = [self.lengths[s] for s in slots]
        width = max(lengths) + 1
        self._clean_up_to(width)
        pos = torch.tensor(lengths, device=self.device)  # (R,) where this token goes
        mask = torch.arange(width, device=self.device)[None, :] <= pos[:, None]  # (R, W)
        for slot in slots:
            self.lengths[slot] += 1
        rows = torch.arange(len(slots), device=self.device)
        self._plan = ("decode", self._index(slots), width, pos, rows)
        return mask[:, None, None, :], pos[:, None]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx]
        if self._plan is None:
            raise RuntimeError("SlotCache: a forward ran without plan_prefill or plan_decode")
        if self._plan[0] in ("prefill", "extend"):
            _, rows, src, dst_slot, dst_pos, *read = self._plan
            # (N, H, D) real tokens only: padding columns are never written
            layer.keys[dst_slot, :, dst_pos] = key_states[rows, :, src]
            layer.values[dst_slot, :, dst_pos] = value_states[rows, :, src]
            if not read:
                return key_states, value_states
            index, width = read  # after what the slots held before: read them whole
            return layer.keys[index, :, :width], layer.values[index, :, :width]
        _, index, width, pos, rows = self._plan
        if isinstance(index, slice):  # contiguous slots: written and read through views
            keys, values = layer.keys[index], layer.values[index]
            keys[rows, :, pos] = key_states[:, :, 0]  # (R, H, D)
            values[rows, :, pos] = value_states[:, :, 0]
            return keys[:, :, :width], values[:, :, :width]
        layer.keys[index, :, pos] = key_states[:, :, 0]
        layer.values[index, :, pos] = value_states[:, :, 0]
        return layer.keys[index, :, :width], layer.values[index, :, :width]  # copies
