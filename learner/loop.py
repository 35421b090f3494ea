"""The online loop: tail the buffer, reward, step, publish.

Exactly-once, by construction: the learner's cursor (the last feedback event whose
effect is in the weights), its optimizer and its baseline are saved inside each
published version, in the same atomic rename as the adapter. A restarted learner
resumes from the newest version and re-reads every event after that version's cursor:
events trained on but not yet published are trained on again, once, from the weights
that were published, and no event is skipped.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from kaizen import modeling
from kaizen.buffer import ReplayBuffer, Sample, open_buffer
from kaizen.registry import BASE_VERSION, Registry, version_number
from learner import metrics
from learner.config import LearnerConfig
from learner.reinforce import reinforce_loss
from learner.rewards import load_rewards, reward

log = logging.getLogger(__name__)

STATE_FILE = "learner_state.pt"


@dataclass
class Progress:
    """What a published version remembers about the learner that made it."""

    cursor: int = 0  # every feedback event with seq ≤ cursor is in the weights
    baseline: float = 0.0  # running-mean reward
    steps: int = 0
    samples: int = 0  # rewarded samples trained on, all versions together
    window_rewards: list[float] = field(default_factory=list)  # since the last publish


@dataclass(frozen=True)
class StepResult:
    ok: bool
    reason: str  # "ok" | "nonfinite_loss" | "nonfinite_grad"
    loss: float
    kl: float
    mean_reward: float


class Learner:
    def __init__(self, config: LearnerConfig, buffer: ReplayBuffer | None = None) -> None:
        from peft import LoraConfig, PeftModel, get_peft_model

        self.config = config
        self.rewards = load_rewards(config.rewards)  # a bad file fails before anything loads
        self.info = modeling.model_info(config.model)
        self.device = modeling.pick_device(config.device)
        self.tokenizer = modeling.load_tokenizer(config.model)
        self.buffer = buffer if buffer is not None else open_buffer(config.buffer)
        self.registry = Registry(config.registry)
        base = modeling.load_model(config.model, self.device, torch.float32)
        for p in base.parameters():
            p.requires_grad_(False)

        self.version = self.registry.latest()
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
                baseline=float(state["baseline"]),
                steps=int(state["steps"]),
                samples=int(state["samples"]),
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
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr)
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.read_cursor = self.progress.cursor  # how far read; ≥ cursor while a batch fills
        self.pending: list[tuple[Sample, float]] = []
        self.first_pending_at = 0.0
        metrics.CURSOR.set(self.progress.cursor)
        metrics.BASELINE.set(self.progress.baseline)
        metrics.VERSION.set(version_number(self.version))

    @property
    def since_publish(self) -> int:
        """Rewarded samples trained on since the last publish."""
        return len(self.progress.window_rewards)

    # -- reading -----------------------------------------------------------------------

    def fill(self) -> None:
        """Read events after the cursor until a batch is full or the buffer is drained."""
        while len(self.pending) < self.config.batch_size:
            # never read more rows than the batch can take, so nothing read is left over
            rows = self.buffer.read_samples(
                self.read_cursor, self.config.batch_size - len(self.pending)
            )
            if not rows:
                return
            for sample in rows:
                self.read_cursor = sample.seq
                r = reward(sample.feedback, self.rewards, sample.generation, time.time())
                metrics.SAMPLES.labels("yes" if r is not None else "no").inc()
                if r is not None:
                    if not self.pending:
                        self.first_pending_at = time.monotonic()
                    self.pending.append((sample, r))
            if not self.pending:  # only reward-less events read: nothing is owed to them
                self.progress.cursor = self.read_cursor
                metrics.CURSOR.set(self.progress.cursor)

    def ready(self, batch_wait_s: float) -> bool:
        """A full batch, or a partial one that has waited long enough."""
        if len(self.pending) >= self.config.batch_size:
            return True
        return bool(self.pending) and time.monotonic() - self.first_pending_at >= batch_wait_s

    # -- learning ----------------------------------------------------------------------

    def _collate(self, batch: list[tuple[Sample, float]]):
        rows = [s.generation.prompt_tokens + s.generation.response_tokens for s, _ in batch]
        width = max(len(r) for r in rows)
        B = len(rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((B, width), pad, dtype=torch.long)
        attention = torch.zeros((B, width), dtype=torch.long)
        mask = torch.zeros((B, width), dtype=torch.long)  # 1 on response tokens
        for i, (sample, _) in enumerate(batch):
            n_prompt = len(sample.generation.prompt_tokens)
            ids[i, : len(rows[i])] = torch.tensor(rows[i])
            attention[i, : len(rows[i])] = 1
            mask[i, n_prompt : len(rows[i])] = 1
        rewards = torch.tensor([r for _, r in batch], dtype=torch.float32)
        to = self.device
        return ids.to(to), attention.to(to), mask.to(to), rewards.to(to)

    def step(self, batch: list[tuple[Sample, float]]) -> StepResult:
        """One REINFORCE step on `batch`; a non-finite loss or gradient drops it."""
        started = time.perf_counter()
        ids, attention, mask, rewards = self._collate(batch)
        advantages = rewards - self.progress.baseline
        self.model.train()
        logits = self.model(input_ids=ids, attention_mask=attention).logits  # (B, T, V)
        with torch.no_grad(), self.model.disable_adapter():
            ref_logits = self.model(input_ids=ids, attention_mask=attention).logits
        terms = reinforce_loss(logits, ref_logits, ids, mask, advantages, self.config.kl_coef)
        mean_reward = float(rewards.mean())
        m = self.config.baseline_momentum
        self.progress.baseline = m * self.progress.baseline + (1 - m) * mean_reward
        self.optimizer.zero_grad(set_to_none=True)
        reason = "ok"
        if not torch.isfinite(terms.loss):
            reason = "nonfinite_loss"
        else:
            terms.loss.backward()
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
            log.warning("dropped a step: %s", reason)
        else:
            self.progress.steps += 1
            metrics.LOSS.set(float(terms.loss.detach()))
            metrics.KL.set(float(terms.kl))
            metrics.REWARD.set(mean_reward)
        return StepResult(
            reason == "ok", reason, float(terms.loss.detach()), float(terms.kl), mean_reward
        )

    def train_pending(self) -> StepResult:
        batch, self.pending = self.pending, []
        result = self.step(batch)
        # Consumed either way: a dropped step's events are not retried forever.
        self.progress.cursor = self.read_cursor
        self.progress.samples += len(batch)
        self.progress.window_rewards.extend(r for _, r in batch)
        metrics.CURSOR.set(self.progress.cursor)
        return result

    # -- publishing --------------------------------------------------------------------

    def publish(self) -> str:
        rewards = self.progress.window_rewards
        metadata = {
            "objective": "reinforce",
            "cursor": self.progress.cursor,
            "steps": self.progress.steps,
            "samples": self.progress.samples,
            "window_samples": len(rewards),
            "window_mean_reward": sum(rewards) / len(rewards) if rewards else None,
            "baseline": self.progress.baseline,
        }
        with self.registry.publish(self.info.name, metadata) as staging:
            self.model.save_pretrained(staging)
            torch.save(
                {
                    "cursor": self.progress.cursor,
                    "baseline": self.progress.baseline,
                    "steps": self.progress.steps,
                    "samples": self.progress.samples,
                    "optimizer": self.optimizer.state_dict(),
                },
                staging / STATE_FILE,
            )
        self.version = self.registry.latest()
        self.progress.window_rewards = []
        metrics.PUBLISHED.inc()
        metrics.VERSION.set(version_number(self.version))
        log.info(
            "published %s: cursor %d, %d steps, mean reward %s",
            self.version,
            self.progress.cursor,
            self.progress.steps,
            metadata["window_mean_reward"],
        )
        return self.version

    def run(self, stop: threading.Event) -> None:
        """Learn until `stop` is set or max_steps is reached."""
        while not stop.is_set():
            self.fill()
            if self.ready(self.config.batch_wait_s):
                self.train_pending()
                if self.since_publish >= self.config.publish_every:
                    self.publish()
                if self.config.max_steps and self.progress.steps >= self.config.max_steps:
                    return
            else:
                stop.wait(self.config.poll_s)
