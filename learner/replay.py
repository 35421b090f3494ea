"""Offline replay: how would a version have done on the traffic already logged?

Every logged answer carries the log-probabilities of its tokens under the policy that
sampled it (the behaviour μ) and, once users reacted, rewards (the reward file; comments
count for nothing here, since they need the judge). For a version π this module computes

- the importance weight of each answer, π(answer) / μ(answer), from π's log-probabilities
  under the distribution it was sampled from (its temperature and nucleus,
  `kaizen.sampling`); greedy answers (nothing was sampled) are left out, and so are
  nucleus-truncated ones (top_p < 1): μ is zero outside its nucleus, so whatever mass
  π's own nucleus puts on tokens μ cut is on answers the log can never contain, and
  no weighting of logged answers sees it (IPS needs μ > 0 wherever π > 0). Training
  may use them (its clipped ratio is a staleness weight, not an estimate); the gate,
  whose bound is a promise, does not;
- IPS, SNIPS, doubly robust and direct-method estimates of π's mean reward, with
  bootstrap intervals and the effective sample size (`learner.estimators`). The direct
  method is a ridge regression of the rewards on the base model's pooled last hidden
  state of the answer, cross-fitted on two halves of the log, evaluated on an answer π
  samples itself for each logged prompt. `--weights token-mean` replaces the sequence
  ratio by its per-token geometric mean, which does not collapse but is biased: a
  ranking score;
- preference accuracy: over prompts with a liked (reward > 0) and a disliked (reward < 0)
  answer, and corrections against the answer they corrected, the share of pairs where π
  gives the preferred answer the higher likelihood;
- drift: the mean per-token KL(π ‖ base) on the logged answers, and the perplexity of the
  shipped general text.

Several candidates (`--candidate v1,v2` or `all`) are each scored once and ranked.

The learner's gate (`Learner.gate`) uses `Scorer` and the same estimators on its own
held-out slice of recent traffic.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kaizen import modeling
from kaizen.buffer import ReplayBuffer
from kaizen.events import Feedback, FeedbackKind, Generation
from kaizen.registry import BASE_VERSION, Registry
from kaizen.rewards import RewardConfig, reward
from learner.estimators import ESTIMATORS, effective_sample_size, estimate_all, weights
from learner.examples import Answer, collate
from learner.objectives import processed_response_logprobs, response_logprobs, token_kl

READ_PAGE = 1000


@dataclass
class Logged:
    """One logged answer and the rewards its feedback events gave."""

    generation: Generation
    rewards: list[float] = field(default_factory=list)
    correction: str = ""  # the last correction a user wrote for it

    @property
    def reward(self) -> float:
        return sum(self.rewards) / len(self.rewards)

    @property
    def evaluable(self) -> bool:
        """Sampled (not greedy, no nucleus cut: module docstring), with a log μ for every
        token."""
        s, g = self.generation.sampling, self.generation
        return (
            s.temperature > 0
            and s.top_p >= 1.0
            and len(g.behaviour_logprobs) == len(g.response_tokens) > 0
        )


def feedback_by_answer(buffer: ReplayBuffer) -> dict[str, tuple[Generation, list[Feedback]]]:
    """Every answer that got feedback, with its events in order, read page by page."""
    found: dict[str, tuple[Generation, list[Feedback]]] = {}
    after = 0
    while rows := buffer.read_samples(after, READ_PAGE):
        for sample in rows:
            after = sample.seq
            g = sample.generation
            found.setdefault(g.response_id, (g, []))[1].append(sample.feedback)
    return found


def load_logged(buffer: ReplayBuffer, rewards: RewardConfig, limit: int = 0) -> list[Logged]:
    """Answers with at least one rewarded feedback event, oldest first; the newest `limit`
    of them (0 = all)."""
    found: dict[str, Logged] = {}
    for response_id, (g, events) in feedback_by_answer(buffer).items():
        item = found[response_id] = Logged(g)
        for fb in events:
            if fb.kind == FeedbackKind.CORRECTION and fb.text.strip():
                item.correction = fb.text.strip()
            r = reward(fb, rewards, g)
            if r is not None:
                item.rewards.append(r)
    logged = sorted((x for x in found.values() if x.rewards), key=lambda x: x.generation.created_at)
    return logged[-limit:] if limit else logged


# -- scoring answers under a version -----------------------------------------------------


@dataclass(frozen=True)
class Terms:
    """Per answer, under one version: what the estimators and the drift need."""

    tempered_logp: np.ndarray  # Σ log q(token): π at the answer's temperature and top_p
    logp: np.ndarray  # Σ log π(token), temperature 1
    kl: np.ndarray  # Σ_t KL(π ‖ base) over the answer's tokens
    tokens: np.ndarray  # answer length
    features: np.ndarray  # (n, H) the base model's mean last hidden state over the answer


class Scorer:
    """The base model with the registry's adapters loaded on demand, one active at a time."""

    def __init__(
        self,
        model_dir: Path,
        registry: Registry,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 8,
    ) -> None:
        self.registry = registry
        self.device = device
        self.batch_size = batch_size
        self.tokenizer = modeling.load_tokenizer(model_dir)
        self.model = modeling.load_model(model_dir, device, dtype).eval()
        self.stop_ids = sorted(modeling.stop_token_ids(self.tokenizer))
        self._loaded: set[str] = set()

    @classmethod
    def wrapping(cls, model, tokenizer, device, batch_size: int = 8) -> Scorer:
        """A scorer over a model already in memory (the learner's), its adapter active."""
        scorer = cls.__new__(cls)
        scorer.registry, scorer.device, scorer.batch_size = None, device, batch_size
        scorer.tokenizer, scorer.model = tokenizer, model
        scorer.stop_ids = sorted(modeling.stop_token_ids(tokenizer))
        scorer._loaded = set()
        return scorer

    @contextmanager
    def active(self, version: str | None):
        """Run the model as `version` (None: whatever adapter is active now)."""
        if version is None:
            yield
            return
        if version == BASE_VERSION:
            if hasattr(self.model, "disable_adapter"):
                with self.model.disable_adapter():
                    yield
            else:
                yield
            return
        if version not in self._loaded:
            from peft import PeftModel

            path = self.registry.path(version)
            if not self._loaded:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=version)
            else:
                self.model.load_adapter(path, adapter_name=version)
            self.model.eval()
            self._loaded.add(version)
        self.model.set_adapter(version)
        yield

    def _reference(self, **inputs):
        if hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                return self.model(**inputs, output_hidden_states=True)
        return self.model(**inputs, output_hidden_states=True)

    @torch.no_grad()
    def terms(
        self, version: str | None, answers: list[Answer], desc: str = "", reference: bool = True
    ) -> Terms:
        """Score `answers` under `version`; without `reference`, kl and features are 0."""
        parts: dict[str, list[np.ndarray]] = {k: [] for k in Terms.__dataclass_fields__}
        steps = range(0, len(answers), self.batch_size)
        for start in tqdm(steps, desc=desc or f"scoring {version}", leave=False, disable=not desc):
            batch = answers[start : start + self.batch_size]
            ids, attention, mask, _, temperature, top_p = collate(
                batch, self.tokenizer.pad_token_id, self.device
            )
            with self.active(version):
                logits = self.model(input_ids=ids, attention_mask=attention).logits.float()
            m = mask.float()
            n = m.sum(-1).clamp(min=1)
            t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
            # q: the distribution the answer was sampled from; −inf if π's nucleus drops a token
            logq = processed_response_logprobs(logits, ids, mask, t, top_p)
            parts["tempered_logp"].append(logq.sum(-1).cpu().numpy())
            parts["logp"].append((response_logprobs(logits, ids) * m).sum(-1).cpu().numpy())
            parts["tokens"].append(n.cpu().numpy())
            if not reference:
                parts["kl"].append(np.zeros(len(batch)))
                parts["features"].append(np.zeros((len(batch), 1)))
                continue
            ref = self._reference(input_ids=ids, attention_mask=attention)
            parts["kl"].append((token_kl(logits, ref.logits) * m).sum(-1).cpu().numpy())
            hidden = ref.hidden_states[-1].float()
            parts["features"].append(((hidden * m[..., None]).sum(1) / n[:, None]).cpu().numpy())
        return Terms(**{k: np.concatenate(v) for k, v in parts.items()})

    @torch.no_grad()
    def sample(
        self, version: str, prompts: list[tuple[int, ...]], temperature: float, max_new_tokens: int
    ) -> list[Answer]:
        """One answer per prompt, sampled from `version` (seeded: reproducible)."""
        out: list[Answer] = []
        pad = self.tokenizer.pad_token_id
        torch.manual_seed(0)
        steps = range(0, len(prompts), 2 * self.batch_size)
        for start in tqdm(steps, desc=f"sampling {version}", leave=False):
            batch = prompts[start : start + 2 * self.batch_size]
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros_like(ids)
            for i, p in enumerate(batch):  # left padding for generation
                ids[i, width - len(p) :] = torch.tensor(p)
                attention[i, width - len(p) :] = 1
            with self.active(version):
                generated = self.model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=attention.to(self.device),
                    do_sample=True,
                    temperature=temperature,
                    top_p=1.0,
                    top_k=0,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=self.stop_ids,
                    pad_token_id=pad,
                )
            for p, row in zip(batch, generated[:, width:].tolist(), strict=True):
                response = []
                for token in row:
                    response.append(token)
                    if token in self.stop_ids:
                        break
                out.append(Answer(p, tuple(response), None, 0.0))
        return out


