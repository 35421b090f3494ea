"""`kaizen demo`, the README's first command, end to end on the tiny model (issue 16)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def demo(*args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kaizen.cli", "demo", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout_s,
    )


def test_demo_keeps_users_coming_until_each_version_is_served(tiny_model, tmp_path):
    """Rounds of 3 users against --publish-every 5: no round alone is enough for a
    version, so the demo finishes only if it sends more users while the learner waits."""
    data = tmp_path / "demo"
    args = ["--model", str(tiny_model), "--data", str(data), "--rounds", "2"]
    done = demo(*args, "--publish-every", "5", "--users-per-round", "3")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "the server now serves v1" in out and "the server now serves v2" in out
    assert re.search(r"of --publish-every 5: 3 more users", out), out
    assert re.search(r"^done in \d+ s$", out, re.M)
    rows = re.findall(r"^\s+(v\d)\s+(v\d)\s+(\d+)\s+(\d+)\s", out, re.M)
    assert [r[:2] for r in rows] == [("v1", "v0"), ("v2", "v1")]
    assert all(int(trained) + int(held) >= 5 for *_, trained, held in rows)
    assert (data / "buffer.db").is_file() and (data / "learn.log").is_file()


def test_demo_refuses_to_wipe_a_directory_it_did_not_make(tiny_model, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    done = demo("--model", str(tiny_model), "--data", str(tmp_path), timeout_s=120)
    assert done.returncode == 2 and "--data" in done.stderr and "not made by" in done.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
