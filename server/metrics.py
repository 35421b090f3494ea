"""The server's Prometheus metrics (module level, in the default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "kaizen_requests_total", "RPCs finished, by method and status code", ["method", "code"]
)
REQUEST_SECONDS = Histogram(
    "kaizen_request_duration_seconds",
    "RPC latency",
    ["method"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
PROMPT_TOKENS = Counter("kaizen_prompt_tokens_total", "Prompt tokens processed")
GENERATED_TOKENS = Counter(
    "kaizen_generated_tokens_total", "Tokens generated, by model version", ["version"]
)
FEEDBACK = Counter(
    "kaizen_feedback_events_total", "Feedback events, by kind and result", ["kind", "result"]
)
SERVING_VERSION = Gauge("kaizen_serving_version", "Number N of the version vN being served")
REGISTRY_NEWEST = Gauge(
    "kaizen_registry_newest_version",
    "Number N of the newest version vN this server's registry watcher has seen published",
)
SWAPS = Counter(
    "kaizen_weight_swaps_total",
    "Hot swaps, by result (ok, corrupt, incompatible, failed)",
    ["result"],
)
SWAP_PAUSE_SECONDS = Histogram(
    "kaizen_swap_pause_seconds",
    "Time the decode loop spent installing a new version",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
)
BATCH_SIZE = Histogram(
    "kaizen_batch_size", "Rows decoded together, per decode step", buckets=(1, 2, 4, 8, 16, 32, 64)
)
MIXED_STEPS = Counter(
    "kaizen_mixed_version_steps_total",
    "Decode steps whose batch held rows of more than one version (serving and canary)",
)
QUEUE_DEPTH = Gauge("kaizen_queue_depth", "Requests waiting for a batch")
RUNNING = Gauge("kaizen_requests_running", "Requests being decoded (rows of the batch)")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TIME_TO_FIRST_TOKEN = Histogram(
    "kaizen_time_to_first_token_seconds",
    "From a chat request's arrival to its first token, by arm (serving or canary)",
    ["arm"],
    buckets=LATENCY_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "kaizen_inter_token_latency_seconds",
    "Between two tokens of one answer, by arm",
    ["arm"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
QUEUE_WAIT = Histogram(
    "kaizen_queue_wait_seconds",
    "From a chat request's arrival to its admission into the batch",
    buckets=LATENCY_BUCKETS,
)
DECODE_STEP = Histogram(
    "kaizen_decode_step_seconds",
    "One step of the decode loop (decode, a piece of prefill, then sampling)",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
PREFILL_TOKENS = Counter(
    "kaizen_prefill_tokens_total",
    "Prompt tokens run through the model (a prefix reused from the cache is not)",
)
PREFIX_REUSED = Counter(
    "kaizen_prefix_reused_total",
    "Requests whose shared prompt prefix (the chat template's system turn) was copied from "
    "the version's cached keys and values instead of computed",
)
TOKEN_BUCKETS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096)
REQUEST_PROMPT_TOKENS = Histogram(
    "kaizen_request_prompt_tokens", "Prompt tokens of one chat request", buckets=TOKEN_BUCKETS
)
REQUEST_GENERATION_TOKENS = Histogram(
    "kaizen_request_generation_tokens",
    "Tokens generated for one answer",
    buckets=TOKEN_BUCKETS,
)
FINISHED = Counter(
    "kaizen_request_finished_total",
    "Chat requests by how they ended: stop, length, cancelled, deadline, error",
    ["reason"],
)
for _reason in ("stop", "length", "cancelled", "deadline", "error"):
    FINISHED.labels(_reason)
BUILD_INFO = Gauge("kaizen_build_info", "Always 1; the labels say what is running", ["version"])

for _result in ("ok", "corrupt", "incompatible", "failed"):  # so a first failure is a change
    SWAPS.labels(_result)

ROLLOUT_AUTHORITY = Gauge(
    "kaizen_rollout_authority",
    "1 on the server replica that holds the rollout lease (it runs and decides canaries), "
    "0 on the others",
)
CANARY_VERSION = Gauge("kaizen_canary_version", "Number N of the canary version vN; 0 = none")
CANARY_SHARE = Gauge(
    "kaizen_canary_share", "Share of users the running canary serves now (the ramp raises it)"
)
CANARY_MIN_PROMOTABLE = Gauge(
    "kaizen_canary_min_promotable_diff",
    "Smallest reward gain over serving the running canary's window can still promote, "
    "at the traffic seen so far (a sample-size forecast)",
)
CANARY_USERS = Gauge(
    "kaizen_canary_users",
    "Users whose observation the canary test has (final) or is still collecting (pending)",
    ["arm", "state"],
)
CANARY_EVENTS = Counter(
    "kaizen_canary_feedback_events_total",
    "Rewarded feedback events counted by the running canary test, by arm",
    ["arm"],
)
CANARY_MEAN_REWARD = Gauge(
    "kaizen_canary_mean_reward", "Mean reward of each arm of the running canary test", ["arm"]
)
CANARY_DIFF = Gauge(
    "kaizen_canary_reward_diff",
    "Canary minus serving mean reward: the estimate and its always-valid interval",
    ["bound"],
)
CANARY_DECISIONS = Counter(
    "kaizen_canary_decisions_total",
    "Rollout decisions, by decision (promote, rollback) and by whom (test, operator, guard)",
    ["decision", "by"],
)
for _decision in ("promote", "rollback"):
    for _by in ("test", "operator"):
        CANARY_DECISIONS.labels(_decision, _by)
CANARY_DECISIONS.labels("rollback", "guard")
CANARY_GUARD_REFUSALS = Counter(
    "kaizen_canary_guard_refusals_total",
    "Canaries the test would have promoted, rolled back by a guard eval, by the probe that "
    "failed (names from --guard-evals)",
    ["probe"],
)
AUTH_ENABLED = Gauge(
    "kaizen_auth_enabled", "1 when every RPC needs a credential; 0 under --insecure-no-auth"
)
AUTH_FAILURES = Counter(
    "kaizen_auth_failures_total",
    "Refused credentials, by reason (missing, malformed, unknown_key, revoked, expired, "
    "bad_token, scope, other_user)",
    ["reason"],
)
for _reason in (
    "missing",
    "malformed",
    "unknown_key",
    "revoked",
    "expired",
    "bad_token",
    "scope",
    "other_user",
):
    AUTH_FAILURES.labels(_reason)
RATE_LIMITED = Counter(
    "kaizen_rate_limited_total",
    "Requests refused by a per-user or per-key limit, by the limit's name",
    ["limit"],
)
ROWS_DELETED = Counter(
    "kaizen_buffer_rows_deleted_total",
    "Answers and feedback events deleted from the replay buffer, by reason (forget, retention)",
    ["reason"],
)
for _reason in ("forget", "retention"):
    ROWS_DELETED.labels(_reason)
DECODE_LOOP_UP = Gauge(
    "kaizen_decode_loop_up", "1 while the decode loop runs and moves (health SERVING), else 0"
)