# -- the direct method ---------------------------------------------------------------------


def ridge_fit(x: np.ndarray, y: np.ndarray, lam: float = 10.0):
    """A ridge regression y ≈ x·w + b on standardised features; returns a predictor."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    w = np.linalg.solve(z.T @ z + lam * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    b = float(y.mean())
    return lambda q: np.clip(((q - mu) / sd) @ w + b, -1.0, 1.0)


def cross_fit(x_logged, y, x_policy, folds: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Predictions for each logged answer and for the policy's answer to its prompt, from
    a model fitted on the other folds (so no answer is judged by a fit that saw it)."""
    n = len(y)
    dm_logged, dm_policy = np.zeros(n), np.zeros(n)
    fold = np.arange(n) % folds
    for k in range(folds):
        train, test = fold != k, fold == k
        if train.sum() < 2:
            continue
        predict = ridge_fit(x_logged[train], y[train])
        dm_logged[test] = predict(x_logged[test])
        dm_policy[test] = predict(x_policy[test])
    return dm_logged, dm_policy


# -- preference pairs -----------------------------------------------------------------------


def preference_pairs(
    logged: list[Logged], tokenizer, max_pairs: int = 200
) -> list[tuple[Answer, Answer]]:
    """(preferred, other): a liked and a disliked answer to the same prompt, and each
    correction against the answer it corrected."""
    end = modeling.end_of_turn_id(tokenizer)
    by_prompt: dict[str, tuple[list[Logged], list[Logged]]] = {}
    pairs: list[tuple[Answer, Answer]] = []
    for x in logged:
        g = x.generation
        if x.correction:
            tokens = tokenizer.encode(x.correction, add_special_tokens=False)
            pairs.append((Answer(tuple(g.prompt_tokens), (*tokens, end), None, 0.0), Answer.of(g)))
        liked, disliked = by_prompt.setdefault(json.dumps(g.messages, sort_keys=True), ([], []))
        if x.reward > 0:
            liked.append(x)
        elif x.reward < 0:
            disliked.append(x)
    for liked, disliked in by_prompt.values():
        for good, bad in list(zip(liked, disliked, strict=False))[:3]:
            pairs.append((Answer.of(good.generation), Answer.of(bad.generation)))
    return pairs[-max_pairs:]


