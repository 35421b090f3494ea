"""Safe rollout: which version serves whom, the canary's evidence, promote and roll back.

Several server replicas may share one buffer and one registry; exactly one of them, the
rollout authority, runs canaries and decides. It is whichever holds the lease `rollout`
in the buffer (`ReplayBuffer.lease`: a row in SQLite, a key with a TTL in Redis), taken
for --rollout-lease-s and renewed at every third of it; when the authority dies, another
replica takes the lease once it expires. Why a lease among the servers rather than the
learner as controller: the guard evals run on the canary through a serving engine, a
canary must go on being decided (and rolled back) while the learner is down or busy
training, and a single server needs no other process to roll out at all.

The registry watcher offers each new servable version to the authority. With
`--canary-share 0` it is served to everyone at once. Otherwise it becomes the canary for a
sticky share of users (see `server.canary`) while one experiment runs at a time; versions
published meanwhile wait, and the newest of them is the next canary (or replaces a
canary that has stayed undecided for --canary-supersede-after-s). The authority records
the running canary in the registry (`rollout/canary.json`: version, share, start, the
buffer seq its evidence starts after) and reads its evidence from the buffer: the feedback
every replica stored, pooled, on answers from either arm. Its decision, and any
operator's Promote or Rollback sent to any replica, is applied to that replica's engine
and written to the registry (`rollout/vN.json`, which is also what a restarted server and
the learner's gate read); every replica follows the registry (`follow`) at each poll:
it serves the version promoted last and routes the live canary's share to it. A new
authority rebuilds a running canary's evidence from the buffer and goes on deciding it;
a test's decision is written only if none exists for the version (`record_rollout(first=
True)`), so an authority that lost its lease mid-decision cannot record a second one.
Before the test's promote is applied, the guard evals (`kaizen.guard`, --guard-evals)
run on the canary through the engine; one failed probe rolls it back instead.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable

from kaizen.bucket import Buckets
from kaizen.buffer import ReplayBuffer
from kaizen.errors import CorruptVersion, FailedPrecondition, InvalidArgument, Unavailable
from kaizen.events import Sampling
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
LEASE = "rollout"  # the buffer lease whose holder decides canaries
FOLLOW_EVERY_S = 2.0  # the registry's rollout records are re-read at least this often
TAIL_BATCH = 2000  # feedback events the authority reads from the buffer at once…
TAIL_MAX = 20_000  # …and in one tick at most
EVIDENCE_EVERY_S = 10.0  # the authority rewrites canary.json with its evidence this often
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
        lease_s: float = 15.0,  # --rollout-lease-s
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
        self.experiment: Experiment | None = None  # the canary this replica decides
        self.history: dict[str, Experiment] = {}  # every canary this process decided
        self._forecast_said: set[str] = set()  # canaries whose window forecast was logged
        self._lock = threading.RLock()  # experiments, decisions, following the registry
        # the rollout authority: this replica while it holds the buffer's lease
        self.lease_s = lease_s
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.leader = False
        self._renewed = 0.0  # monotonic time of the last take or renewal
        self._tail = 0  # the buffer seq the running experiment has read feedback up to
        self._canary_record: dict[str, object] = {}  # what rollout/canary.json says of it
        self._evidence_at = 0.0  # when the authority last wrote its evidence there
        # following the registry: what it asked for when last read, and when
        self._share = policy.share  # the live canary's share (what this replica routes)
        self._stamp: int | None = None
        self._followed_at = 0.0
        self._asked: tuple[str, str] | None = None  # (serving, canary) asked of the engine
        self._follow_failed: set[tuple[str, str]] = set()  # logged once each

    # -- routing (RPC threads) ---------------------------------------------------------

    def route_to_canary(self, user_id: str) -> bool:
        e = self.experiment
        share = e.share if e is not None else self._share
        return share > 0 and self.buckets.in_canary(user_id, share)

    # -- the authority's evidence: every replica's feedback, from the buffer -------------

    def _read_feedback(self, e: Experiment) -> None:
        """Count the feedback stored since the last read (by any replica) on answers given
        since the experiment started towards it, at the time each event was received, so
        an authority that takes over rebuilds the same evidence."""
        for _ in range(TAIL_MAX // TAIL_BATCH):
            samples = self.buffer.read_samples(self._tail, TAIL_BATCH)
            for sample in samples:
                ev, g = sample.feedback, sample.generation
                if g.model_version not in e.arms or g.created_at < e.started_at:
                    continue
                r = reward(ev, self.rewards, words=len(g.text.split()))
                if r is not None:
                    version = g.model_version
                    e.add(version, r, user=ev.user_id, answer=ev.response_id, now=ev.received_at)
                    arm = "canary" if version == e.canary else "serving"
                    metrics.CANARY_EVENTS.labels(arm).inc()
            if samples:
                self._tail = samples[-1].seq
            if len(samples) < TAIL_BATCH:
                return

    # -- the authority: the lease ------------------------------------------------------

    def _lead(self) -> None:
        """Take or renew the rollout lease (at every third of --rollout-lease-s); a replica
        that cannot stops deciding at once: its canary, if any, goes on serving (as the
        registry records it) for the next authority to decide."""
        now = time.monotonic()
        if self.leader and now - self._renewed < self.lease_s / 3:
            return
        try:
            held = self.buffer.lease(LEASE, self.holder, self.lease_s)
        except Exception as exc:  # the buffer is down: nobody decides until it is back
            log.warning("the rollout lease could not be renewed: %s", exc)
            held = False
        if held:
            self._renewed = now
        if held != self.leader:
            log.info(
                "this replica (%s) %s the rollout authority",
                self.holder,
                "is now" if held else "is no longer",
            )
            metrics.ROLLOUT_AUTHORITY.set(int(held))
            if held:
                self._record_policy()
        self.leader = held
        if not held and self.experiment is not None:
            self._forget_experiment(self.experiment, "this replica lost the rollout lease")

    def _record_policy(self) -> None:
        """Tell the learner how new versions are tested here (`rollout/policy.json`): its
        replay gate publishes a candidate it cannot judge only when a canary will test it
        live (share > 0)."""
        p = self.policy
        try:
            self.registry.record_policy(
                {
                    "canary_share": p.share,
                    "max_share": p.max_share,
                    "alpha": p.alpha,
                    "margin": p.margin,
                    "unit": p.unit,
                    "window_s": p.window_s,
                    "by": self.holder,
                    "at": time.time(),
                }
            )
        except OSError as exc:  # the learner then assumes no canary: it refuses, not defers
            log.warning("the rollout policy could not be recorded: %s", exc)

    def _drop_experiment(self) -> None:
        """No experiment runs here any more: no guard run for it, no gauges of it."""
        self._drop_guard_run()
        _clear_canary_gauges()
        self.experiment = None

    def _forget_experiment(self, e: Experiment, why: str) -> None:
        """Stop deciding `e` here; the engine keeps whatever the registry says."""
        self._drop_experiment()
        log.info("canary %s: no longer decided by this replica (%s)", e.canary, why)

    def close(self) -> None:
        """Let go of the lease (a server stopping): another replica takes over now."""
        with self._lock:
            if self.leader:
                try:
                    self.buffer.release(LEASE, self.holder)
                except Exception as exc:
                    log.warning("the rollout lease could not be released: %s", exc)
                self.leader = False
                metrics.ROLLOUT_AUTHORITY.set(0)

    def _record_canary(self, e: Experiment) -> None:
        self._canary_record = {
            "version": e.canary,
            "serving": e.serving,
            "started_at": e.started_at,
            "share": e.share,
            "ramped_at": e.ramped_at,
            "after_seq": self._canary_record.get("after_seq", self._tail),
            "by": self.holder,
            "evidence": e.evidence(),  # what every replica's ListVersions shows
        }
        self.registry.record_canary(self._canary_record)
        self._evidence_at = time.monotonic()

    def _take_over(self, live: dict[str, object]) -> None:
        """Go on deciding the canary another authority started: its evidence from the
        buffer, read again from where it started."""
        started = float(live.get("started_at") or time.time())  # type: ignore[arg-type]
        e = Experiment(
            str(live["version"]),
            str(live.get("serving") or self.engine.version),
            self.policy,
            started_at=started,
            share=float(live.get("share") or self.policy.share),  # type: ignore[arg-type]
            ramped_at=float(live.get("ramped_at") or started),  # type: ignore[arg-type]
        )
        self._canary_record = dict(live)
        self._tail = int(live.get("after_seq") or 0)  # type: ignore[call-overload]
        self.experiment = e
        metrics.CANARY_VERSION.set(version_number(e.canary))
        log.warning(
            "canary %s: taking over its test from %s; its evidence is read again from the "
            "buffer (after seq %d)",
            e.canary,
            live.get("by", "?"),
            self._tail,
        )

    # -- every replica: follow the registry ----------------------------------------------

    def follow(self, force: bool = False) -> None:
        """Serve what the registry records: the version promoted last, and the live canary
        at its share. Read when the rollout records change, and every FOLLOW_EVERY_S."""
        now = time.monotonic()
        stamp = self.registry.rollout_stamp()
        if not force and stamp == self._stamp and now - self._followed_at < FOLLOW_EVERY_S:
            return
        self._stamp, self._followed_at = stamp, now
        serving, live = self.registry.serving(), self.registry.canary()
        canary = str(live["version"]) if live is not None else ""
        self._share = float(live["share"]) if live is not None else self.policy.share  # type: ignore[arg-type]
        e = self.experiment
        if e is not None and e.canary != canary:
            self._forget_experiment(e, "decided or stopped on another replica")
        engine = self.engine
        have = (engine.version, engine.canary.version if engine.canary is not None else "")
        want = (serving, canary if canary != serving else "")
        if want == have or (want == self._asked and not force):
            self._asked = want if want == have else self._asked
            return
        try:
            if want[0] != have[0]:
                if have[1] == want[0]:
                    engine.promote_canary(want[0])
                else:
                    engine.restore(self._read(want[0]))
            if have[1] and have[1] != want[1] and have[1] != want[0]:
                engine.drop_canary(have[1], timeout_s=1.0)
            if want[1] and want[1] != have[1]:
                engine.stage(self._read(want[1]), role="canary")
        except (FailedPrecondition, Unavailable) as exc:
            if want not in self._follow_failed:
                self._follow_failed.add(want)
                log.error("cannot serve what the registry records (%s, canary %s): %s", *want, exc)
            return
        self._asked = want
        log.info("following the registry: serving %s, canary %s", want[0], want[1] or "none")

    def _followed(self, serving: str, canary: str = "") -> None:
        """This replica changed the registry and asked its engine for the same (`serving`,
        and `canary`): nothing left to follow."""
        self._stamp = self.registry.rollout_stamp()
        self._followed_at = time.monotonic()
        self._asked = (serving, canary)

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
                self._followed(adapter.version)
                return
            self._tail = self.buffer.last_seq()  # its evidence: feedback stored after this
            e = self.experiment = Experiment(adapter.version, self.engine.version, self.policy)
            self._canary_record = {"after_seq": self._tail}
            self._record_canary(e)
            self.engine.stage(adapter, role="canary")
            self._followed(e.serving, e.canary)
            metrics.CANARY_VERSION.set(version_number(adapter.version))
            log.info(
                "canary %s for %.0f %% of users, against %s",
                adapter.version,
                100 * self.policy.share,
                self.engine.version,
            )

    def tick(self, now: float | None = None) -> str:
        """Take or renew the lease, follow the registry; on the authority, read the
        feedback stored since the last tick and let the running experiment decide; apply
        its decision. Returns it ("" if none)."""
        with self._lock:
            self._lead()
            self.follow()
            if not self.leader:
                return ""
            e = self.experiment
            if e is None:
                live = self.registry.canary()
                if live is None:
                    return ""
                self._take_over(live)
                e = self.experiment
                assert e is not None
            self._read_feedback(e)
            if e.canary in self.engine.failed:  # it never served anyone: nothing to test
                e.settle("rollback", self.engine.failed[e.canary])
            share = e.share
            decision = e.decide(now)
            if e.share != share or time.monotonic() - self._evidence_at >= EVIDENCE_EVERY_S:
                self._record_canary(e)
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
                    return self._apply(e, "rollback", refused, by="guard", guard=evidence)
                return self._apply(e, decision, e.reason, by="test", guard=evidence)
            if decision:
                return self._apply(e, decision, e.reason, by="test")
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

    def floor(self, decisions: dict[str, dict[str, object]] | None = None) -> int:
        """The newest version number served, canaried, staged or decided (`decisions`, the
        registry's rollout records, when the caller has read them): the watcher offers
        only newer versions, so nothing older than what was tried comes back (an
        operator's promotion of an older version sticks)."""
        decided = self.registry.decisions() if decisions is None else decisions
        return max(version_number(v) for v in [self.engine.newest_known(), *decided])

    def would_yield(self, version: str, now: float | None = None) -> bool:
        """Whether `yield_to(version)` would end the running canary now (it does nothing)."""
        e, wait = self.experiment, self.policy.supersede_after_s
        if e is None:
            return True
        now = time.time() if now is None else now
        newer = version_number(version) > version_number(e.canary)
        stale = newer and not e.decision and 0 < wait <= now - e.started_at
        return stale and not e.on_track(now, within=wait)

    def yield_to(self, version: str, now: float | None = None) -> bool:
        """Whether the running canary gives way to `version`, newer than it: when it has
        stayed undecided for `supersede_after_s`, it is rolled back as undecided (the
        learner goes on from it) and the newer version is canaried next. At a small
        deployment's traffic a version can take longer to decide than the learner takes
        to publish a better one; testing the stale one to the end of its window would
        keep every newer one waiting. Except a canary on track: one whose estimate, if
        it holds, is promoted within another `supersede_after_s` at the pace its users
        have come (`Experiment.on_track`) keeps its test, up to its window; restarting
        it for the newer version would throw that evidence away, and at a small
        deployment's traffic the newer one would be superseded in turn before it could
        be decided. Each version is still promoted only by its own test, so α holds per
        version."""
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
    ) -> str:
        """Apply `decision` about the canary to the engine, then record it; the decision
        applied ("" when another replica's was recorded first: it is followed instead).
        The test's decision is recorded only if none exists (an operator's always is)."""
        version = e.canary
        first = by != "operator"
        if first and self._decided_elsewhere(e):
            return ""
        evidence = e.evidence() | ({"guard_evals": guard} if guard is not None else {})
        evidence["authority"] = self.holder
        if decision == "promote" and self.engine.promote_canary(version):
            state = PROMOTED
        else:
            if decision == "promote":  # its install failed, or it is gone: never served
                reason = (
                    "promoted, but the engine could not apply it (not installed, or the "
                    f"decode loop did not take it in time): {reason}"
                )
                decision = "rollback"
            self.engine.drop_canary(version)
            state = ROLLED_BACK
        if not self.registry.record_rollout(version, state, reason, evidence, by=by, first=first):
            self._decided_elsewhere(e)  # in the instant between: the engine follows it
            return ""
        self._followed(self.engine.version)
        self._end(e, decision, by)
        log.info("canary %s: %s (%s) — %s", version, decision, by, reason)
        _traced(version, decision, by, reason, int(e.started_at * 1e9))  # the canary's span
        return decision

    def _decided_elsewhere(self, e: Experiment) -> bool:
        """Whether a decision about `e`'s canary is already recorded (by an operator on
        another replica, or by an authority before this one); if so, stop deciding it
        and follow the registry at the next tick."""
        record = self.registry.rollout(e.canary)
        if record is None:
            return False
        why = f"{record.get('by', '?')} already recorded {record.get('state', '?')}"
        self._forget_experiment(e, why)
        self._stamp = None
        return True

    def _end(self, e: Experiment, decision: str, by: str) -> None:
        metrics.CANARY_DECISIONS.labels(decision, by).inc()
        self.history[e.canary] = e
        self._drop_experiment()

    def _stop_experiment(self, why: str) -> None:
        """End the running test with no verdict on the canary (this replica's, or the one
        another replica runs): it will be offered again."""
        live = self.registry.canary()
        if live is not None:
            self.registry.record_canary(None)
        e = self.experiment
        canary = e.canary if e is not None else str(live["version"]) if live is not None else ""
        if not canary:
            return
        self.engine.drop_canary(canary)
        if e is not None:
            self._drop_experiment()
        log.info("canary %s stopped without a verdict: %s", canary, why)

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
        """End the canary with an operator's decision, if `version` is the canary (this
        replica's experiment, or the one the authority runs elsewhere: the decision goes
        in the registry, which the authority and every replica follow); False otherwise."""
        e = self.experiment
        if e is not None and e.canary == version:
            e.settle(decision, reason)
            self._apply(e, decision, reason, by="operator")
            return True
        live = self.registry.canary()
        if live is None or live["version"] != version:
            return False
        engine = self.engine
        if decision == "promote":
            canary = engine.canary
            if canary is None or canary.version != version or not engine.promote_canary(version):
                self._serve(version)
            self.registry.record_rollout(version, PROMOTED, reason, by="operator")
        else:
            engine.drop_canary(version)
            self.registry.record_rollout(version, ROLLED_BACK, reason, by="operator")
        self._followed(engine.version)
        metrics.CANARY_DECISIONS.labels(decision, "operator").inc()
        log.info("canary %s: %s (operator) — %s", version, decision, reason)
        _traced(version, decision, "operator", reason)
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
            # v0 too: every replica follows the version promoted last
            self.registry.record_rollout(version, PROMOTED, reason, by="operator")
            self._followed(version)
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
            self._followed(previous)
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
