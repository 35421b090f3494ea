"""Feedback → scalar reward in [−1, 1], configured by one TOML file.

`kaizen/data/rewards.toml` is the documented default; `kaizen learn --rewards FILE` reads
another with the same keys (any it leaves out keep their default). Per kind of feedback:

| kind       | reward                                            | why                    |
|------------|---------------------------------------------------|------------------------|
| thumb      | ±`thumb`                                          | the explicit verdict   |
| rating     | `rating` × (rating − 3) / 2: 1→−1, 3→0, 5→+1      | explicit, graded       |
| copy       | `copy`                                            | the user kept it       |
| click      | `click`                                           | weak interest          |
| dwell      | `dwell` × min(1, dwell / time to read the answer) | reading, by length     |
| regenerate | `regenerate` (negative)                           | asked for another      |
| correction | `correction` (negative)                           | it needed correcting   |
| comment    | `comment` × the judge's score in [−1, 1]          | language feedback      |
| (silence)  | `no_reaction`, once `no_reaction_window_s` passed | nobody cared (0 = off) |

A comment's text carries the verdict, so a judge (`learner.judge`) scores it; without a
judge a comment gives no reward. A correction also becomes a supervised target and a
preference pair (correction ≻ original) in `learner.examples`.

Then time decay: a reward is multiplied by 0.5^(age / `half_life_s`), where age is how
old the answer is when the learner trains on it (0 = no decay), so that feedback on
answers from long-gone versions counts less. The result is clipped to [−1, 1].
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from kaizen.events import Feedback, FeedbackKind, Generation

DEFAULT_FILE = Path(__file__).parent / "data" / "rewards.toml"


@dataclass(frozen=True)
class RewardConfig:
    # [explicit]
    thumb: float = 1.0  # multiplies ±1
    rating: float = 1.0  # multiplies (rating − 3) / 2
    # [implicit]
    copy: float = 0.5
    click: float = 0.1
    dwell: float = 0.3  # reward once the user stayed long enough to read the whole answer
    reading_words_per_s: float = 4.0  # how fast users read: time to read = words / this
    min_read_s: float = 2.0  # time to read counts at least this much, for one-word answers
    regenerate: float = -0.5
    correction: float = -0.5
    no_reaction: float = 0.0  # an answer nobody reacted to at all; 0 = not a signal
    no_reaction_window_s: float = 600.0  # …within this long after it was given
    # [language]
    comment: float = 0.5  # multiplies the comment judge's score in [−1, 1]
    # [decay]
    half_life_s: float = 0.0  # 0 = no decay


SECTIONS = {
    "explicit": ("thumb", "rating"),
    "implicit": (
        "copy",
        "click",
        "dwell",
        "reading_words_per_s",
        "min_read_s",
        "regenerate",
        "correction",
        "no_reaction",
        "no_reaction_window_s",
    ),
    "language": ("comment",),
    "decay": ("half_life_s",),
}
POSITIVE = {"reading_words_per_s", "min_read_s", "no_reaction_window_s"}
NON_NEGATIVE = {"half_life_s"}


class RewardConfigError(ValueError):
    """A reward file that cannot be used; the message names the file and the key."""


def load_rewards(path: Path | None = None) -> RewardConfig:
    """The reward configuration in `path` (the shipped defaults when None)."""
    path = DEFAULT_FILE if path is None else Path(path)
    try:
        table = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RewardConfigError(f"{path}: no such reward file") from None
    except tomllib.TOMLDecodeError as exc:
        raise RewardConfigError(f"{path}: not valid TOML: {exc}") from None
    values: dict[str, float] = {}
    for section, body in table.items():
        if section not in SECTIONS:
            raise RewardConfigError(
                f"{path}: unknown section [{section}]; expected one of {', '.join(SECTIONS)}"
            )
        if not isinstance(body, dict):
            raise RewardConfigError(f"{path}: {section} must be a [section] of keys")
        for key, value in body.items():
            where = f"{path}: {section}.{key}"
            if key not in SECTIONS[section]:
                raise RewardConfigError(
                    f"{where}: unknown key; [{section}] takes {', '.join(SECTIONS[section])}"
                )
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise RewardConfigError(f"{where}: must be a number, got {value!r}")
            if not math.isfinite(value) or (key not in POSITIVE | NON_NEGATIVE and abs(value) > 1):
                raise RewardConfigError(f"{where}: {value} is outside −1..1")
            if key in POSITIVE and value <= 0:
                raise RewardConfigError(f"{where}: must be above 0, got {value}")
            if key in NON_NEGATIVE and value < 0:
                raise RewardConfigError(f"{where}: must be 0 or more, got {value}")
            values[key] = float(value)
    return RewardConfig(**values)


def reward(
    feedback: Feedback,
    config: RewardConfig = RewardConfig(),
    generation: Generation | None = None,
    now: float | None = None,
    comment_score: float | None = None,
    words: int | None = None,
) -> float | None:
    """The reward one feedback event gives its answer, or None when it gives none.

    `generation` (the answer) normalises dwell time by its length and dates it for the
    decay; without it, dwell is measured against the answer's `words` when given (else
    `min_read_s`) and nothing decays.
    `comment_score` is the judge's verdict on a comment's text; without it a comment
    gives no reward.
    """
    if generation is not None:
        words = len(generation.text.split())
    r = _raw(feedback, config, words or 0, comment_score)
    if r is None:
        return None
    if config.half_life_s > 0 and generation is not None and now is not None:
        age = max(0.0, now - generation.created_at)
        r *= 0.5 ** (age / config.half_life_s)
    return max(-1.0, min(1.0, r))


def _raw(
    feedback: Feedback, c: RewardConfig, words: int, comment_score: float | None
) -> float | None:
    match feedback.kind:
        case FeedbackKind.THUMB:
            return c.thumb * (1.0 if feedback.value > 0 else -1.0)
        case FeedbackKind.RATING:
            return c.rating * (feedback.value - 3.0) / 2.0
        case FeedbackKind.COPY:
            return c.copy
        case FeedbackKind.CLICK:
            return c.click
        case FeedbackKind.DWELL:
            read_s = max(c.min_read_s, words / c.reading_words_per_s)
            return c.dwell * min(1.0, feedback.value / 1000.0 / read_s)
        case FeedbackKind.REGENERATE:
            return c.regenerate
        case FeedbackKind.CORRECTION:
            return c.correction
        case FeedbackKind.COMMENT:
            return None if comment_score is None else c.comment * comment_score
        case FeedbackKind.NO_REACTION:
            return c.no_reaction or None
    raise ValueError(f"kind: unknown feedback kind {feedback.kind!r}")


def to_toml(config: RewardConfig) -> str:
    """The configuration as a reward file `load_rewards` reads back."""
    by_name = {f.name: getattr(config, f.name) for f in fields(config)}
    lines = []
    for section, keys in SECTIONS.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {by_name[key]!r}" for key in keys]
        lines.append("")
    return "\n".join(lines)
