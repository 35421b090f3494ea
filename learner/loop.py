"""The online loop: tail the buffer, shape examples, step, guard, publish.

Exactly-once, by construction: the learner's cursors (the last feedback event, and the
last answer checked for silence, whose effect is in the weights), its optimizer, its
baselines and its feedback head are saved inside each published version, in the same
atomic rename as the adapter. A restarted learner resumes from the newest version and
re-reads every event after that version's cursor: events trained on but not yet
published are trained on again, once, from the weights that were published, and no
event is skipped.

Guards: a step whose loss or gradient is not finite is dropped (its events are
consumed) and counted. Before publishing, three checks, and a candidate that fails one is
recorded in the registry as rejected (with the reason and the figures; servers never
serve it) and the weights go back to the last published ones (the events since then are
dropped):

- the mean KL to the base model on a fixed probe set must stay under `max_probe_kl`;
- the replay gate: a slice of answers (`gate_holdout`, by response id) is never trained
  on; on its newest rewarded events, the candidate and the last accepted version are
  both replayed (SNIPS by default, `learner.estimators`), and the one-sided lower bound
  of the candidate's estimate minus the last one's must not fall below −`gate_margin`,
  and the weights' effective sample size must reach `gate_min_ess` (below it the gate
  abstains: it refuses rather than approves on evidence carried by a few answers —
  unless the servers run a canary, as `rollout/policy.json` in the registry says: then
  it publishes and the live test, valid at any ESS, decides; `gate_abstain`);
- the guard evals (`kaizen.guard`, --guard-evals): the candidate answers each probe
  greedily and must break none of its rules (a fact it must still know, a flattering
  opening it must not write).
"""

from __future__ import annotations

import collections
import copy
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import torch

from kaizen import modeling
from kaizen.bucket import Buckets, load_or_create_secret
from kaizen.buffer import ReplayBuffer, open_buffer
from kaizen.errors import Unavailable
from kaizen.events import Feedback, FeedbackKind, Generation
from kaizen.guard import GuardResult, greedy_answers, guard_evals_from_flag
from kaizen.registry import BASE_VERSION, PROMOTED, ROLLED_BACK, Registry, version_number
from kaizen.rewards import load_rewards, reward
from kaizen.telemetry import tracing
from learner import distributed, metrics
from learner.config import LearnerConfig
from learner.estimators import effective_sample_size, estimate_all, paired_difference, weights
from learner.examples import (
    USES,
    Answer,
    Example,
    Pair,
    Scored,
    Shaper,
    Target,
    collate,
    sources,
)
from learner.objectives import (
    OBJECTIVES,
    FeedbackHead,
    Forward,
    dpo_loss,
    feedback_loss,
    forward_terms,
    kto_loss,
    reinforce_loss,
    sft_loss,
    token_kl,
)

log = logging.getLogger(__name__)

STATE_FILE = "learner_state.pt"
HEAD_FILE = "feedback_head.pt"
MAX_PROMPT_BASELINES = 10_000


@dataclass
class Progress:
    """What a published version remembers about the learner that made it."""

    cursor: int = 0  # every feedback event with seq ≤ cursor is in the weights
    silent_cursor: int = 0  # every answer with seq ≤ this was checked for silence
    baseline: float = 0.0  # running-mean reward
    prompt_baselines: dict[str, float] = field(default_factory=dict)  # per-prompt means
    steps: int = 0
    samples: int = 0  # examples trained on, all versions together
    rejected: int = 0  # candidates a guard refused since the last publish
    window_rewards: list[float] = field(default_factory=list)  # since the last publish
    window_examples: int = 0  # examples trained on since the last publish
    window_held_out: int = 0  # events set aside for the gate since the last publish


@dataclass(frozen=True)
class StepResult:
    ok: bool
    reason: str  # "ok" | "nonfinite_loss" | "nonfinite_grad" | "no_examples"
    loss: float
    kl: float
    mean_reward: float


def _prompt_key(answer: Answer) -> str:
    return hashlib.sha1(repr(answer.prompt).encode()).hexdigest()[:16]


def _select(f: Forward, idx: list[int]) -> Forward:
    i = torch.tensor(idx, dtype=torch.long, device=f.logp.device)
    return Forward(
        f.logp[i],
        f.ref_logp[i],
        f.tokens[i],
        f.kl[i],
        f.ratio[i],
        None if f.hidden is None else f.hidden[i],
    )


