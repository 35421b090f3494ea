"""Simulated users: chat with a running `kaizen serve` and react through its feedback API.

Users send prompts from a shipped prompt set over real gRPC, and a preference function
(`kaizen.sim.preferences`) turns each answer into the feedback events they send, with event
ids, through `StreamFeedback`. `liked_rate` measures a server on held-out prompts with
fixed seeds: the share of answers the preference likes, by serving version.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import grpc
from google.protobuf.empty_pb2 import Empty

from kaizen.client import CREDENTIAL_ENV, connect, read_credential
from kaizen.events import FeedbackKind
from kaizen.sim.preferences import Reaction
from kaizen.v1 import chat_pb2, chat_pb2_grpc, feedback_pb2, feedback_pb2_grpc

PROMPT_SETS = ("train", "heldout")


def load_prompts(name_or_path: str) -> list[str]:
    """A shipped prompt set (`train`, `heldout`) or a file with one prompt per line."""
    if name_or_path in PROMPT_SETS:
        text = (resources.files("kaizen") / "data" / f"prompts_{name_or_path}.txt").read_text()
    else:
        text = Path(name_or_path).read_text()
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts: {name_or_path} holds no prompts")
    return prompts


def ask(
    prompt: str, user: str, max_new_tokens: int, temperature: float, seed: int
) -> chat_pb2.GenerateRequest:
    return chat_pb2.GenerateRequest(
        messages=[chat_pb2.Message(role="user", content=prompt)],
        sampling=chat_pb2.SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
        ),
        user_id=user,
    )


def to_pb(reaction: Reaction, response_id: str, user_id: str) -> feedback_pb2.Feedback:
    fb = feedback_pb2.Feedback(
        event_id=f"sim-{uuid.uuid4().hex}", response_id=response_id, user_id=user_id
    )
    match reaction.kind:
        case FeedbackKind.THUMB:
            fb.thumb = feedback_pb2.THUMB_UP if reaction.value > 0 else feedback_pb2.THUMB_DOWN
        case FeedbackKind.RATING:
            fb.rating = int(reaction.value)
        case FeedbackKind.DWELL:
            fb.dwell_ms = int(reaction.value)
        case FeedbackKind.CLICK:
            fb.click.CopyFrom(Empty())
        case FeedbackKind.COPY:
            fb.copy.CopyFrom(Empty())
        case FeedbackKind.REGENERATE:
            fb.regenerate.CopyFrom(Empty())
        case FeedbackKind.COMMENT:
            fb.comment = reaction.text
        case FeedbackKind.CORRECTION:
            fb.correction = reaction.text
    return fb


@dataclass
class Tally:
    """Answers and likes per serving version, and the events sent."""

    answers: Counter = field(default_factory=Counter)
    liked: Counter = field(default_factory=Counter)
    events: Counter = field(default_factory=Counter)  # by kind

    def rate(self, version: str | None = None) -> float:
        n = self.answers[version] if version else sum(self.answers.values())
        k = self.liked[version] if version else sum(self.liked.values())
        return k / n if n else float("nan")

    def by_version(self) -> dict[str, dict[str, float]]:
        return {
            v: {"answers": n, "liked_rate": round(self.liked[v] / n, 3)}
            for v, n in sorted(self.answers.items(), key=lambda kv: int(kv[0][1:]))
        }


class Simulator:
    def __init__(
        self,
        channel: grpc.Channel,
        preference,
        prompts: list[str],
        users: int = 20,
        max_new_tokens: int = 64,
        temperature: float = 0.8,
        seed: int = 0,
        regenerations: int = 1,
    ) -> None:
        self.regenerations = regenerations  # new answers a user asks for, at most, per prompt
        self.chat = chat_pb2_grpc.ChatServiceStub(channel)
        self.feedback = feedback_pb2_grpc.FeedbackServiceStub(channel)
        self.preference = preference
        self.prompts = prompts
        self.users = users
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed
        self.tally = Tally()
        self._lock = threading.Lock()

    def one(self, i: int) -> int:
        """User i % users asks a prompt and reacts; a user who asks to regenerate gets a
        second answer to the same prompt and reacts to it too. Returns the events sent."""
        rng = random.Random(f"{self.seed}:{i}")
        prompt = rng.choice(self.prompts)
        user = f"sim-user-{i % self.users}"
        sent = 0
        for _attempt in range(1 + self.regenerations):
            seed = rng.getrandbits(62) + 1
            request = ask(prompt, user, self.max_new_tokens, self.temperature, seed)
            reply = self.chat.Generate(request, timeout=600)
            reactions = self.taste_of(user)(prompt, reply.text, rng)
            if reactions:
                self.feedback.StreamFeedback(
                    iter([to_pb(r, reply.response_id, user) for r in reactions]), timeout=60
                )
            liked = getattr(self.preference, "liked", None)
            with self._lock:
                self.tally.answers[reply.model_version] += 1
                if liked is not None and liked(prompt, reply.text):
                    self.tally.liked[reply.model_version] += 1
                for r in reactions:
                    self.tally.events[str(r.kind)] += 1
            sent += len(reactions)
            if not any(r.kind == FeedbackKind.REGENERATE for r in reactions):
                break
        return sent

    def taste_of(self, user: str):
        """The preference `user` reacts with: the one preference, or a coalition's member
        (`for_user`). The tally's liked rate is always the preference's own `liked`."""
        for_user = getattr(self.preference, "for_user", None)
        return self.preference if for_user is None else for_user(user)

    def run(
        self, events: int, concurrency: int = 4, progress=None, deadline: float | None = None
    ) -> Tally:
        """Chat until at least `events` feedback events were sent (or, when given, until
        time.monotonic() passes `deadline`)."""
        sent, i = 0, 0
        with ThreadPoolExecutor(concurrency) as pool:
            while sent < events and (deadline is None or time.monotonic() < deadline):
                batch = [pool.submit(self.one, i + k) for k in range(concurrency)]
                i += concurrency
                sent += sum(f.result() for f in batch)
                if progress is not None:
                    progress(sent, i, self.tally)
        return self.tally


def heldout_answers(
    channel: grpc.Channel,
    prompts: list[str],
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    seed: int = 1,
    concurrency: int = 8,
) -> list[tuple[str, str, str]]:
    """(prompt, answer, version) for each prompt, with a fixed seed per prompt: the same
    server version gives the same answers."""
    chat = chat_pb2_grpc.ChatServiceStub(channel)

    def one(k: int) -> tuple[str, str, str]:
        request = ask(prompts[k], "sim-evaluator", max_new_tokens, temperature, seed + k)
        reply = chat.Generate(request, timeout=600)
        return prompts[k], reply.text, reply.model_version

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(len(prompts))))


def liked_rate(
    channel: grpc.Channel,
    liked,
    prompts: list[str],
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    seed: int = 1,
    concurrency: int = 8,
) -> tuple[float, Counter]:
    """Share of held-out answers `liked(prompt, answer)` (see `heldout_answers`), and the
    versions that answered."""
    answers = heldout_answers(channel, prompts, max_new_tokens, temperature, seed, concurrency)
    rate = sum(liked(p, a) for p, a, _ in answers) / len(answers)
    return rate, Counter(v for _, _, v in answers)


def run_simulate(args) -> int:
    from kaizen.sim.preferences import load_preference

    try:
        for name in ("events", "users", "concurrency", "max_new_tokens"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be 1 or more")
        if not 0 <= args.temperature <= 2:
            raise ValueError(f"--temperature: {args.temperature} is outside 0..2")
        preference = load_preference(args.preference)
        prompts = load_prompts(args.prompts)
        credential = read_credential(args.key_file, dict(os.environ))
    except (ValueError, OSError) as exc:
        print(f"kaizen simulate: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    with connect(args.server, credential) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=args.connect_timeout_s)
        except grpc.FutureTimeoutError:
            print(f"kaizen simulate: --server {args.server}: no server answers", file=sys.stderr)
            return 2
        sim = Simulator(
            channel,
            preference,
            prompts,
            users=args.users,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
        )

        def progress(sent: int, answers: int, tally: Tally) -> None:
            rates = ", ".join(f"{v} {d['liked_rate']:.2f}" for v, d in tally.by_version().items())
            print(
                f"\r{sent}/{args.events} events, {answers} answers; liked by version: {rates}",
                end="",
                file=sys.stderr,
                flush=True,
            )

        try:
            tally = sim.run(args.events, args.concurrency, progress)
        except grpc.RpcError as exc:
            print(
                f"\nkaizen simulate: the server failed: {exc.code().name} {exc.details()}",
                file=sys.stderr,
            )
            return 1
    print(file=sys.stderr)
    print(
        f"sent {sum(tally.events.values())} feedback events on "
        f"{sum(tally.answers.values())} answers in {time.monotonic() - started:.0f} s"
    )
    print("events by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(tally.events.items())))
    for version, d in tally.by_version().items():
        print(f"  {version:>4}  {d['answers']:5d} answers  liked {d['liked_rate']:.1%}")
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "simulate",
        help="play simulated users against a running kaizen serve",
        description="Send prompts from a shipped prompt set to a running server over gRPC "
        "and react to each answer with a preference function's feedback (sparse, noisy, "
        "mostly implicit) through the feedback API, until --events events were sent.",
    )
    parser.add_argument("--server", default="127.0.0.1:50051", help="gRPC address of kaizen serve")
    parser.add_argument(
        "--key-file",
        type=Path,
        default=None,
        help=f"file with the API key (scopes chat, feedback) to send; default: ${CREDENTIAL_ENV}",
    )
    parser.add_argument(
        "--preference",
        default="concise",
        help="concise, follow_up, or module:function(prompt, answer, rng) -> reactions",
    )
    parser.add_argument("--events", type=int, default=200, help="feedback events to send")
    parser.add_argument(
        "--prompts", default="train", help="prompt set: train, heldout, or a file, one per line"
    )
    parser.add_argument("--users", type=int, default=20, help="distinct simulated users")
    parser.add_argument("--concurrency", type=int, default=4, help="users chatting at once")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer length cap")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    parser.add_argument("--seed", type=int, default=0, help="seed of the users' choices")
    parser.add_argument(
        "--connect-timeout-s", type=float, default=30.0, help="wait this long for the server"
    )
    parser.set_defaults(func=run_simulate)
