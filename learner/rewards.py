"""Feedback → scalar reward in [−1, 1].

Defaults, one per kind of feedback:

| kind        | reward                                   | why |
|-------------|------------------------------------------|-----|
| thumb       | +1 up, −1 down                           | the explicit verdict |
| rating      | (rating − 3) / 2, so 1→−1, 3→0, 5→+1     | explicit, graded |
| copy        | +0.5                                     | the user kept the answer |
| click       | +0.1                                     | weak interest |
| dwell_ms    | +0.3 × min(1, dwell_s / 30)              | reading time, saturating |
| regenerate  | −0.5                                     | the user asked for another answer |
| correction  | −0.5 (the answer needed correcting)      | the correction becomes a target later |
| comment     | none: skipped until a judge scores it    | free text carries no sign by itself |
"""

from __future__ import annotations

from dataclasses import dataclass

from kaizen.events import Feedback, FeedbackKind


@dataclass(frozen=True)
class RewardWeights:
    thumb: float = 1.0  # multiplies ±1
    rating: float = 1.0  # multiplies (rating − 3) / 2
    copy: float = 0.5
    click: float = 0.1
    dwell: float = 0.3  # reward at or beyond dwell_full_s
    dwell_full_s: float = 30.0
    regenerate: float = -0.5
    correction: float = -0.5


def reward(feedback: Feedback, w: RewardWeights = RewardWeights()) -> float | None:
    """The reward one feedback event gives its answer, or None when it gives none."""
    match feedback.kind:
        case FeedbackKind.THUMB:
            return w.thumb * (1.0 if feedback.value > 0 else -1.0)
        case FeedbackKind.RATING:
            return w.rating * (feedback.value - 3.0) / 2.0
        case FeedbackKind.COPY:
            return w.copy
        case FeedbackKind.CLICK:
            return w.click
        case FeedbackKind.DWELL:
            return w.dwell * min(1.0, feedback.value / 1000.0 / w.dwell_full_s)
        case FeedbackKind.REGENERATE:
            return w.regenerate
        case FeedbackKind.CORRECTION:
            return w.correction
        case FeedbackKind.COMMENT:
            return None
    raise ValueError(f"kind: unknown feedback kind {feedback.kind!r}")
