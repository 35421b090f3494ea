"""Did every token of an answer come from the version it is tagged with?

The server logs, for each sampled token, its log-probability under the distribution it
was sampled from. Recomputing those log-probabilities by teacher forcing tells which
version produced the answer: an answer is "mixed" when its tagged version does not
reproduce them within tolerance, or another version reproduces them better. Answers
sampled greedily or with nucleus truncation (top_p < 1) cannot be checked this way.

"Another version" means the versions published just before and just after the tagged one
(all of them for an unknown tag): a swap inside an answer would bring in one of those,
and recomputing every answer under every version costs versions × answers forward passes
(minutes for the 135M model on 2 cores). A version served after a skipped one is caught
anyway: its answers stop fitting the tagged version, which alone makes them mixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kaizen import modeling
from kaizen.events import Generation
from kaizen.registry import BASE_VERSION, Registry

# Teacher-forced positions per batched forward pass, in fp32. In bf16, padding a row
# moved its mean log-prob by 0.03 (SmolLM2-135M, CPU): most of the tolerance, so bf16
# answers are recomputed one per pass; in fp32 batched and unbatched agree to 1e-5.
TOKENS_PER_PASS = {torch.float32: 1024, torch.bfloat16: 0}
# Mean |logged − recomputed| allowed. bf16 alone moves a whole answer's mean by up to
# 0.07 (batched decode against unbatched recompute, SmolLM2-135M, CPU), while two versions
# differ by ~0.6 nats a token; an answer half from another version is off by ~0.3.
TOLERANCE = {torch.float32: 1e-2, torch.bfloat16: 0.15}


def teacher_forced_logprobs(model, generation: Generation) -> list[float]:
    """log μ of each logged token, recomputed unbatched with the logged temperature."""
    return batch_logprobs(model, [generation])[0]


def batch_logprobs(model, generations: list[Generation]) -> list[list[float]]:
    """`teacher_forced_logprobs` for several answers in one right-padded forward pass.

    Right padding needs no attention mask: under the causal mask no real position sees
    the pads after it.
    """
    for g in generations:
        if g.sampling.temperature <= 0 or g.sampling.top_p < 1.0:
            raise ValueError(
                f"{g.response_id}: only answers sampled with temperature > 0 "
                "and top_p = 1 can be checked"
            )
    rows = [g.prompt_tokens + g.response_tokens for g in generations]
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T), right-padded
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    with torch.inference_mode():
        logits = model(input_ids=ids.to(model.device)).logits[:, :-1].float()  # (B, T-1, V)
    out = []
    for i, g in enumerate(generations):
        start = len(g.prompt_tokens) - 1
        answer = logits[i, start : start + len(g.response_tokens)] / g.sampling.temperature
        logp = answer.log_softmax(-1)  # (len(response), V)
        out.append(logp.gather(-1, torch.tensor(g.response_tokens)[:, None])[:, 0].tolist())
    return out


class VersionModels:
    """The base model with every given version's adapter loaded; one is active at a time."""

    def __init__(
        self,
        model_dir: Path,
        registry: Registry,
        versions: list[str],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.versions = list(versions)
        self.tokens_per_pass = TOKENS_PER_PASS[dtype]
        self.model = modeling.load_model(model_dir, device, dtype)
        adapters = [v for v in self.versions if v != BASE_VERSION]
        if adapters:
            from peft import PeftModel

            first, *rest = adapters
            self.model = PeftModel.from_pretrained(
                self.model, registry.path(first), adapter_name=first
            )
            for version in rest:
                self.model.load_adapter(registry.path(version), adapter_name=version)
            self.model.eval()

    def logprobs(self, version: str, generations: list[Generation]) -> list[list[float]]:
        """Each answer's tokens' log-probabilities under `version`, in batched passes."""
        if version == BASE_VERSION and hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                return self._logprobs(generations)
        if version != BASE_VERSION:
            self.model.set_adapter(version)
        return self._logprobs(generations)

    def _logprobs(self, generations: list[Generation]) -> list[list[float]]:
        length = [len(g.prompt_tokens) + len(g.response_tokens) for g in generations]
        order = sorted(range(len(generations)), key=length.__getitem__)  # little padding
        out: list[list[float]] = [[] for _ in generations]
        start = 0
        while start < len(order):
            end = start + 1  # a pass holds (rows × longest row) ≤ tokens_per_pass positions
            budget = self.tokens_per_pass
            while end < len(order) and (end - start + 1) * length[order[end]] <= budget:
                end += 1
            chunk = order[start:end]
            logps = batch_logprobs(self.model, [generations[i] for i in chunk])
            for i, logp in zip(chunk, logps, strict=True):
                out[i] = logp
            start = end
        return out

    def candidates(self, tagged: str) -> list[str]:
        """The tagged version and its neighbours in publish order; all for an unknown tag."""
        if tagged not in self.versions:
            return self.versions
        i = self.versions.index(tagged)
        return self.versions[max(0, i - 1) : i + 2]


@dataclass(frozen=True)
class Verdict:
    response_id: str
    tagged: str  # the version the server tagged the answer with
    best: str  # the version whose recomputed log-probabilities match the logged ones best
    diff_tagged: float  # mean |logged − recomputed| under the tagged version (inf: unknown)
    diff_best: float
    mixed: bool


def mean_abs_diff(a: list[float], b: list[float]) -> float:
    return float(torch.tensor(a).sub(torch.tensor(b)).abs().mean())


def check(models: VersionModels, generations: list[Generation], tolerance: float) -> list[Verdict]:
    """Recompute each answer under its candidate versions; mixed unless its tag fits best."""
    wanted: dict[str, list[int]] = {}  # version -> the answers to recompute under it
    for i, g in enumerate(generations):
        for version in models.candidates(g.model_version):
            wanted.setdefault(version, []).append(i)
    diffs: list[dict[str, float]] = [{} for _ in generations]
    for version, indices in wanted.items():
        recomputed = models.logprobs(version, [generations[i] for i in indices])
        for i, logp in zip(indices, recomputed, strict=True):
            diffs[i][version] = mean_abs_diff(generations[i].behaviour_logprobs, logp)
    verdicts = []
    for g, diff in zip(generations, diffs, strict=True):
        best = min(diff, key=diff.get)
        tagged = diff.get(g.model_version, float("inf"))
        verdicts.append(
            Verdict(
                response_id=g.response_id,
                tagged=g.model_version,
                best=best,
                diff_tagged=tagged,
                diff_best=diff[best],
                mixed=tagged > tolerance or diff[best] < tagged,
            )
        )
    return verdicts
