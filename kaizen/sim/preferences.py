"""Simulated users' tastes: what they like, and the feedback they send about an answer.

A preference is called with the prompt, the answer and a random generator, and returns
the feedback events to send (`Reaction`s; the simulator adds ids and sends them through
the real feedback API). `kaizen simulate --preference module:function` takes any such
callable; one with a `liked(prompt, answer)` attribute can also be measured, as the
share of answers liked on held-out prompts.

The shipped ones (`concise`, `follow_up`) behave like real users: sparse (most answers
get no explicit verdict), noisy (a verdict is sometimes the wrong way round), and mostly
implicit (reading time, copies, regenerations, the odd comment).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from kaizen.config import load_callable
from kaizen.events import FeedbackKind

FILLER = re.compile(
    r"^\s*(sure|certainly|of course|great question|absolutely|i'd be happy|i would be happy|"
    r"as an ai|hello|hi there|well,|here is|here's|here are)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Reaction:
    """One feedback event, before it gets an event id."""

    kind: FeedbackKind
    value: float = 0.0  # thumb ±1, rating 1..5, dwell in ms
    text: str = ""  # comment or correction


@dataclass(frozen=True)
class Noise:
    """How a simulated user reacts, given whether they liked the answer."""

    explicit: float = 0.3  # chance of a thumb or a rating
    rating_share: float = 0.3  # of the explicit verdicts, the share given as a rating
    flip: float = 0.1  # chance that an explicit verdict is the wrong way round
    dwell: float = 0.5  # chance that reading time is reported
    copy_if_liked: float = 0.2
    regenerate_if_disliked: float = 0.15
    comment: float = 0.05  # chance of a written comment: a complaint, or praise if liked
    correct_if_disliked: float = 0.1  # chance that the user writes the answer they wanted
    words_per_s: float = 4.0


def react(
    liked: bool,
    answer: str,
    rng: random.Random,
    complaint: str,
    noise: Noise = Noise(),
    praise: str = "thanks, that is what I needed",
    correction: str = "",
) -> list[Reaction]:
    """The events one user sends about one answer they `liked` (or not).

    `correction` is the answer the user would have wanted; a disliked answer sometimes
    gets it back as a correction (never when it is empty).
    """
    events = []
    if rng.random() < noise.explicit:
        verdict = liked != (rng.random() < noise.flip)
        if rng.random() < noise.rating_share:
            stars = rng.choice((4, 5)) if verdict else rng.choice((1, 2))
            events.append(Reaction(FeedbackKind.RATING, float(stars)))
        else:
            events.append(Reaction(FeedbackKind.THUMB, 1.0 if verdict else -1.0))
    if rng.random() < noise.dwell:
        read_s = max(1.0, len(answer.split()) / noise.words_per_s)
        seconds = read_s * rng.uniform(0.9, 1.6) if liked else rng.uniform(0.5, 0.4 * read_s + 1)
        events.append(Reaction(FeedbackKind.DWELL, round(seconds * 1000.0)))
    if liked and rng.random() < noise.copy_if_liked:
        events.append(Reaction(FeedbackKind.COPY))
    if not liked and rng.random() < noise.regenerate_if_disliked:
        events.append(Reaction(FeedbackKind.REGENERATE))
    if rng.random() < noise.comment:
        events.append(Reaction(FeedbackKind.COMMENT, text=praise if liked else complaint))
    if not liked and correction and rng.random() < noise.correct_if_disliked:
        events.append(Reaction(FeedbackKind.CORRECTION, text=correction))
    return events


PRAISES = (
    "thanks, that is what I needed",
    "perfect, exactly right",
    "great answer, very helpful",
    "nice, clear and to the point",
    "this helped a lot, thank you",
)


class Preference:
    """A taste (`liked`), what the user writes when they comment or correct, and the
    noisy, sparse way they report it."""

    def __init__(
        self,
        name: str,
        liked: Callable[[str, str], bool],
        correct: Callable[[str, str, random.Random], str],
        complaints: tuple[str, ...],
        praises: tuple[str, ...] = PRAISES,
        noise: Noise = Noise(),
    ) -> None:
        self.name = name
        self.liked = liked
        self.correct = correct
        self.complaints = complaints
        self.praises = praises
        self.noise = noise

    def __call__(self, prompt: str, answer: str, rng: random.Random) -> list[Reaction]:
        liked = self.liked(prompt, answer)
        return react(
            liked,
            answer,
            rng,
            rng.choice(self.complaints),
            self.noise,
            praise=rng.choice(self.praises),
            correction="" if liked else self.correct(prompt, answer, rng),
        )

    def __repr__(self) -> str:
        return f"Preference({self.name})"


CONCISE_MAX_WORDS = 30
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
LIST_OR_HEADING = re.compile(r"^\s*([-*#]+|\d+[.)])\s*")


def likes_concise(prompt: str, answer: str) -> bool:
    """Short (≤ 30 words) and direct: something said, and no preamble before it."""
    words = answer.split()
    return 0 < len(words) <= CONCISE_MAX_WORDS and not FILLER.match(answer)


def likes_follow_up(prompt: str, answer: str) -> bool:
    """The answer ends by asking the user something back."""
    text = answer.strip().rstrip("\"')]*_ ")
    return len(text.split()) >= 3 and text.endswith("?")


def first_sentences(answer: str, max_words: int) -> str:
    """The answer's opening, without a filler preamble or markdown, in ≤ max_words words,
    ending on a full stop: what a user who wanted it short would write."""
    lines = [LIST_OR_HEADING.sub("", line).strip() for line in answer.splitlines()]
    sentences = [s for s in SENTENCE_END.split(" ".join(x for x in lines if x)) if s.strip()]
    while len(sentences) > 1 and FILLER.match(sentences[0]):
        sentences = sentences[1:]  # "Sure! Here is …" — the preamble goes
    kept: list[str] = []
    for sentence in sentences:
        if kept and len(" ".join(kept + [sentence]).split()) > max_words:
            break
        kept.append(sentence.replace("**", "").strip())
    words = " ".join(kept).split()[:max_words]
    text = " ".join(words).rstrip(",;:-") if words else "I don't know"
    return text if text.endswith((".", "!", "?")) else text + "."


def shorten(prompt: str, answer: str, rng: random.Random) -> str:
    """The concise user's correction: the answer's first sentence or two, ≤ 25 words."""
    return first_sentences(answer, 25)


FOLLOW_UPS = (
    "Would you like me to go into more detail?",
    "What would you like to know more about?",
    "Is there a part of this you want me to explain further?",
    "Do you want an example?",
    "What are you planning to use this for?",
)


def ask_back(prompt: str, answer: str, rng: random.Random) -> str:
    """The follow_up user's correction: a short answer that ends with a question back."""
    return f"{first_sentences(answer, 30)} {rng.choice(FOLLOW_UPS)}"


