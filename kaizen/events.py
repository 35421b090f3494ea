"""The records that cross the replay buffer: what was generated, and what users did with it."""

from __future__ import annotations

import enum
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from json.encoder import encode_basestring_ascii as _json_str  # json.dumps' own, in C


class FeedbackKind(enum.StrEnum):
    THUMB = "thumb"
    RATING = "rating"
    CLICK = "click"
    DWELL = "dwell"
    COPY = "copy"
    REGENERATE = "regenerate"
    COMMENT = "comment"
    CORRECTION = "correction"
    # Never sent by users: the learner's own record that an answer got no reaction at all
    # within the reward file's window. Not on the wire, never stored in the buffer.
    NO_REACTION = "no_reaction"


@dataclass(frozen=True)
class Sampling:
    """How an answer was sampled; logged with it so the learner can recompute its policy."""

    max_new_tokens: int = 256  # tokens generated at most
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept; 1 = no truncation
    seed: int = 0  # 0 = drawn at random; the drawn seed is logged instead
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)


@dataclass(frozen=True)
class Generation:
    """One answer as the server produced it."""

    response_id: str
    user_id: str
    request_id: str
    model_version: str
    messages: list[dict[str, str]]  # the conversation that was answered
    prompt_tokens: list[int]  # chat-templated prompt, as fed to the model
    response_tokens: list[int]  # sampled tokens, the stop token included when one was hit
    behaviour_logprobs: list[float]  # log μ(token) under the sampling distribution actually used
    text: str
    finish_reason: str  # "stop" | "length"
    sampling: Sampling
    created_at: float  # unix seconds

    def to_row(self) -> dict[str, object]:
        row = asdict(self)
        for key in ("messages", "prompt_tokens", "response_tokens", "behaviour_logprobs"):
            row[key] = json.dumps(row[key])
        row["sampling"] = json.dumps(row["sampling"])
        return row

    @classmethod
    def from_row(cls, row: dict[str, object]) -> Generation:
        values = dict(row)
        for key in ("messages", "prompt_tokens", "response_tokens", "behaviour_logprobs"):
            values[key] = json.loads(values[key])
        values["sampling"] = Sampling(**json.loads(values["sampling"]))
        return cls(**{f: values[f] for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Feedback:
    """One user reaction to one answer."""

    event_id: str
    response_id: str
    user_id: str
    kind: FeedbackKind
    value: float = 0.0  # thumb ±1, rating 1..5, dwell in ms; 0 where the kind says it all
    text: str = ""  # comment or correction
    received_at: float = field(default=0.0, compare=False)  # unix seconds
    source: str = field(default="", compare=False)  # who sent it: key:NAME, user:ID, insecure

    def payload_sha256(self) -> str:
        """Identity of the payload, for telling a retry from a conflicting reuse of event_id:
        the SHA-256 of `json.dumps([response_id, user_id, kind, value, text])`. Stored
        digests must keep matching, so the text is exactly what json.dumps writes; built
        from its own string escaper and float repr, it costs a third of the call (a server
        computes one per event: `kaizen bench ingest`)."""
        value = float(self.value)
        if not math.isfinite(value):  # json writes NaN / Infinity, not repr's nan / inf
            body = json.dumps([self.response_id, self.user_id, str(self.kind), value, self.text])
        else:
            ids = ", ".join(map(_json_str, (self.response_id, self.user_id, str(self.kind))))
            body = f"[{ids}, {value!r}, {_json_str(self.text)}]"
        return hashlib.sha256(body.encode()).hexdigest()
