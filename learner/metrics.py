"""The learner's Prometheus metrics (module level, in the default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SAMPLES = Counter(
    "kaizen_learner_samples_total",
    "Feedback events read, by whether they gave a reward (held_out: the gate's slice)",
    ["rewarded"],
)
STEPS = Counter(
    "kaizen_learner_steps_total", "Gradient steps, by result (ok, or why dropped)", ["result"]
)
STEP_SECONDS = Histogram(
    "kaizen_learner_step_seconds",
    "Wall time of one gradient step",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
REWARD = Gauge("kaizen_learner_reward_mean", "Mean reward of the last step's samples")
BASELINE = Gauge("kaizen_learner_baseline", "Running-mean reward baseline")
KL = Gauge("kaizen_learner_kl", "Mean per-token KL to the reference in the last step")
LOSS = Gauge("kaizen_learner_loss", "Loss of the last step")
CURSOR = Gauge("kaizen_learner_cursor", "Position of the last feedback event consumed")
EXAMPLES = Counter(
    "kaizen_learner_examples_total",
    "Training examples shaped from feedback, by type and whether the objective uses them",
    ["type", "used"],
)
GUARD_TRIPS = Counter(
    "kaizen_learner_guard_trips_total",
    "Guards tripped: a dropped step (nonfinite_loss, nonfinite_grad) or a refused version "
    "(probe_kl, replay_gate, guard_eval)",
    ["guard"],
)
SINCE_PUBLISH = Gauge(
    "kaizen_learner_examples_since_publish",
    "What counts toward --publish-every since the last version: examples trained on "
    "(trained) and events held out for the replay gate (held_out)",
    ["kind"],
)
PUBLISH_EVERY = Gauge(
    "kaizen_learner_publish_every", "--publish-every: a version is due at this many examples"
)
PENDING = Gauge("kaizen_learner_pending_examples", "Examples read into the batch being filled")
REBASES = Counter(
    "kaizen_learner_rebases_total",
    "Times the learner went back to the serving version (its own rolled back, or an "
    "operator promoted another)",
)
DROPPED_DELETED = Counter(
    "kaizen_learner_examples_dropped_deleted_total",
    "Examples left out of a step because their answers left the buffer (forgotten, retention)",
)
PROBE_KL = Gauge("kaizen_learner_probe_kl", "Mean per-token KL to the base on the probe set")
CAPPED = Counter(
    "kaizen_learner_examples_capped_total",
    "Examples dropped because their user or API key already gave this version its share",
    ["by"],
)
for _by in ("user", "key"):  # so the first capped example is a change increase() sees
    CAPPED.labels(_by)
BUFFER_HEAD = Gauge(
    "kaizen_learner_buffer_head", "Sequence number of the newest feedback event in the buffer"
)
EVENTS_BEHIND = Gauge(
    "kaizen_learner_events_behind",
    "Feedback events in the buffer after the learner's cursor (not yet in any version)",
)
LAST_PUBLISH = Gauge(
    "kaizen_learner_last_publish_timestamp_seconds",
    "Unix time of the learner's last publish (rejected candidates included); 0 = none yet",
)
REJECTED = Counter("kaizen_learner_versions_rejected_total", "Candidates a guard refused")
GUARD_REFUSALS = Counter(
    "kaizen_learner_guard_refusals_total",
    "Candidates refused by a guard eval, by the probe that failed (names from --guard-evals)",
    ["probe"],
)
PUBLISHED = Counter("kaizen_learner_versions_published_total", "Versions published")
VERSION = Gauge("kaizen_learner_version", "Number N of the last version vN published or resumed")

for _result in ("ok", "nonfinite_loss", "nonfinite_grad"):  # so a first failure is a change
    STEPS.labels(_result)
for _kind in ("trained", "held_out"):
    SINCE_PUBLISH.labels(_kind)
for _guard in ("nonfinite_loss", "nonfinite_grad", "probe_kl", "replay_gate", "guard_eval"):
    GUARD_TRIPS.labels(_guard)