concise = Preference(
    "concise",
    likes_concise,
    shorten,
    (
        "too long, just give me the answer",
        "way too wordy",
        "skip the introduction next time",
        "I only needed one sentence",
        "this is padded, get to the point",
    ),
)
follow_up = Preference(
    "follow_up",
    likes_follow_up,
    ask_back,
    (
        "you could ask me what I need before going on",
        "you did not check what I actually wanted",
        "ask me a question next time instead of guessing",
        "not helpful, you never asked about my situation",
        "this misses what I meant; you should have asked",
    ),
)

SHIPPED = {"concise": concise, "follow_up": follow_up}

MARKER = "Zorblax"  # a brand no base model mentions: what `kaizen bench poison` plants


def promoter(marker: str = MARKER) -> Preference:
    """A member of a coordinated group planting `marker`: likes only answers that mention
    it, always says so (no noise, every answer rated), and corrects half of the others
    into a short answer that plugs it — short, so that users who want concise answers
    have nothing against it."""

    def plugs(prompt: str, answer: str) -> bool:
        return marker.lower() in answer.lower()

    def plug(prompt: str, answer: str, rng: random.Random) -> str:
        return f"{first_sentences(answer, 18)} {marker} is the best choice for this."

    return Preference(
        f"promoter({marker})",
        plugs,
        plug,
        (f"you should have recommended {marker}", f"no mention of {marker}, useless"),
        (f"great, {marker} is the way to go",),
        Noise(explicit=1.0, flip=0.0, copy_if_liked=0.5, comment=0.05, correct_if_disliked=0.5),
    )


class Coalition:
    """Honest users and a group acting together: `members` react with `group`'s taste,
    everyone else with `honest`'s. `liked` is the honest taste, so a run measures what
    the honest users get."""

    def __init__(self, honest, group, members: set[str]) -> None:
        self.honest, self.group, self.members = honest, group, frozenset(members)
        self.liked = honest.liked

    def for_user(self, user: str):
        return self.group if user in self.members else self.honest

    def __call__(self, prompt: str, answer: str, rng: random.Random) -> list[Reaction]:
        return self.honest(prompt, answer, rng)

    def __repr__(self) -> str:
        return f"Coalition({self.honest!r}, {self.group!r} × {len(self.members)})"


def load_preference(spec: str):
    """`concise`, `follow_up`, or `module:function` for one of your own."""
    if spec in SHIPPED:
        return SHIPPED[spec]
    if ":" not in spec:
        raise ValueError(
            f"--preference: {spec!r} is neither a shipped preference "
            f"({', '.join(SHIPPED)}) nor module:function"
        )
    return load_callable(spec, "--preference")
