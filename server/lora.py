"""The adapter on the fast path: the serving version's LoRA folded into the base weights.

peft's LoRA forward runs two small matrix products beside every adapted layer (and, when
rows of several versions share a batch, one per version): on this machine's CPU serving
a rank-16 adapter on q and v cost 10–30 % over the bare model. When every row of a step
decodes the serving version, the engine instead points each adapted layer at a copy of
its weight with B·A·scale added, and turns peft's adapters off: the forward is the bare
model's. The base weights themselves are never written, so going back to the unmerged
path (a canary shares the batch, the base model's rows) is a pointer swap, and a thousand
swaps do not drift the weights the way merging and unmerging in place in bf16 would.
The price is one extra copy of the adapted layers' weights (q and v: 26 MB in bf16 for
SmolLM2-135M).

Only plain additive LoRA on linear layers is folded (no DoRA, no bias, no
modules_to_save); anything else stays on peft's path.
"""

from __future__ import annotations

import torch

UNMERGED, MERGED, BARE = "unmerged", "merged", "bare"


def foldable(config) -> bool:
    """Whether an adapter of this peft config is a plain sum that can be folded in."""
    return (
        not getattr(config, "use_dora", False)
        and getattr(config, "bias", "none") == "none"
        and not getattr(config, "modules_to_save", None)
    )


class FoldedLora:
    """Which weights the adapted layers of one peft model hold: their own with peft's
    adapters on (UNMERGED), their own with the adapters off (BARE: the base model), or a
    merged copy of one adapter slot with the adapters off (MERGED)."""

    def __init__(self, peft_model) -> None:
        from peft.tuners.lora.layer import Linear

        self.layers = [m for m in peft_model.modules() if isinstance(m, Linear)]
        self.own = [layer.base_layer.weight for layer in self.layers]
        self.folded: list[torch.nn.Parameter] = []
        self.slot: str | None = None  # the adapter slot `folded` was built from
        self.state = UNMERGED

    def forget(self, slot: str) -> None:
        """The weights of `slot` changed: its folded copy, if any, is stale."""
        if slot == self.slot:
            self.unmerged()
            self.folded, self.slot = [], None

    def unmerged(self) -> None:
        self._set(UNMERGED, self.own)

    def bare(self) -> None:
        self._set(BARE, self.own)

    @torch.no_grad()
    def merged(self, slot: str) -> None:
        if self.slot != slot:
            self.unmerged()
            self.folded = [
                torch.nn.Parameter(
                    (w.float() + layer.get_delta_weight(slot).float()).to(w.dtype),
                    requires_grad=False,
                )
                if slot in layer.lora_A
                else w  # a layer this slot's config does not adapt
                for layer, w in zip(self.layers, self.own, strict=True)
            ]
            self.slot = slot
        self._set(MERGED, self.folded)

    def _set(self, state: str, weights: list[torch.nn.Parameter]) -> None:
        if state == self.state:
            return
        for layer, weight in zip(self.layers, weights, strict=True):
            layer.base_layer.weight = weight
            if (state == UNMERGED) != (self.state == UNMERGED):
                layer.enable_adapters(state == UNMERGED)
        self.state = state
