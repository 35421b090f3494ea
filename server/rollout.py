"""Safe rollout: which version serves whom, the canary's evidence, promote and roll back.

The registry watcher offers each new servable version here. With `--canary-share 0` it
is served to everyone at once. Otherwise it becomes the canary for a sticky share of
users (see `server.canary`) while one experiment runs at a time; versions published
meanwhile wait, and the newest of them is the next canary (or replaces a canary that has
stayed undecided for --canary-supersede-after-s). Live feedback on answers from
either arm feeds the sequential test; its decision, and any operator's Promote or
Rollback, is applied to the engine, written to the registry (`rollout/vN.json`, which
is what a restarted server and the learner's gate read) and exported as metrics. Before
the test's promote is applied, the guard evals (`kaizen.guard`, --guard-evals) run on the
canary through the engine; one failed probe rolls it back instead.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from kaizen.bucket import Buckets
from kaizen.buffer import ReplayBuffer
from kaizen.errors import CorruptVersion, FailedPrecondition, InvalidArgument, Unavailable
from kaizen.events import Feedback, Sampling
from kaizen.guard import GuardEvals
from kaizen.modeling import chat_prompt_ids
from kaizen.registry import BASE_VERSION, PROMOTED, ROLLED_BACK, Registry, version_number
from kaizen.rewards import RewardConfig, reward
from kaizen.telemetry import tracing
from server import metrics
from server.canary import CanaryPolicy, Experiment
from server.engine import Adapter, Engine, Failed, Finished, Request, Token

log = logging.getLogger(__name__)

LATE_INSTALL_S = 60.0  # a restore the decode loop has taken finishes within this
MAX_REMEMBERED = 100_000  # answers whose version is known without asking the buffer
GUARD_TRIES = 5  # a canary whose guard evals fail to run this many times is rolled back
GUARD_TIMEOUT_S = 600.0  # a guard-eval run not finished by then has failed to run
GUARD_IN_FLIGHT = 4  # guard-eval requests in the engine at once


class Rollout:
    def __init__(
        self,
        engine: Engine,
        registry: Registry,
        buffer: ReplayBuffer,
        read: Callable[[str], Adapter],
        policy: CanaryPolicy,
        rewards: RewardConfig,
        buckets: Buckets,
        guard: GuardEvals | None = None,
        tokenizer=None,  # encodes the guard's prompts and decodes its answers
    ) -> None:
        if guard is not None and tokenizer is None:
            raise ValueError("guard: the guard evals need the tokenizer")
        self.engine = engine
        self.guard = guard  # --guard-evals, calibrated on the base model; None = off
        self.tokenizer = tokenizer
        self._guard_run: _GuardRun | None = None  # the guard evals in flight on the canary
        self._guard_tries: collections.Counter[str] = collections.Counter()
        self.buckets = buckets
        self.registry = registry
        self.buffer = buffer
        self.read = read  # version -> verified adapter
        self.policy = policy
        self.rewards = rewards
        self.experiment: Experiment | None = None
        self.history: dict[str, Experiment] = {}  # every canary this process decided
        self._forecast_said: set[str] = set()  # canaries whose window forecast was logged
        self._answers: collections.OrderedDict[str, tuple[str, int, float]] = (
            collections.OrderedDict()
        )  # response_id -> (version, words, created_at)
        self._lock = threading.RLock()  # experiments and decisions
        self._answers_lock = threading.Lock()  # the answer → version memory (every Generate)

    # -- routing and evidence (RPC threads) --------------------------------------------

    def route_to_canary(self, user_id: str) -> bool:
        e = self.experiment
        share = e.share if e is not None else self.policy.share
        return share > 0 and self.buckets.in_canary(user_id, share)

    def answered(self, response_id: str, version: str, text: str, created_at: float) -> None:
        with self._answers_lock:
            self._answers[response_id] = (version, len(text.split()), created_at)
            while len(self._answers) > MAX_REMEMBERED:
                self._answers.popitem(last=False)

    def observe(self, events: Sequence[Feedback]) -> None:
        """Count durable, new feedback events on answers given since the running experiment
        started towards it."""
        experiment = self.experiment
        if experiment is None:
            return
        for ev in events:
            with self._answers_lock:
                known = self._answers.get(ev.response_id)
            if known is None:
                g = self.buffer.generation(ev.response_id)
                if g is None:
                    continue
                known = (g.model_version, len(g.text.split()), g.created_at)
            version, words, created_at = known
            if version not in experiment.arms or created_at < experiment.started_at:
                continue
            r = reward(ev, self.rewards, words=words)
            if r is not None:
                experiment.add(version, r, user=ev.user_id, answer=ev.response_id)
                metrics.CANARY_EVENTS.labels(
                    "canary" if version == experiment.canary else "serving"
                ).inc()

    # -- the watcher's thread ----------------------------------------------------------

    @property
    def busy(self) -> bool:
        """An experiment is running: new versions wait."""
        return self.experiment is not None

    def offer(self, adapter: Adapter) -> None:
        """A new, verified, servable version: serve it, or start its canary."""
        with self._lock:
            newest = version_number(self.engine.newest_known())
            if self.busy or version_number(adapter.version) <= newest:
                return  # an operator got there first, or a canary started meanwhile
            if self.policy.share <= 0:
                self.engine.stage(adapter)
                self.registry.record_rollout(
                    adapter.version, PROMOTED, "no canary (--canary-share 0)", by="auto"
                )
                return
            self.engine.stage(adapter, role="canary")
            self.experiment = Experiment(adapter.version, self.engine.version, self.policy)
            metrics.CANARY_VERSION.set(version_number(adapter.version))
            log.info(
                "canary %s for %.0f %% of users, against %s",
                adapter.version,
                100 * self.policy.share,
                self.engine.version,
            )

    def tick(self, now: float | None = None) -> str:
        """Let the running experiment decide; apply its decision. Returns it ("" if none)."""
        with self._lock:
            e = self.experiment
            if e is None:
                return ""
            if e.canary in self.engine.failed:  # it never served anyone: nothing to test
                e.settle("rollback", self.engine.failed[e.canary])
            share = e.share
            decision = e.decide(now)
            if e.share != share:
                log.info(
                    "canary %s: ramped from %.0f %% to %.0f %% of users (%s)",
                    e.canary,
                    100 * share,
                    100 * e.share,
                    _summary(e),
                )
            self._export(e)
            if not decision:
                self._forecast(e, time.time() if now is None else now)
            if decision == "promote" and self.guard is not None:
                refused, evidence = self._guard_canary(e)
                if refused is None:
                    return ""  # the guard evals still run; a later tick applies the decision
                if refused:
                    e.settle("rollback", refused, outcome=e.outcome)
                    self._apply(e, "rollback", refused, by="guard", guard=evidence)
                    return "rollback"
                self._apply(e, decision, e.reason, by="test", guard=evidence)
                return decision
            if decision:
                self._apply(e, decision, e.reason, by="test")
            return decision

    def _guard_canary(self, e: Experiment) -> tuple[str | None, dict[str, object]]:
        """The guard evals on a canary the test would promote, run through the engine like
        any request: (None, {}) while they run; then ("", evidence) when every probe
        passed, or (the reason to roll it back, evidence). A run that cannot finish (a full
        queue, a decode error, GUARD_TIMEOUT_S) is retried at the next tick, GUARD_TRIES
        times in all: a canary the guard cannot check is not promoted."""
        assert self.guard is not None
        run = self._guard_run
        try:
            if run is None:
                run = self._guard_run = _GuardRun(self.engine, self.tokenizer, self.guard, e.canary)
                log.info(
                    "canary %s: the test would promote it; asking it %d guard evals first",
                    e.canary,
                    len(self.guard),
                )
            answers = run.poll()
            if answers is None and time.monotonic() - run.started > GUARD_TIMEOUT_S:
                raise TimeoutError(f"not finished in {GUARD_TIMEOUT_S:g} s")
        except Exception as exc:  # logged, retried, and at the last try the reason
            self._drop_guard_run()
            self._guard_tries[e.canary] += 1
            tries = self._guard_tries[e.canary]
            log.warning(
                "canary %s: the guard evals failed to run (try %d): %r", e.canary, tries, exc
            )
            if tries < GUARD_TRIES:
                return None, {}
            why = f"guard evals could not run on {e.canary} ({tries} tries): {exc!r}"
            return why, {"checked": 0, "failed": [], "error": why}
        if answers is None:
            return None, {}
        self._guard_run = None
        result = self.guard.check(answers)
        for f in result.failures:
            metrics.CANARY_GUARD_REFUSALS.labels(f.probe).inc()
            log.warning("canary %s refused by %s; it answered %r", e.canary, f.reason, f.answer)
        return result.reason, result.evidence()

    def _drop_guard_run(self) -> None:
        if self._guard_run is not None:
            self._guard_run.cancel()
            self._guard_run = None

    def would_yield(self, version: str, now: float | None = None) -> bool:
        """Whether `yield_to(version)` would end the running canary now (it does nothing)."""
        e, wait = self.experiment, self.policy.supersede_after_s
        if e is None:
            return True
        now = time.time() if now is None else now
        newer = version_number(version) > version_number(e.canary)
        return newer and not e.decision and 0 < wait <= now - e.started_at

    def yield_to(self, version: str, now: float | None = None) -> bool:
        """Whether the running canary gives way to `version`, newer than it: when it has
        stayed undecided for `supersede_after_s`, it is rolled back as undecided (the
        learner goes on from it) and the newer version is canaried next. At a small
        deployment's traffic a version can take longer to decide than the learner takes
        to publish a better one; testing the stale one to the end of its window would
        keep every newer one waiting. Each version is still promoted only by its own
        test, so α holds per version."""
        now = time.time() if now is None else now
        with self._lock:
            e = self.experiment
            if e is None:
                return True
            if not self.would_yield(version, now):
                return False
            wait = self.policy.supersede_after_s
            e.settle(
                "rollback",
                f"superseded by {version}: undecided after {now - e.started_at:.0f} s "
                f"(--canary-supersede-after-s {wait:g}; {_summary(e)})",
                now,
                outcome="undecided",
            )
            self._apply(e, "rollback", e.reason, by="test")
            return True

    def _forecast(self, e: Experiment, now: float) -> None:
        """Say once per canary what its window can decide at this traffic (a sample-size
        plan from the observed pace), and export it."""
        smallest = e.forecast(now)
        if smallest is None:
            return
        metrics.CANARY_MIN_PROMOTABLE.set(smallest)
        if e.canary in self._forecast_said:
            return
        self._forecast_said.add(e.canary)
        p = e.policy
        level = logging.WARNING if smallest > p.margin else logging.INFO
        log.log(
            level,
            "canary %s: at this pace (%s) its window (%.0f s) can promote it only if it "
            "is better than %s by %+.3f or more%s",
            e.canary,
            _summary(e),
            p.window_s,
            e.serving,
            smallest,
            "; smaller gains will be rolled back undecided: more traffic, a longer "
            "--canary-window-s or a larger --canary-max-share would resolve them"
            if smallest > p.margin
            else "",
        )

    def _export(self, e: Experiment) -> None:
        diff, low, high = e.interval()
        metrics.CANARY_DIFF.labels("estimate").set(diff)
        metrics.CANARY_DIFF.labels("low").set(max(low, -2.0))
        metrics.CANARY_DIFF.labels("high").set(min(high, 2.0))
        metrics.CANARY_SHARE.set(e.share)
        for arm, version in (("canary", e.canary), ("serving", e.serving)):
            a = e.arms[version]
            metrics.CANARY_MEAN_REWARD.labels(arm).set(a.mean)
            metrics.CANARY_USERS.labels(arm, "final").set(a.n)
            metrics.CANARY_USERS.labels(arm, "pending").set(len(getattr(a, "pending", ())))

    def _apply(
        self, e: Experiment, decision: str, reason: str, by: str, guard: dict | None = None
    ) -> None:
        version = e.canary
        evidence = e.evidence() | ({"guard_evals": guard} if guard is not None else {})
        if decision == "promote" and self.engine.promote_canary(version):
            self.registry.record_rollout(version, PROMOTED, reason, evidence, by=by)
        else:
            if decision == "promote":  # its install failed, or it is gone: never served
                reason = (
                    "promoted, but the engine could not apply it (not installed, or the "
                    f"decode loop did not take it in time): {reason}"
                )
                decision = "rollback"
            self.engine.drop_canary(version)
            self.registry.record_rollout(version, ROLLED_BACK, reason, evidence, by=by)
        self._end(e, decision, by)
        log.info("canary %s: %s (%s) — %s", version, decision, by, reason)
        _traced(version, decision, by, reason, int(e.started_at * 1e9))  # the canary's span

    def _end(self, e: Experiment, decision: str, by: str) -> None:
        metrics.CANARY_DECISIONS.labels(decision, by).inc()
        self._drop_guard_run()
        _clear_canary_gauges()
        self.history[e.canary] = e
        self.experiment = None

    def _stop_experiment(self, why: str) -> None:
        """End the running test with no verdict on the canary: it will be offered again."""
        e = self.experiment
        if e is None:
            return
        self.engine.drop_canary(e.canary)
        self._drop_guard_run()
        _clear_canary_gauges()
        self.experiment = None
        log.info("canary %s stopped without a verdict: %s", e.canary, why)

    # -- operators (admin RPCs) --------------------------------------------------------

    def _check_known(self, version: str) -> None:
        try:
            version_number(version)
        except ValueError as exc:
            raise InvalidArgument("version", str(exc)) from None
        if version != BASE_VERSION and version not in self.registry.versions():
            raise InvalidArgument("version", f"{version} is not published in the registry")

    def _read(self, version: str) -> Adapter | None:
        """The adapter to serve `version` (None for v0), or FAILED_PRECONDITION."""
        if version == BASE_VERSION:
            return None
        if rejected := self.registry.rejected(version):
            raise FailedPrecondition(
                "version", f"{version} was rejected by the learner ({rejected}); not served"
            )
        if failed := self.engine.failed.get(version):
            raise FailedPrecondition("version", f"{version} cannot be served: {failed}")
        try:
            return self.read(version)
        except (CorruptVersion, OSError, ValueError) as exc:
            raise FailedPrecondition("version", f"{version} cannot be read: {exc}") from None

    def _serve(self, version: str) -> None:
        """Make `version` the serving version now; UNAVAILABLE if the engine did not."""
        adapter = self._read(version)
        self.engine.restore(adapter)
        if self.engine.wait_serving(version):
            return
        if self.engine.unstage_restore(adapter):  # withdrawn: nothing changed, nothing recorded
            raise Unavailable(
                f"version: the decode loop did not install {version} in time; nothing changed"
            )
        if not self.engine.wait_serving(version, timeout_s=LATE_INSTALL_S):  # taken: finishing
            raise Unavailable(f"version: the decode loop took {version} but did not serve it")

    def _operator_decides_canary(self, version: str, decision: str, reason: str) -> bool:
        """End the running experiment with an operator's decision, if `version` is its
        canary; False otherwise."""
        e = self.experiment
        if e is None or e.canary != version:
            return False
        e.settle(decision, reason)
        self._apply(e, decision, reason, by="operator")
        return True

    def promote(self, version: str, reason: str) -> None:
        """Serve `version` to everyone now: the running canary, or any servable version."""
        self._check_known(version)
        reason = reason or "promoted by an operator"
        with self._lock:
            if self.guard is not None:
                log.warning(
                    "%s promoted by an operator: the guard evals (--guard-evals) do not run "
                    "on an operator's Promote",
                    version,
                )
            if self._operator_decides_canary(version, "promote", reason):
                return
            if version == self.engine.version:
                raise FailedPrecondition("version", f"{version} is already the serving version")
            self._read(version)  # refuse before touching anything
            self._stop_experiment(f"an operator promoted {version}")
            self._serve(version)
            if version != BASE_VERSION:
                self.registry.record_rollout(version, PROMOTED, reason, by="operator")
            metrics.CANARY_DECISIONS.labels("promote", "operator").inc()
            _traced(version, "promote", "operator", reason)

    def rollback(self, version: str, reason: str) -> str:
        """Stop serving `version` (the canary, or the serving version); returns the version
        that now serves its users."""
        self._check_known(version)
        reason = reason or "rolled back by an operator"
        with self._lock:
            if self._operator_decides_canary(version, "rollback", reason):
                return self.engine.version
            if version != self.engine.version:
                raise FailedPrecondition(
                    "version",
                    f"{version} is neither the serving version ({self.engine.version}) "
                    "nor the canary",
                )
            if version == BASE_VERSION:
                raise FailedPrecondition("version", "v0 is the base model: nothing to roll back to")
            previous = self._previous(version)
            self._read(previous)  # refuse before touching anything
            self._stop_experiment(f"its baseline {version} is being rolled back")
            self._serve(previous)
            self.registry.record_rollout(version, ROLLED_BACK, reason, by="operator")
            metrics.CANARY_DECISIONS.labels("rollback", "operator").inc()
            _traced(version, "rollback", "operator", reason)
            return previous

    def _previous(self, version: str) -> str:
        """The version promoted last before `version` and not rolled back since (or v0)."""
        promoted = sorted(
            (r for r in self.registry.decisions().values() if r["state"] == PROMOTED),
            key=lambda r: r["at"],
        )
        earlier = [str(r["version"]) for r in promoted if r["version"] != version]
        return earlier[-1] if earlier else BASE_VERSION


class _GuardRun:
    """The guard evals in flight on one canary: greedy requests pinned to it, submitted to
    the engine like any other (GUARD_IN_FLIGHT at a time, so users' requests keep their
    places in the queue) and read without waiting, so no tick blocks on them."""

    def __init__(self, engine: Engine, tokenizer, guard: GuardEvals, version: str) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.version = version
        self.started = time.monotonic()
        self.waiting = list(guard.probes)
        self.total = len(self.waiting)
        self.requests: dict[str, Request] = {}
        self.tokens: dict[str, list[int]] = {}
        self.answers: dict[str, str] = {}

    def poll(self) -> dict[str, str] | None:
        """Every probe's answer once all finished, else None; a failed request's error."""
        for name, request in self.requests.items():
            while name not in self.answers:
                try:
                    event = request.events.get_nowait()
                except queue.Empty:
                    break
                if isinstance(event, Token):
                    self.tokens[name].append(event.token_id)
                elif isinstance(event, Finished):
                    text = self.tokenizer.decode(self.tokens[name], skip_special_tokens=True)
                    self.answers[name] = text
                elif isinstance(event, Failed):
                    raise event.error
        while self.waiting and len(self.requests) - len(self.answers) < GUARD_IN_FLIGHT:
            probe = self.waiting.pop(0)
            sampling = Sampling(probe.max_new_tokens, temperature=0.0, seed=1)
            prompt = chat_prompt_ids(self.tokenizer, probe.chat)
            self.tokens[probe.name] = []
            self.requests[probe.name] = self.engine.submit(Request(prompt, sampling, self.version))
        return self.answers if len(self.answers) == self.total else None

    def cancel(self) -> None:
        for request in self.requests.values():
            request.cancel()


def _traced(version: str, decision: str, by: str, reason: str, start_ns: int | None = None) -> None:
    """A `kaizen.rollout` span in the version's trace: a canary's, from its start to the
    decision; an operator's promote or rollback of a version that was not the canary."""
    key = tracing.version(version)
    tracing.record(
        "kaizen.rollout", key, start_ns, version=version, decision=decision, by=by, reason=reason
    )


def _summary(e: Experiment) -> str:
    diff, low, high = e.interval()
    c, s = e.arms[e.canary], e.arms[e.serving]
    return f"{c.n} / {s.n} users, Δ {diff:+.3f}, interval [{low:+.3f}, {high:+.3f}]"


def _clear_canary_gauges() -> None:
    """No canary runs: none of its gauges keeps the last one's figures."""
    metrics.CANARY_VERSION.set(0)
    metrics.CANARY_SHARE.set(0)
    metrics.CANARY_MIN_PROMOTABLE.set(0)
    for arm in ("canary", "serving"):
        metrics.CANARY_MEAN_REWARD.labels(arm).set(0)
        for state in ("final", "pending"):
            metrics.CANARY_USERS.labels(arm, state).set(0)
    for bound in ("estimate", "low", "high"):
        metrics.CANARY_DIFF.labels(bound).set(0)