# -- drift ----------------------------------------------------------------------------------


def general_text_windows(tokenizer, width: int = 256) -> list[list[int]]:
    """The shipped general text, in windows of `width` tokens."""
    text = (resources.files("kaizen") / "data" / "general_text.txt").read_text()
    tokens = tokenizer.encode(text, add_special_tokens=False)
    return [tokens[i : i + width] for i in range(0, len(tokens) - 16, width)]


@torch.no_grad()
def perplexity(model, windows: list[list[int]], device: torch.device | None = None) -> float:
    nll, n = 0.0, 0
    for w in windows:
        ids = torch.tensor([w], device=device)
        logits = model(input_ids=ids).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        n += len(w) - 1
    return math.exp(nll / n)


# -- kaizen replay evaluate ------------------------------------------------------------------


def _estimate_version(
    scorer: Scorer,
    version: str,
    usable: list[Logged],
    answers: list[Answer],
    r: np.ndarray,
    behaviour: np.ndarray,
    config,
) -> dict[str, object]:
    t = scorer.terms(version, answers, desc=f"scoring {version} on {len(answers)} answers")
    w = weights(t.tempered_logp, behaviour, t.tokens if config.weights == "token-mean" else None)
    dm_logged = dm_policy = None
    if config.direct_method == "ridge" and len(r) >= 4:
        by_temperature: dict[float, list[int]] = {}
        for i, x in enumerate(usable):
            by_temperature.setdefault(x.generation.sampling.temperature, []).append(i)
        policy_features = np.zeros_like(t.features)
        for temperature, rows in by_temperature.items():
            longest = max(x.generation.sampling.max_new_tokens for x in usable)
            sampled = scorer.sample(
                version, [answers[i].prompt for i in rows], temperature, longest
            )
            own = scorer.terms(
                BASE_VERSION, sampled, desc=f"features of {len(sampled)} answers of {version}"
            )
            policy_features[rows] = own.features
        dm_logged, dm_policy = cross_fit(t.features, r, policy_features)
    estimates = estimate_all(w, r, dm_logged, dm_policy, config.level, config.resamples)
    return {
        "estimates": {k: e.as_dict() for k, e in estimates.items()},
        "effective_sample_size": round(effective_sample_size(w), 2),
        "max_weight_share": round(float(w.max() / w.sum()), 4) if w.sum() > 0 else None,
        "log10_weights": np.log10(np.maximum(w, 1e-300)).round(3).tolist(),
        "kl_to_reference": round(float(t.kl.sum() / t.tokens.sum()), 6),
    }