class Learner:
    def __init__(self, config: LearnerConfig, buffer: ReplayBuffer | None = None) -> None:
        from peft import LoraConfig, PeftModel, get_peft_model

        if config.objective not in OBJECTIVES:
            raise ValueError(
                f"--objective: {config.objective!r} is not one of {', '.join(OBJECTIVES)}"
            )
        if config.objective == "kto" and distributed.world() > 1:
            raise ValueError(
                "--objective kto: its reference point z is a mean over the whole batch, and "
                "under torchrun each rank holds only its shard's; run kto in one process"
            )
        self.config = config
        self.rewards = load_rewards(config.rewards)  # a bad file fails before anything loads
        self.guard = guard_evals_from_flag(config.guard_evals)  # so does a bad guard file
        self.info = modeling.model_info(config.model)
        self.device = distributed.local_device(modeling.pick_device(config.device))
        self.tokenizer = modeling.load_tokenizer(config.model)
        self.buffer = buffer if buffer is not None else open_buffer(config.buffer)
        self.registry = Registry(config.registry)
        self.buckets = Buckets(load_or_create_secret(self.registry.root))
        self.shaper = Shaper(self.tokenizer, config.sft_min_reward)
        base = modeling.load_model(config.model, self.device, torch.float32)
        for p in base.parameters():
            p.requires_grad_(False)
        self.head = FeedbackHead(base.config.hidden_size).to(self.device)

        self.version = self.registry.latest_accepted()
        self.progress = Progress()
        state = None
        if self.version != BASE_VERSION:
            manifest = self.registry.verify(self.version)
            if manifest.base_model != self.info.name:
                raise ValueError(
                    f"--registry: {self.version} was trained on {manifest.base_model!r}, "
                    f"not on --model {self.info.name!r}; use another registry"
                )
            path = self.registry.path(self.version)
            self.model = PeftModel.from_pretrained(base, path, is_trainable=True)
            state = torch.load(path / STATE_FILE, map_location=self.device, weights_only=True)
            self.progress = Progress(
                cursor=int(state["cursor"]),
                silent_cursor=int(state.get("silent_cursor", 0)),
                baseline=float(state["baseline"]),
                prompt_baselines=dict(state.get("prompt_baselines", {})),
                steps=int(state["steps"]),
                samples=int(state["samples"]),
            )
            if (path / HEAD_FILE).exists():
                self.head.load_state_dict(
                    torch.load(path / HEAD_FILE, map_location=self.device, weights_only=True)
                )
            log.info(
                "resuming from %s: cursor %d, %d steps",
                self.version,
                self.progress.cursor,
                self.progress.steps,
            )
        else:
            torch.manual_seed(config.seed)
            lora = LoraConfig(
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=0.0,
                target_modules=[m.strip() for m in config.lora_targets.split(",") if m.strip()],
                task_type="CAUSAL_LM",
            )
            self.model = get_peft_model(base, lora)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.params += list(self.head.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr)
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        resumed = (self.version, self.progress.cursor)
        if distributed.on_main(lambda: resumed) != resumed:
            raise ValueError(
                f"--registry: rank {distributed.rank()} resumes from {self.version} at cursor "
                f"{self.progress.cursor}, not from rank 0's; every rank needs the same registry"
            )
        distributed.broadcast_tensors(self.params)  # as DDP does: one starting point
        self.read_cursor = self.progress.cursor  # how far read; ≥ cursor while a batch fills
        self.silent_read_cursor = self.progress.silent_cursor
        self.pending: list[Example] = []
        self.first_pending_at = 0.0
        self._judge = None
        self._probe: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._anchor: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._anchor_turn = 0
        self._published = self._snapshot()  # what a tripped guard goes back to
        self._rollout_stamp: int | None = None  # the rollout records last looked at
        # the gate's slice: (answer, reward) of held-out events, newest last; not persisted
        self._reset_caps()
        self.heldout: collections.deque[tuple[Answer, float]] = collections.deque(
            maxlen=config.gate_window
        )
        metrics.CURSOR.set(self.progress.cursor)
        metrics.BASELINE.set(self.progress.baseline)
        metrics.VERSION.set(version_number(self.version))
        metrics.PUBLISH_EVERY.set(config.publish_every)
        if self.guard is not None and distributed.is_main():  # rank 0 runs the evals
            # what the base model itself fails is set aside
            self.model.eval()
            with self.model.disable_adapter():
                base = greedy_answers(self.model, self.tokenizer, self.guard.probes)
            self.guard = self.guard.calibrated(base)

    @property
    def since_publish(self) -> int:
        """What counts toward --publish-every: examples trained on since the last publish,
        plus the events held out for the gate in that time. A held-out event is consumed
        like a trained one (the cursor passes it, the gate weighs it), so a version is due
        after N events' worth of examples whichever slice each event fell in; without
        that, feedback that happened to be held out left the learner short of its count
        with nothing more coming (issue 16)."""
        return self.progress.window_examples + self.progress.window_held_out

    def due(self) -> bool:
        """A version is due: --publish-every reached, with something trained to publish."""
        return self.progress.window_examples > 0 and self.since_publish >= self.config.publish_every

    # -- reading -----------------------------------------------------------------------

    @property
    def judge(self):
        """The comment judge: the frozen base model asked a yes/no question (lazy)."""
        if self._judge is None:
            from learner.judge import CommentJudge

            self._judge = CommentJudge(_Reference(self.model), self.tokenizer, self.device)
        return self._judge

    def held_out(self, response_id: str) -> bool:
        """Whether an answer belongs to the gate's slice (never trained on): a keyed hash
        (`kaizen.bucket`), so a client cannot pick answers that escape the gate."""
        return self.buckets.held_out(response_id, self.config.gate_holdout)

    def _take(self, g: Generation, fb: Feedback, now: float) -> None:
        """Turn one event into the examples this objective trains on (or, for an answer
        in the gate's slice, into the gate's evidence); `now` is when its reward is taken."""
        if self.held_out(g.response_id):
            answer = Answer.of(g)
            r = reward(fb, self.rewards, g, now)  # comments: no judge here
            # top_p < 1: μ's support is cut, so no weight is unbiased (learner.replay)
            if r is not None and answer.behaviour is not None and g.sampling.top_p >= 1.0:
                self.heldout.append((answer, r))
            metrics.SAMPLES.labels("held_out").inc()
            self.progress.window_held_out += 1
            self._show_window()
            return
        score = None
        if fb.kind == FeedbackKind.COMMENT and fb.text.strip() and self.rewards.comment:
            score = distributed.on_main(lambda: self.judge.score([fb.text])[0])
        r = reward(fb, self.rewards, g, now, comment_score=score)
        metrics.SAMPLES.labels("yes" if r is not None else "no").inc()
        uses = USES[self.config.objective]
        for example in self.shaper.examples(g, fb.kind, r, fb.text):
            metrics.EXAMPLES.labels(
                type(example).__name__.lower(), str(isinstance(example, uses)).lower()
            ).inc()
            if isinstance(example, uses) and self._within_caps(fb):
                if not self.pending:
                    self.first_pending_at = time.monotonic()
                self.pending.append(example)

    def _reset_caps(self) -> None:
        """A new version's window: every user and key may give it their share again."""
        self.window_users: collections.Counter[str] = collections.Counter()
        self.window_keys: collections.Counter[str] = collections.Counter()
        self.window_capped: collections.Counter[str] = collections.Counter()  # by user|key

    def _within_caps(self, fb: Feedback) -> bool:
        """Count one example towards its sender's influence caps, or drop it (False) when
        the user, or the API key it came through, already gave this version its share:
        no one person or client moves a version more than --max-user-share /
        --max-key-share of it, however much feedback they send. The counts start again
        at every publish (and at a restart: a cap per process and version)."""
        c = self.config
        key = fb.source if fb.source.startswith("key:") else ""
        if c.max_user_share < 1 and self.window_users[fb.user_id] >= c.cap(c.max_user_share):
            by = "user"
        elif key and c.max_key_share < 1 and self.window_keys[key] >= c.cap(c.max_key_share):
            by = "key"
        else:
            self.window_users[fb.user_id] += 1
            if key:
                self.window_keys[key] += 1
            return True
        self.window_capped[by] += 1
        metrics.CAPPED.labels(by).inc()
        return False

    def fill(self) -> None:
        """Read events after the cursors until a batch is full or the buffer is drained.
        Under torchrun rank 0 reads, and every rank takes what it read, by its clock."""
        size = self.config.batch_size
        now = distributed.on_main(time.time)
        while len(self.pending) < size:
            # never read more rows than the batch can take, so nothing read is left over
            rows = distributed.on_main(
                self.buffer.consume, self.read_cursor, size - len(self.pending)
            )
            if not rows:
                break
            for sample in rows:
                self.read_cursor = sample.seq
                self._take(sample.generation, sample.feedback, now)
        if self.rewards.no_reaction and len(self.pending) < size:
            cutoff = now - self.rewards.no_reaction_window_s
            rows = distributed.on_main(
                self.buffer.read_answers, self.silent_read_cursor, cutoff, size - len(self.pending)
            )
            for seq, g, has_feedback in rows:
                self.silent_read_cursor = seq
                if not has_feedback:
                    self._take(
                        g,
                        Feedback(
                            f"silent-{seq}", g.response_id, g.user_id, FeedbackKind.NO_REACTION
                        ),
                        now,
                    )
        if not self.pending:  # only example-less events read: nothing is owed to them
            self.progress.cursor = self.read_cursor
            self.progress.silent_cursor = self.silent_read_cursor
            metrics.CURSOR.set(self.progress.cursor)

    def ready(self, batch_wait_s: float) -> bool:
        """A full batch, or a partial one that has waited long enough."""
        if len(self.pending) >= self.config.batch_size:
            return True
        return bool(self.pending) and time.monotonic() - self.first_pending_at >= batch_wait_s

    # -- learning ----------------------------------------------------------------------

    def _baseline_for(self, answer: Answer) -> float:
        if self.config.baseline == "per_prompt":
            return self.progress.prompt_baselines.get(_prompt_key(answer), self.progress.baseline)
        return self.progress.baseline

    def _update_baselines(self, scored: list[Scored]) -> None:
        m = self.config.baseline_momentum
        known = self.progress.prompt_baselines
        for s in scored:
            key = _prompt_key(s.answer)
            old = known.pop(key, self.progress.baseline)  # re-inserted: the newest last
            known[key] = m * old + (1 - m) * s.reward
        while len(known) > MAX_PROMPT_BASELINES:
            known.pop(next(iter(known)))  # the prompt seen longest ago
        if scored:
            mean = sum(s.reward for s in scored) / len(scored)
            self.progress.baseline = m * self.progress.baseline + (1 - m) * mean

    def loss(self, batch: list[Example]) -> tuple[torch.Tensor, torch.Tensor, list[Scored]]:
        """The objective's loss on `batch`, the mean KL to the reference, the scored examples.

        Under torchrun, this rank's share of the loss and the KL: the forward pass runs on
        its shard, and each mean over the shard's examples of a kind is weighed by the
        shard's part of the batch's examples of that kind, so the shares (and their
        gradients) sum over the ranks to what one process computes on the whole batch.
        The anchor term, the same whatever the batch, is rank 0's. Alone, every part is 1."""
        c = self.config
        mine = distributed.shard(batch)
        everyone = [ex for ex in batch if isinstance(ex, Scored)]  # the baselines' update
        if not mine:  # fewer examples than ranks: none for this one
            nothing = torch.zeros((), device=self.device)
            return nothing, nothing, everyone

        def part(kind: type, here: int) -> float:
            return here / sum(isinstance(ex, kind) for ex in batch)

        answers: list[Answer] = []
        where: list[tuple[int, ...]] = []
        for ex in mine:
            parts = (ex.chosen, ex.rejected) if isinstance(ex, Pair) else (ex.answer,)
            where.append(tuple(range(len(answers), len(answers) + len(parts))))
            answers += parts
        ids, attention, mask, behaviour, temperature, top_p = collate(
            answers, self.tokenizer.pad_token_id, self.device
        )
        joint = c.objective == "joint"
        out = self.model(input_ids=ids, attention_mask=attention, output_hidden_states=joint)
        with torch.no_grad(), self.model.disable_adapter():
            ref_logits = self.model(input_ids=ids, attention_mask=attention).logits
        hidden = out.hidden_states[-1] if joint else None
        f = forward_terms(out.logits, ref_logits, ids, mask, behaviour, temperature, top_p, hidden)

        scored = [(w[0], ex) for w, ex in zip(where, mine, strict=True) if isinstance(ex, Scored)]
        targets = [w[0] for w, ex in zip(where, mine, strict=True) if isinstance(ex, Target)]
        pairs = [w for w, ex in zip(where, mine, strict=True) if isinstance(ex, Pair)]
        rewards = torch.tensor([ex.reward for _, ex in scored], device=self.device)
        zero = f.kl.sum() * 0
        match c.objective:
            case "reinforce":
                base = torch.tensor(
                    [self._baseline_for(ex.answer) for _, ex in scored], device=self.device
                )
                main = reinforce_loss(
                    _select(f, [i for i, _ in scored]), rewards - base, c.clip_eps
                ) * part(Scored, len(scored))
            case "kto":
                signed = [(i, ex.reward > 0) for i, ex in scored if ex.reward != 0]
                signed += [(i, True) for i in targets]
                main = zero
                if signed:
                    desirable = torch.tensor([d for _, d in signed], device=self.device)
                    main = kto_loss(
                        _select(f, [i for i, _ in signed]), desirable, c.clip_eps, c.kto_beta
                    )
            case "dpo":
                main = dpo_loss(
                    _select(f, [p[0] for p in pairs]),
                    _select(f, [p[1] for p in pairs]),
                    c.clip_eps,
                    c.dpo_beta,
                ) * part(Pair, len(pairs))
            case "sft":
                main = sft_loss(_select(f, targets), c.clip_eps) * part(Target, len(targets))
            case "joint":
                main = zero
                if targets:
                    sft = sft_loss(_select(f, targets), c.clip_eps)
                    main = sft * part(Target, len(targets))
                if scored:
                    predicted = self.head(_select(f, [i for i, _ in scored]).hidden)
                    fit = feedback_loss(predicted, rewards) * part(Scored, len(scored))
                    main = main + c.feedback_coef * fit
        # a pair is two answers: the KL's mean is over answers, the batch's and the shard's
        answered = sum(2 if isinstance(ex, Pair) else 1 for ex in batch)
        kl = f.kl.mean() * (len(answers) / answered)
        loss = main + c.kl_coef * kl
        if c.anchor_coef > 0 and distributed.is_main():
            loss = loss + c.anchor_coef * self.anchor_kl()
        return loss, kl.detach(), everyone

    def step(self, batch: list[Example]) -> StepResult:
        """One gradient step on `batch`; a non-finite loss or gradient drops it."""
        started = time.perf_counter()
        if not batch:
            return StepResult(False, "no_examples", 0.0, 0.0, 0.0)
        self.model.train()
        loss, kl, scored = self.loss(batch)
        mean_reward = sum(s.reward for s in scored) / len(scored) if scored else 0.0
        self._update_baselines(scored)
        self.optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad and torch.isfinite(loss):
            loss.backward()
        # every rank calls it, whatever its own loss: the batch's gradient, loss and KL
        loss, kl = distributed.sum_gradients(self.params, loss.detach(), kl)
        reason = "ok"
        if not torch.isfinite(loss):
            reason = "nonfinite_loss"
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
            if not torch.isfinite(grad_norm):
                reason = "nonfinite_grad"
            else:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics.STEPS.labels(reason).inc()
        metrics.STEP_SECONDS.observe(time.perf_counter() - started)
        metrics.BASELINE.set(self.progress.baseline)
        if reason != "ok":
            metrics.GUARD_TRIPS.labels(reason).inc()
            log.warning("dropped a step: %s", reason)
        else:
            self.progress.steps += 1
            metrics.LOSS.set(float(loss.detach()))
            metrics.KL.set(float(kl))
            metrics.REWARD.set(mean_reward)
        return StepResult(reason == "ok", reason, float(loss.detach()), float(kl), mean_reward)

    def drop_deleted(self, batch: list[Example]) -> list[Example]:
        """`batch` without the examples whose answers left the buffer since they were read
        (a user forgotten, or retention): they never enter an update."""
        wanted = set().union(*(sources(ex) for ex in batch)) if batch else set()
        if not wanted:
            return batch
        present = distributed.on_main(self.buffer.owners, sorted(wanted)).keys()
        kept = [ex for ex in batch if sources(ex) <= present]
        if len(kept) < len(batch):
            metrics.DROPPED_DELETED.inc(len(batch) - len(kept))
            log.info("left out %d examples whose answers were deleted", len(batch) - len(kept))
        return kept

    def train_pending(self) -> StepResult:
        batch, self.pending = self.drop_deleted(self.pending), []
        answers = (tracing.answer(r) for r in sorted(set().union(*map(sources, batch))))
        with tracing.span(
            "kaizen.learner.step", links=answers, examples=len(batch), from_version=self.version
        ) as span:
            result = self.step(batch)
            span.set(result=result.reason)
        # Consumed either way: a dropped step's events are not retried forever.
        self.progress.cursor = self.read_cursor
        self.progress.silent_cursor = self.silent_read_cursor
        self.progress.samples += len(batch)
        self.progress.window_examples += len(batch)
        self.progress.window_rewards.extend(ex.reward for ex in batch if isinstance(ex, Scored))
        metrics.CURSOR.set(self.progress.cursor)
        self._show_window()
        return result

    def _show_window(self) -> None:
        metrics.SINCE_PUBLISH.labels("trained").set(self.progress.window_examples)
        metrics.SINCE_PUBLISH.labels("held_out").set(self.progress.window_held_out)
        metrics.PENDING.set(len(self.pending))

    def _show_lag(self) -> None:
        """How far the learner is behind the buffer, for the operators' lag panel."""
        head = self.buffer.last_seq()
        metrics.BUFFER_HEAD.set(head)
        metrics.EVENTS_BEHIND.set(max(0, head - self.progress.cursor))

    def waiting(self) -> str:
        """Why an idle learner has not published: what it has, and what it waits for."""
        p, n = self.progress, self.config.publish_every
        have = f"{p.window_examples} trained + {p.window_held_out} held out since {self.version}"
        if p.window_examples == 0 and p.window_held_out >= n:
            return f"{have}: nothing trained to publish; waiting for feedback to train on"
        return f"{have}: waiting for {n - self.since_publish} more (--publish-every {n})"

    # -- guards ------------------------------------------------------------------------

    def _snapshot(self):
        return (
            {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad},
            copy.deepcopy(self.head.state_dict()),
            copy.deepcopy(self.optimizer.state_dict()),
        )

    def _copy_weights(self, adapter: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n in adapter:
                    p.copy_(adapter[n])

    def _restore(self) -> None:
        adapter, head, optimizer = self._published
        self._copy_weights(adapter)
        self.head.load_state_dict(head)
        self.optimizer.load_state_dict(copy.deepcopy(optimizer))

    def _passages(self, name: str, max_tokens: int = 128):
        """The paragraphs of a shipped text as one padded batch: (ids, attention, mask of
        the positions whose next-token distribution is measured)."""
        text = (resources.files("learner") / "data" / name).read_text()
        rows = [
            self.tokenizer.encode(p.strip(), add_special_tokens=False)[:max_tokens]
            for p in text.split("\n\n")
            if p.strip()
        ]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            attention[i, : len(row)] = 1
        mask = attention.clone()
        mask[:, 0] = 0  # token_kl measures the distributions that predict tokens 1…
        return ids.to(self.device), attention.to(self.device), mask.to(self.device)

    def _text_kl(self, ids, attention, mask) -> torch.Tensor:
        """Mean per-token KL(π_θ ‖ π_ref) over the masked positions of some text."""
        logits = self.model(input_ids=ids, attention_mask=attention).logits
        with torch.no_grad(), self.model.disable_adapter():
            ref_logits = self.model(input_ids=ids, attention_mask=attention).logits
        kl = token_kl(logits, ref_logits) * mask
        return kl.sum() / mask.sum()

    def anchor_kl(self) -> torch.Tensor:
        """KL to the base on the next two anchor passages (general text, in turn): the
        term that keeps the adapter from changing how the model writes outside chat."""
        if self._anchor is None:
            self._anchor = self._passages("anchor_text.txt")
        ids, attention, mask = self._anchor
        n = ids.shape[0]
        pick = torch.tensor([self._anchor_turn % n, (self._anchor_turn + 1) % n])
        self._anchor_turn += 2
        return self._text_kl(ids[pick], attention[pick], mask[pick])

    @torch.no_grad()
    def probe_kl(self) -> float:
        """Mean per-token KL(π_θ ‖ π_ref) on the probe set: general text never trained on
        (`learner/data/probe_text.txt`), where drift means forgetting how to write."""
        if self._probe is None:
            self._probe = self._passages("probe_text.txt")
        self.model.eval()
        return float(self._text_kl(*self._probe))

    # -- publishing --------------------------------------------------------------------

    def gate_against(self) -> str:
        """The version the gate compares a candidate with: the one servers serve. Once a
        server has promoted or rolled back anything (a canary is on) that is the
        registry's serving version; before, and without a canary, servers serve the
        newest accepted version, this learner's own."""
        if self.registry.decisions():
            serving = self.registry.serving()
            if serving == BASE_VERSION or self.registry.servable(serving):
                return serving
        return self.version

    def _load_version(self, version: str) -> None:
        """Put `version`'s adapter weights in place (v0: leave them, the caller disables
        the adapter); the caller restores its own."""
        if version == BASE_VERSION:
            return
        if version == self.version:
            self._copy_weights(self._published[0])
            return
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        path = self.registry.path(version)
        set_peft_model_state_dict(self.model, load_peft_weights(str(path), device=str(self.device)))

    def gate(self) -> dict[str, object]:
        """The replay gate's evidence about the current weights; "refused" gives the reason
        when it refuses them (or abstains: "abstained", below `gate_min_ess`). It does not
        judge on fewer than `gate_min_events` events."""
        from learner.replay import Scorer

        c = self.config
        present = self.buffer.owners([a.source for a, _ in self.heldout])
        self.heldout = collections.deque(
            ((a, r) for a, r in self.heldout if a.source in present), maxlen=c.gate_window
        )
        held = list(self.heldout)
        evidence: dict[str, object] = {"events": len(held), "judged": False}
        if len(held) < c.gate_min_events or c.gate_holdout <= 0:
            return evidence
        answers = [a for a, _ in held]
        r = np.array([x for _, x in held])
        behaviour = np.array([sum(a.behaviour) for a in answers])
        scorer = Scorer.wrapping(self.model, self.tokenizer, self.device)
        self.model.eval()
        mine = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        candidate = weights(scorer.terms(None, answers, reference=False).tempered_logp, behaviour)
        against = self.gate_against()
        try:
            self._load_version(against)
            with scorer.active(BASE_VERSION if against == BASE_VERSION else None):
                last_logp = scorer.terms(None, answers, reference=False).tempered_logp
        finally:
            self._copy_weights(mine)
        # Per-sequence weights π(answer)/μ(answer): the rewards are per answer, and only
        # these make IPS unbiased (the per-token geometric mean of `kaizen replay
        # --weights token-mean` is biased towards 1: a ranking score, not a bound). Their
        # variance grows with the answer's length; the ESS floor below is what keeps the
        # bound honest when they collapse onto a few answers.
        last = weights(last_logp, behaviour)
        name = c.gate_estimator
        diff, low = paired_difference(candidate, last, r, name, c.gate_confidence, seed=len(held))
        last_value = estimate_all(last, r, resamples=1)[name].value
        evidence.update(
            judged=True,
            estimator=name,
            confidence=c.gate_confidence,
            candidate=round(last_value + diff, 4),
            last=against,
            last_value=round(last_value, 4),
            difference=round(diff, 4),
            difference_low=round(low, 4),
            candidate_ess=round(effective_sample_size(candidate), 1),
            last_ess=round(effective_sample_size(last), 1),
            margin=c.gate_margin,
            min_ess=c.gate_min_ess,
        )
        ess = min(effective_sample_size(candidate), effective_sample_size(last))
        if ess < c.gate_min_ess:  # too few answers carry the weights: no bound to trust
            evidence["abstained"] = True
            why = (
                f"replay gate abstains: the importance weights' effective sample size is "
                f"{ess:.1f} of {len(held)} held-out events, below --gate-min-ess "
                f"{c.gate_min_ess:g}"
            )
            share = self._canary_share() if c.gate_abstain == "defer" else 0.0
            if share > 0:  # the live test decides; the guard evals still run
                evidence["deferred"] = f"to the servers' canary (share {share:g})"
                log.warning("%s; deferring to the servers' canary (share %g)", why, share)
            else:
                evidence["refused"] = f"{why}; too few answers carry the estimate to approve it"
                log.warning("%s", evidence["refused"])
        elif low < -c.gate_margin:
            evidence["refused"] = (
                f"replay gate: {name} says {last_value + diff:+.3f} against {against}'s "
                f"{last_value:+.3f}; the difference's lower bound {low:+.3f} "
                f"({c.gate_confidence:.0%} one-sided, {len(held)} held-out events) is below "
                f"-{c.gate_margin} (--gate-margin)"
            )
        return evidence

    def _canary_share(self) -> float:
        """The share of users the servers canary a new version to first, as the rollout
        authority recorded it in the registry (0: none recorded, or no canary)."""
        policy = self.registry.policy() or {}
        try:
            return max(0.0, float(policy.get("canary_share", 0.0)))
        except (TypeError, ValueError):
            return 0.0

    def run_guard_evals(self) -> GuardResult | None:
        """The guard evals (--guard-evals) on the candidate's weights, greedily; each
        failed probe is logged with its rule and counted (None: the guard is off)."""
        if self.guard is None:
            return None
        self.model.eval()
        result = self.guard.check(greedy_answers(self.model, self.tokenizer, self.guard.probes))
        for f in result.failures:
            metrics.GUARD_REFUSALS.labels(f.probe).inc()
            log.warning("candidate refused by %s; it answered %r", f.reason, f.answer)
        return result

    def publish(self) -> str | None:
        """Publish the weights as a new version, unless a guard refuses them: then the
        candidate is published for the record as rejected (never served), the weights go
        back to the last accepted version's, and this returns None. Under torchrun rank 0
        alone runs the guards and writes; the others take its verdict."""
        if not distributed.is_main():
            return self._take_verdict()
        started = time.time_ns()
        probe_kl = self.probe_kl()
        metrics.PROBE_KL.set(probe_kl)
        rewards = self.progress.window_rewards
        window = {
            "window_examples": self.progress.window_examples,
            "window_rewards": len(rewards),
            "window_mean_reward": sum(rewards) / len(rewards) if rewards else None,
        }
        window["window_held_out"] = self.progress.window_held_out
        window["window_users"] = len(self.window_users)
        window["window_capped"] = dict(self.window_capped)
        if self.window_capped:
            log.info(
                "influence caps dropped %d examples from this version (%s): at most %d per "
                "user (--max-user-share %s), %d per key; %d users gave it examples",
                sum(self.window_capped.values()),
                ", ".join(f"{n} over the {by} cap" for by, n in self.window_capped.items()),
                self.config.cap(self.config.max_user_share),
                self.config.max_user_share,
                self.config.cap(self.config.max_key_share),
                len(self.window_users),
            )
        self._close_window()
        guard, reason, gate, evals = "", "", {}, None
        if probe_kl > self.config.max_probe_kl:
            guard = "probe_kl"
            reason = f"probe KL {probe_kl:.4f} > --max-probe-kl {self.config.max_probe_kl}"
        else:
            gate = self.gate()
            if "refused" in gate:
                guard, reason = "replay_gate", str(gate["refused"])
            elif (evals := self.run_guard_evals()) is not None and not evals.ok:
                guard, reason = "guard_eval", evals.reason
        metadata = {
            "objective": self.config.objective,
            "cursor": self.progress.cursor,
            "silent_cursor": self.progress.silent_cursor,
            "steps": self.progress.steps,
            "samples": self.progress.samples,
            **window,
            "baseline": self.progress.baseline,
            "probe_kl": probe_kl,
            "gate": gate,
            "rejected_since_last": self.progress.rejected,
            "guard_evals": evals.evidence() if evals is not None else None,
        }
        if reason:
            metadata["rejected"] = reason
        with self.registry.publish(self.info.name, metadata, parent=self.version) as staging:
            self.model.save_pretrained(staging)
            torch.save(self.head.state_dict(), staging / HEAD_FILE)
            if not reason:  # what a restart resumes from; never a rejected version
                torch.save(
                    {
                        "cursor": self.progress.cursor,
                        "silent_cursor": self.progress.silent_cursor,
                        "baseline": self.progress.baseline,
                        "prompt_baselines": self.progress.prompt_baselines,
                        "steps": self.progress.steps,
                        "samples": self.progress.samples,
                        "optimizer": self.optimizer.state_dict(),
                    },
                    staging / STATE_FILE,
                )
        published = self.registry.latest()
        distributed.broadcast_object((published, reason))  # what _take_verdict waits for
        metrics.LAST_PUBLISH.set(time.time())
        tracing.record(
            "kaizen.publish",
            tracing.version(published),
            started,
            version=published,
            parent=self.version,
            cursor=self.progress.cursor,
            steps=self.progress.steps,
            examples=metadata["window_examples"],
            rejected=reason or None,
        )
        if reason:
            self._restore()
            self.progress.rejected += 1
            metrics.GUARD_TRIPS.labels(guard).inc()
            metrics.REJECTED.inc()
            log.warning(
                "%s rejected (%s); back to %s's weights (cursor stays at %d: those events "
                "are dropped)",
                published,
                reason,
                self.version,
                self.progress.cursor,
            )
            return None
        self.version = published
        self.progress.rejected = 0
        self._acknowledge()
        self._published = self._snapshot()
        metrics.PUBLISHED.inc()
        metrics.VERSION.set(version_number(self.version))
        log.info(
            "published %s: cursor %d, %d steps, mean reward %s, probe KL %.3f, gate Δ low %s",
            self.version,
            self.progress.cursor,
            self.progress.steps,
            metadata["window_mean_reward"],
            probe_kl,
            gate.get("difference_low", "not judged"),
        )
        return self.version

    def _close_window(self) -> None:
        """A version is being published: the next one's window starts empty."""
        self._reset_caps()
        self.progress.window_rewards = []
        self.progress.window_examples = 0
        self.progress.window_held_out = 0
        self._show_window()

    def _take_verdict(self) -> str | None:
        """publish() on a rank other than 0: the same window closed, and rank 0's verdict
        followed (back to the published weights after a rejection), so weights, optimizer
        and version stay the same on every rank."""
        self._close_window()
        published, reason = distributed.broadcast_object(None)
        if reason:
            self._restore()
            self.progress.rejected += 1
            return None
        self.version = published
        self.progress.rejected = 0
        self._published = self._snapshot()
        return published

    def _acknowledge(self) -> None:
        """Tell the buffer that every event up to the cursor is in a published version
        (XACK on Redis). Best effort: the cursor inside the version is what a restart
        trusts, and the next publish acknowledges what this one could not."""
        try:
            self.buffer.commit(self.progress.cursor)
        except Unavailable as exc:
            log.warning("could not acknowledge events up to %d: %s", self.progress.cursor, exc)

    # -- following the servers ---------------------------------------------------------

    def rebase_target(self) -> tuple[str, str] | None:
        """(version, why) when the learner should continue from the version servers serve
        instead of its own: its last version was rolled back (the canary's test found it
        worse, or an operator), or an operator promoted another version after it was
        published. A canary rolled back only because its window ended undecided is not
        shown worse: the learner goes on from it, so what it learned is not thrown away at
        a traffic too small to show it within one window; its next version is canaried
        against the serving one again, the test catches it if it is worse."""
        if self.version != BASE_VERSION:
            record = self.registry.rollout(self.version)
            undecided = (
                record is not None
                and record.get("by") == "test"
                and record.get("evidence", {}).get("outcome") == "undecided"
            )
            if record is not None and record["state"] == ROLLED_BACK and not undecided:
                serving = self.registry.serving()
                return serving, f"{self.version} was rolled back ({record['reason']})"
        published = (
            self.registry.manifest(self.version).created_at if self.version != BASE_VERSION else 0.0
        )
        decided = [
            r
            for r in self.registry.decisions().values()
            if r.get("by") == "operator" and r["state"] == PROMOTED and r["at"] > published
        ]
        if decided:
            newest = max(decided, key=lambda r: r["at"])
            serving = self.registry.serving()
            if serving == str(newest["version"]) and serving != self.version:
                return serving, f"an operator promoted {serving} ({newest['reason']})"
        return None

    def rebase(self, version: str, why: str) -> None:
        """Continue from `version`'s weights: its adapter (v0: a zero update), its feedback
        head, a fresh optimizer. The cursor stays: events since are trained onto it."""
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        with torch.no_grad():
            if version == BASE_VERSION:
                for name, p in self.model.named_parameters():
                    if p.requires_grad and "lora_B" in name:
                        p.zero_()  # B = 0: the adapter adds nothing, the base model
            else:
                path = self.registry.path(version)
                weights = load_peft_weights(str(path), device=str(self.device))
                set_peft_model_state_dict(self.model, weights)
                if (path / HEAD_FILE).exists():
                    self.head.load_state_dict(
                        torch.load(path / HEAD_FILE, map_location=self.device, weights_only=True)
                    )
        self.optimizer = torch.optim.AdamW(self.params, lr=self.config.lr)
        log.warning("rebasing onto %s, the version servers serve: %s", version, why)
        metrics.REBASES.inc()
        self.version = version
        self._published = self._snapshot()
        metrics.VERSION.set(version_number(version))

    def follow_servers(self) -> None:
        """Rebase when servers decided something that calls for it; the decisions are read
        again only when the registry's rollout records changed (a rename changes the
        folder's mtime), not on every turn of the loop. Under torchrun rank 0 reads them and
        every rank rebases."""
        if (target := distributed.on_main(self._new_rebase_target)) is not None:
            self.rebase(*target)

    def _new_rebase_target(self) -> tuple[str, str] | None:
        stamp = self.registry.rollout_stamp()
        if stamp == self._rollout_stamp:
            return None
        self._rollout_stamp = stamp
        return self.rebase_target()

    def run(self, stop: threading.Event) -> None:
        """Learn until `stop` is set or max_steps is reached. Each time it runs out of
        events it logs once what it has and what it waits for; between steps it rebases
        onto the serving version when its own was rolled back or an operator promoted
        another. Under torchrun every rank takes rank 0's word on when to stop and when
        to train: their own clocks would part them."""
        said = ""
        while not distributed.on_main(stop.is_set):
            self.follow_servers()
            self.fill()
            self._show_window()
            self._show_lag()
            trained = distributed.on_main(self.ready, self.config.batch_wait_s)
            if trained:
                self.train_pending()
            if self.due():
                self.publish()
            if trained:
                said = ""
                if self.config.max_steps and self.progress.steps >= self.config.max_steps:
                    return
                continue
            if not self.pending and self.since_publish and (why := self.waiting()) != said:
                log.info("%s", why)
                said = why
            stop.wait(self.config.poll_s)


class _Reference:
    """The policy with its adapter switched off: the frozen base model, for the judge."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, **inputs):
        with self.model.disable_adapter():
            return self.model(**inputs)
