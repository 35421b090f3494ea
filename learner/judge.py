"""The comment judge: a written comment ("too long", "wrong, it's Lyon") → a score in [−1, 1].

By default the frozen base model itself is asked a yes/no question about the comment,
and the score is how much more it believes "yes" than "no":

    score = tanh((log p(yes) − log p(no) − bias) / scale)

where p(·) is the probability of the answer's first token, `bias` centres the score on
the model's own leaning, measured once on a comment that says nothing ("ok"), and
`scale` (0.25) stretches a small model's timid log-odds over [−1, 1].
`kaizen bench judge` measures its accuracy on `learner/data/comments.tsv`, a labelled
set of comments written for the project.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from kaizen import modeling

QUESTION = (
    "A user wrote this comment about the answer a chatbot gave them:\n\n"
    '"{comment}"\n\n'
    "Was the user happy with the answer? Reply with yes or no."
)
NEUTRAL = "ok"
YES = ("yes", "Yes", " yes", " Yes", "YES")
NO = ("no", "No", " no", " No", "NO")


def labelled_comments(path: Path | None = None) -> list[tuple[str, bool]]:
    """(comment, liked) pairs from a TSV file; the shipped labelled set by default."""
    if path is None:
        text = (resources.files("learner") / "data" / "comments.tsv").read_text()
    else:
        text = Path(path).read_text()
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        label, sep, comment = line.partition("\t")
        if not sep or label not in ("0", "1") or not comment.strip():
            raise ValueError(f"{path or 'comments.tsv'}:{number}: expected 0|1<TAB>comment")
        rows.append((comment.strip(), label == "1"))
    return rows


def _first_token_ids(tokenizer, words: tuple[str, ...]) -> list[int]:
    ids = {tokenizer.encode(w, add_special_tokens=False)[0] for w in words}
    return sorted(ids)


@dataclass(frozen=True)
class Accuracy:
    accuracy: float
    n: int
    scores: list[float]


class CommentJudge:
    """Scores comments with a causal LM (the learner passes its frozen reference)."""

    def __init__(
        self, model, tokenizer, device: torch.device, batch_size: int = 16, scale: float = 0.25
    ) -> None:
        self.scale = scale
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        self.yes = _first_token_ids(tokenizer, YES)
        self.no = _first_token_ids(tokenizer, NO)
        self.bias = 0.0
        self.bias = math.atanh(max(-0.999999, min(0.999999, self.score([NEUTRAL])[0]))) * scale

    @torch.no_grad()
    def score(self, comments: list[str]) -> list[float]:
        """One score in [−1, 1] per comment: > 0 the user was pleased, < 0 not."""
        out: list[float] = []
        for start in range(0, len(comments), self.batch_size):
            chunk = comments[start : start + self.batch_size]
            prompts = [
                modeling.chat_prompt_ids(
                    self.tokenizer,
                    [{"role": "user", "content": QUESTION.format(comment=c.strip()[:500])}],
                )
                for c in chunk
            ]
            width = max(len(p) for p in prompts)
            pad = self.tokenizer.pad_token_id
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left-padded
            attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            position = (attention.cumsum(-1) - 1).clamp(min=0)
            logits = (
                self.model(
                    input_ids=ids.to(self.device),
                    attention_mask=attention.to(self.device),
                    position_ids=position.to(self.device),
                )
                .logits[:, -1]
                .float()
            )
            logp = logits.log_softmax(-1)
            log_odds = logp[:, self.yes].logsumexp(-1) - logp[:, self.no].logsumexp(-1)
            out += [float(v) for v in torch.tanh((log_odds - self.bias) / self.scale)]
        return out

    def accuracy(self, labelled: list[tuple[str, bool]]) -> Accuracy:
        scores = self.score([c for c, _ in labelled])
        right = sum((s > 0) == liked for s, (_, liked) in zip(scores, labelled, strict=True))
        return Accuracy(right / len(labelled), len(labelled), scores)