def _versions(config, registry: Registry) -> tuple[list[str], str]:
    """The candidates (`all`: v0 and every version not rejected) and the version they are
    compared against, each checked to be in the registry."""
    published = [BASE_VERSION, *registry.versions()]
    if config.candidate == "all":
        candidates = [v for v in published if v == BASE_VERSION or not registry.rejected(v)]
    else:
        candidates = [v.strip() for v in config.candidate.split(",") if v.strip()]
    against = config.against or registry.serving()
    for flag, version in [*(("--candidate", v) for v in candidates), ("--against", against)]:
        if version not in published:
            raise ValueError(
                f"{flag}: {version} is not in {config.registry} ({len(published)} "
                f"versions: {', '.join(published[-5:])})"
            )
    return candidates, against


def evaluate(config) -> dict[str, object]:
    """`kaizen replay evaluate`: the candidates and the version they are compared
    against, side by side on the same logged answers, each scored once, and ranked by
    `config.rank_by` when there are several."""
    from kaizen.buffer import open_buffer
    from kaizen.rewards import load_rewards

    registry = Registry(config.registry)
    candidates, against = _versions(config, registry)
    buffer = open_buffer(config.buffer, must_exist=True)
    try:
        logged = load_logged(buffer, load_rewards(config.rewards), config.limit)
    finally:
        buffer.close()
    usable = [x for x in logged if x.evaluable]
    if len(usable) < 2:
        raise ValueError(
            f"--buffer: {len(usable)} sampled answers with rewarded feedback; need at least 2"
        )
    device = modeling.pick_device(config.device)
    scorer = Scorer(config.model, registry, device, modeling.pick_dtype(config.dtype, device))
    answers = [Answer.of(x.generation) for x in usable]
    r = np.array([x.reward for x in usable])
    behaviour = np.array([sum(x.generation.behaviour_logprobs) for x in usable])
    result: dict[str, object] = {
        "candidates": candidates,
        "against": against,
        "answers": len(usable),
        "left_out": {
            "greedy_or_truncated": len(logged) - len(usable),
        },
        "logged_mean_reward": round(float(r.mean()), 4),
        "logged_by": _count(x.generation.model_version for x in usable),
        "weights": config.weights,
        "level": config.level,
        "versions": {},
    }
    pairs = preference_pairs(logged, scorer.tokenizer)
    windows = general_text_windows(scorer.tokenizer)
    base_ppl = None
    for version in dict.fromkeys((*candidates, against)):
        row = _estimate_version(scorer, version, usable, answers, r, behaviour, config)
        if pairs:
            desc = f"{version} on {len(pairs)} preference pairs"
            chosen = scorer.terms(version, [p[0] for p in pairs], desc=desc + " (preferred)").logp
            other = scorer.terms(version, [p[1] for p in pairs], desc=desc + " (other)").logp
            row["preference_accuracy"] = round(float(np.mean(chosen > other)), 4)
        with scorer.active(version):
            ppl = perplexity(scorer.model, windows, device)
        if base_ppl is None:
            with scorer.active(BASE_VERSION):
                base_ppl = perplexity(scorer.model, windows, device)
        row["perplexity"] = round(ppl, 3)
        row["perplexity_change_pct"] = round(100 * (ppl / base_ppl - 1), 2)
        result["versions"][version] = row
    result["preference_pairs"] = len(pairs)
    result["perplexity_base"] = round(base_ppl, 3)
    versions = result["versions"]
    if len(versions) > 1 and config.rank_by in versions[against]["estimates"]:
        result["rank_by"] = config.rank_by
        result["ranking"] = sorted(
            versions, key=lambda v: -versions[v]["estimates"][config.rank_by]["value"]
        )
    return result


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def table(result: dict[str, object]) -> str:
    """The evaluation as a terminal table, one column per version."""
    versions = result["versions"]
    names = list(versions)
    level = int(round(100 * result["level"]))
    lines = [
        f"{result['answers']} logged answers with rewards (mean reward "
        f"{result['logged_mean_reward']:+.3f}); {result['left_out']['greedy_or_truncated']} "
        f"greedy or truncated left out; {result['preference_pairs']} preference pairs",
        "",
        f"{'':28}" + "".join(f"{n:>26}" for n in names),
    ]

    def row(label: str, cell) -> None:
        lines.append(f"{label:28}" + "".join(f"{cell(versions[n]):>26}" for n in names))

    for name in ESTIMATORS:
        if name not in versions[names[0]]["estimates"]:
            continue
        row(
            f"{name.upper()} [{level} % CI]",
            lambda v, k=name: "{value:+.3f} [{low:+.3f}, {high:+.3f}]".format(**v["estimates"][k]),
        )
    row("effective sample size", lambda v: f"{v['effective_sample_size']:.1f}")
    row("largest weight's share", lambda v: f"{v['max_weight_share']:.3f}")
    row("preference accuracy", lambda v: f"{v.get('preference_accuracy', float('nan')):.3f}")
    row("KL to base / token", lambda v: f"{v['kl_to_reference']:.4f}")
    row(
        "perplexity (change)",
        lambda v: f"{v['perplexity']:.2f} ({v['perplexity_change_pct']:+.1f} %)",
    )
    if "ranking" in result:
        lines += ["", f"ranking by {result['rank_by'].upper()}: " + " > ".join(result["ranking"])]
    return "\n".join(lines)


