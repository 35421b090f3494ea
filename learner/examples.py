"""Feedback events → training examples: scored answers, targets to imitate, preference pairs.

One event on one answer can give several examples:

- every rewarded event: `Scored(answer, reward)` (reinforce, kto, and joint's feedback head);
- an event whose reward is at least `sft_min_reward`: `Target(answer)` (sft, joint, kto);
- a correction: `Target(correction)` — the answer the user wrote, to imitate — and
  `Pair(correction ≻ original)` (dpo), besides the correction's own negative reward;
- a regenerate, then a reward of at least `sft_min_reward` (clearly liked: a thumb up,
  4–5 stars, a copy; not mere reading time) from the same user on another answer to the
  same conversation: `Pair(liked ≻ regenerated)`. The regenerated answers wait in a bounded
  memory (the newest 4,096); a restarted learner forgets them.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from kaizen import modeling
from kaizen.events import FeedbackKind, Generation


@dataclass(frozen=True)
class Answer:
    """Token ids of a prompt and an answer, with how the answer was sampled."""

    prompt: tuple[int, ...]
    response: tuple[int, ...]
    behaviour: tuple[float, ...] | None  # logged log μ per response token; None: not sampled
    temperature: float  # 0: greedy or not sampled (no importance ratio)
    source: str = field(default="", compare=False)  # the logged answer it comes from
    top_p: float = 1.0  # the nucleus it was sampled from (μ is logged under it); 1: none

    @classmethod
    def of(cls, g: Generation) -> Answer:
        """The answer as logged; its log μ only when sampled, with one finite value a token."""
        logged = g.behaviour_logprobs
        sampled = (
            g.sampling.temperature > 0
            and len(logged) == len(g.response_tokens)
            and all(math.isfinite(x) for x in logged)
        )
        return cls(
            tuple(g.prompt_tokens),
            tuple(g.response_tokens),
            tuple(logged) if sampled else None,
            g.sampling.temperature if sampled else 0.0,
            g.response_id,
            min(1.0, g.sampling.top_p) if sampled and g.sampling.top_p > 0 else 1.0,
        )


def collate(answers: list[Answer], pad_id: int, device: torch.device):
    """Right-padded tensors for one forward pass over `answers`: (ids, attention, mask of
    response tokens, logged behaviour log μ, temperature, top_p); the last two per answer."""
    rows = [a.prompt + a.response for a in answers]
    width = max(len(r) for r in rows)
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    attention = torch.zeros((B, width), dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)  # 1 on response tokens
    behaviour = torch.zeros((B, width), dtype=torch.float32)
    temperature = torch.zeros(B, dtype=torch.float32)
    top_p = torch.ones(B, dtype=torch.float32)
    for i, a in enumerate(answers):
        n_prompt = len(a.prompt)
        ids[i, : len(rows[i])] = torch.tensor(rows[i])
        attention[i, : len(rows[i])] = 1
        mask[i, n_prompt : len(rows[i])] = 1
        if a.behaviour is not None:
            behaviour[i, n_prompt : len(rows[i])] = torch.tensor(a.behaviour)
            temperature[i] = a.temperature
            top_p[i] = a.top_p
    tensors = (ids, attention, mask, behaviour, temperature, top_p)
    return tuple(x.to(device) for x in tensors)


@dataclass(frozen=True)
class Scored:
    answer: Answer
    reward: float


@dataclass(frozen=True)
class Target:
    answer: Answer


@dataclass(frozen=True)
class Pair:
    chosen: Answer
    rejected: Answer


Example = Scored | Target | Pair


def sources(example: Example) -> set[str]:
    """The logged answers an example was made from."""
    parts = (example.chosen, example.rejected) if isinstance(example, Pair) else (example.answer,)
    return {a.source for a in parts if a.source}


# which examples each objective trains on
USES: dict[str, tuple[type, ...]] = {
    "reinforce": (Scored,),
    "kto": (Scored, Target),
    "dpo": (Pair,),
    "sft": (Target,),
    "joint": (Scored, Target),
}


def _conversation(g: Generation) -> tuple[str, str]:
    return g.user_id, json.dumps(g.messages, sort_keys=True)


class Shaper:
    """Turns (generation, feedback kind, reward, text) into examples; remembers regenerations."""

    def __init__(self, tokenizer, sft_min_reward: float, memory: int = 4096) -> None:
        self.tokenizer = tokenizer
        self.end_of_turn = modeling.end_of_turn_id(tokenizer)
        self.sft_min_reward = sft_min_reward
        self.memory = memory
        self.regenerated: OrderedDict[tuple[str, str], Generation] = OrderedDict()

    def correction(self, g: Generation, text: str) -> Answer:
        tokens = self.tokenizer.encode(text.strip(), add_special_tokens=False)
        return Answer(tuple(g.prompt_tokens), (*tokens, self.end_of_turn), None, 0.0, g.response_id)

    def examples(
        self, g: Generation, kind: FeedbackKind, reward: float | None, text: str = ""
    ) -> list[Example]:
        out: list[Example] = []
        answer = Answer.of(g)
        if reward is not None:
            out.append(Scored(answer, reward))
            if reward >= self.sft_min_reward:
                out.append(Target(answer))
        if kind == FeedbackKind.CORRECTION and text.strip():
            wanted = self.correction(g, text)
            out += [Target(wanted), Pair(wanted, answer)]
        key = _conversation(g)
        if kind == FeedbackKind.REGENERATE:
            self.regenerated[key] = g
            self.regenerated.move_to_end(key)
            while len(self.regenerated) > self.memory:
                self.regenerated.popitem(last=False)
        elif reward is not None and reward >= self.sft_min_reward:  # clearly liked
            earlier = self.regenerated.get(key)
            if earlier is not None and earlier.response_id != g.response_id:
                del self.regenerated[key]
                out.append(Pair(answer, Answer.of(earlier)))
        return out
