"""The canary cannot be chosen: buckets are a keyed hash with a secret in the registry."""

from __future__ import annotations

import hashlib
import math
import random

from kaizen.bucket import SECRET_FILE, Buckets, load_or_create_secret


def plain_sha256_bucket(user_id: str) -> float:
    """How kaizen bucketed users before: anyone could compute it."""
    return int.from_bytes(hashlib.sha256(user_id.encode()).digest()[:8], "big") / 2**64


def test_canary_share_is_binomial_and_unpredictable_without_the_secret(tmp_path):
    share, n = 0.1, 10_000
    rng = random.Random(17)
    users = [f"{rng.getrandbits(64):016x}" for _ in range(n)]
    buckets = Buckets(load_or_create_secret(tmp_path))
    inside = {u for u in users if buckets.in_canary(u, share)}
    sd = math.sqrt(n * share * (1 - share))  # 30
    assert abs(len(inside) - n * share) < 4 * sd, len(inside)
    # an attacker's best guess without the secret, the old public hash, is no better
    # than chance: of the users it predicts in, about `share` are in
    predicted = {u for u in users if plain_sha256_bucket(u) < share}
    hits = len(predicted & inside)
    assert abs(hits - len(predicted) * share) < 4 * math.sqrt(len(predicted) * share), hits
    assert predicted != inside
    # another deployment (another secret) puts other users in its canary
    other = Buckets(load_or_create_secret(tmp_path / "elsewhere"))
    overlap = len(inside & {u for u in users if other.in_canary(u, share)})
    assert overlap < n * share * share + 4 * math.sqrt(n * share * share), overlap


def test_the_canary_and_the_learners_hold_out_are_independent(tmp_path):
    buckets = Buckets(load_or_create_secret(tmp_path))
    ids = [f"id-{i}" for i in range(10_000)]
    canary = {i for i in ids if buckets.in_canary(i, 0.5)}
    held = {i for i in ids if buckets.held_out(i, 0.5)}
    assert abs(len(canary & held) - 2_500) < 4 * math.sqrt(10_000 * 0.25 * 0.75)


def test_the_secret_is_made_once_private_and_shared_by_every_process(tmp_path):
    first = load_or_create_secret(tmp_path)
    assert load_or_create_secret(tmp_path) == first  # the learner reads the server's
    assert len(first) == 32
    assert oct((tmp_path / SECRET_FILE).stat().st_mode & 0o777) == "0o600"


def test_a_running_server_buckets_with_its_registrys_secret(server, serve_config):
    ours = Buckets(load_or_create_secret(serve_config.registry))
    users = [f"u{i}" for i in range(200)]
    assert [server.rollout.buckets.in_canary(u, 0.3) for u in users] == [
        ours.in_canary(u, 0.3) for u in users
    ]