def report_png(result: dict[str, object], path: Path) -> None:
    """Estimates with their intervals, per version, and the spread of the weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versions = result["versions"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    names = [k for k in ESTIMATORS if k in next(iter(versions.values()))["estimates"]]
    width = 0.8 / len(versions)
    for j, (version, row) in enumerate(versions.items()):
        xs = [i + j * width for i in range(len(names))]
        values = [row["estimates"][k]["value"] for k in names]
        errors = [
            [row["estimates"][k]["value"] - row["estimates"][k]["low"] for k in names],
            [row["estimates"][k]["high"] - row["estimates"][k]["value"] for k in names],
        ]
        left.bar(xs, values, width, yerr=errors, capsize=4, label=version)
        right.hist(
            row["log10_weights"],
            bins=30,
            alpha=0.5,
            label=f"{version} (ESS {row['effective_sample_size']:.0f} of {result['answers']})",
        )
    left.axhline(result["logged_mean_reward"], color="black", lw=1, ls="--", label="logged mean")
    left.set_xticks([i + width * (len(versions) - 1) / 2 for i in range(len(names))])
    left.set_xticklabels([n.upper() for n in names])
    left.set_ylabel(f"estimated mean reward ({int(100 * result['level'])} % bootstrap CI)")
    left.legend()
    left.grid(alpha=0.3, axis="y")
    right.set_xlabel("log10 importance weight π / μ")
    right.set_ylabel("logged answers")
    right.legend()
    right.grid(alpha=0.3)
    fig.suptitle(
        f"kaizen replay evaluate: {', '.join(result['candidates'])} against {result['against']}"
        f" ({result['weights']} weights)"
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- kaizen replay export ----------------------------------------------------------------------

EXPORT_SCHEMA = {
    "response_id": "string: the answer's id",
    "user_id": "string",
    "model_version": "string: the version that answered (vN)",
    "created_at": "float: unix seconds",
    "messages": "JSON string: the conversation answered, [{role, content}]",
    "text": "string: the answer",
    "finish_reason": "string: stop | length",
    "temperature": "float: sampling temperature (0 = greedy)",
    "top_p": "float",
    "prompt_tokens": "int: prompt length in tokens",
    "completion_tokens": "int: answer length in tokens",
    "behaviour_logprob": "float: Σ log μ(token), the answer's log-probability when sampled",
    "feedback": "JSON string: [{event_id, kind, value, text, received_at, reward}]",
    "reward": "float or null: mean reward of the rewarded events (null: none)",
}


def export_rows(buffer: ReplayBuffer, rewards: RewardConfig):
    """Every answer that got feedback, joined with its events, oldest event first."""
    for g, feedback in feedback_by_answer(buffer).values():
        events = [
            {
                "event_id": fb.event_id,
                "kind": str(fb.kind),
                "value": fb.value,
                "text": fb.text,
                "received_at": fb.received_at,
                "reward": reward(fb, rewards, g),
            }
            for fb in feedback
        ]
        given = [e["reward"] for e in events if e["reward"] is not None]
        yield {
            "response_id": g.response_id,
            "user_id": g.user_id,
            "model_version": g.model_version,
            "created_at": g.created_at,
            "messages": json.dumps(g.messages),
            "text": g.text,
            "finish_reason": g.finish_reason,
            "temperature": g.sampling.temperature,
            "top_p": g.sampling.top_p,
            "prompt_tokens": len(g.prompt_tokens),
            "completion_tokens": len(g.response_tokens),
            "behaviour_logprob": float(sum(g.behaviour_logprobs)),
            "feedback": json.dumps(events),
            "reward": sum(given) / len(given) if given else None,
        }


def export(buffer: ReplayBuffer, rewards: RewardConfig, out: Path, fmt: str) -> int:
    """Write the joined log to `out` as jsonl or parquet; returns the number of rows."""
    rows = list(export_rows(buffer, rewards))
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        with out.open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    elif fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(
                "--format parquet: needs pyarrow (pip install 'kaizen[parquet]')"
            ) from None
        columns = {k: [row[k] for row in rows] for k in EXPORT_SCHEMA}
        pq.write_table(pa.table(columns), out)
    else:
        raise ValueError(f"--format: {fmt!r} is not jsonl or parquet")
    return len(rows)
