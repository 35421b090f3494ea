"""The weight registry: numbered versions on disk, each published atomically with a manifest.

Layout under the registry root:

    v000001/                  one directory per version, never modified after publish
        adapter_model.safetensors, adapter_config.json   (peft LoRA adapter)
        learner_state.pt      (the learner's optimizer and cursor; servers ignore it)
        manifest.json         (version, parent, base model, created_at, sha256 of each file)
    rollout/v000001.json      what servers decided about it: promoted or rolled_back, why,
                              and the evidence (rewritten atomically; the last word wins,
                              except that a canary test's decision is written only if no
                              decision about the version exists yet)
    rollout/canary.json       the canary the rollout authority runs (version, share, since
                              when, from which feedback seq): what every server replica
                              routes by; live while its version has no decision
    rollout/policy.json       how the rollout authority tests new versions (canary share,
                              α, margin, unit): the learner's replay gate defers to a
                              live canary when it cannot judge a candidate
    .staging-<random>/        a version being written; invisible to readers

A version is written under a staging name, every file and the directory fsynced, then
renamed into place: a reader sees the whole version or none of it. "v0" names the base
model with no adapter and has no directory.

A candidate the learner's guards refused is still published, for the record, with
`metadata["rejected"]` giving the reason: servers never serve it, and a restarted learner
does not resume from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kaizen.errors import CorruptVersion

BASE_VERSION = "v0"
MANIFEST = "manifest.json"
ROLLOUT_DIR = "rollout"
CANARY_RECORD = "canary.json"
POLICY_RECORD = "policy.json"
PROMOTED, ROLLED_BACK = "promoted", "rolled_back"
_VERSION_DIR = re.compile(r"^v(\d{6,})$")


@dataclass(frozen=True)
class Manifest:
    version: str
    parent: str
    base_model: str
    created_at: float  # unix seconds
    files: dict[str, str]  # file name -> sha256
    metadata: dict[str, object]  # what the publisher wants to record (steps, rewards, cursor)

    @property
    def number(self) -> int:
        return version_number(self.version)


def version_number(version: str) -> int:
    if version == BASE_VERSION:
        return 0
    match = re.fullmatch(r"v(\d+)", version)
    if match is None:
        raise ValueError(f"version: {version!r} is not of the form vN")
    return int(match.group(1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Registry:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def versions(self) -> list[str]:
        """Published versions, oldest first."""
        found = []
        for entry in self.root.iterdir():
            match = _VERSION_DIR.match(entry.name)
            if match and (entry / MANIFEST).is_file():
                found.append((int(match.group(1)), entry.name))
        return [f"v{n}" for n, _ in sorted(found)]

    def latest(self) -> str:
        """The newest published version, or v0 when none is."""
        versions = self.versions()
        return versions[-1] if versions else BASE_VERSION

    def path(self, version: str) -> Path:
        return self.root / f"v{version_number(version):06d}"

    def manifest(self, version: str) -> Manifest:
        data = json.loads((self.path(version) / MANIFEST).read_text())
        return Manifest(**data)

    def rejected(self, version: str) -> str:
        """Why the learner refused `version` ("" when it did not)."""
        if version == BASE_VERSION:
            return ""
        return str(self.manifest(version).metadata.get("rejected", ""))

    def rollout(self, version: str) -> dict[str, object] | None:
        """The servers' last decision about `version`, or None."""
        path = self.root / ROLLOUT_DIR / f"{self.path(version).name}.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None

    def record_rollout(
        self,
        version: str,
        state: str,
        reason: str,
        evidence: dict[str, object] | None = None,
        by: str = "test",
        first: bool = False,
    ) -> bool:
        """Record a rollout decision (PROMOTED or ROLLED_BACK) about `version`, atomically;
        `by` says who decided: "test" (the canary's), "guard", "operator", or "auto" (no
        canary). With `first`, only if nothing was decided about it yet (a canary's test:
        a replica that lost its lease while deciding cannot overwrite the decision made
        meanwhile); whether it was written."""
        if state not in (PROMOTED, ROLLED_BACK):
            raise ValueError(f"state: {state!r} is not {PROMOTED} or {ROLLED_BACK}")
        record = {
            "version": version,
            "state": state,
            "reason": reason,
            "evidence": evidence or {},
            "at": time.time(),
            "by": by,
        }
        return self._write_rollout_file(f"{self.path(version).name}.json", record, first)

    def _write_rollout_file(self, name: str, record: dict[str, object], first: bool) -> bool:
        folder = self.root / ROLLOUT_DIR
        folder.mkdir(exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".tmp-", delete=False) as f:
            json.dump(record, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        try:
            if first:
                os.link(f.name, folder / name)  # refuses an existing name: the first wins
            else:
                os.replace(f.name, folder / name)
        except FileExistsError:
            return False
        finally:
            Path(f.name).unlink(missing_ok=True)
        _fsync_dir(folder)
        return True

    def record_canary(self, canary: dict[str, object] | None) -> None:
        """The canary running now (None: none), for every server replica to follow."""
        self._write_rollout_file(CANARY_RECORD, {"version": "", **(canary or {})}, first=False)

    def canary(self) -> dict[str, object] | None:
        """The live canary record: its version is published and nothing was decided about
        it yet; else None."""
        try:
            record = json.loads((self.root / ROLLOUT_DIR / CANARY_RECORD).read_text())
        except FileNotFoundError:
            return None
        version = str(record.get("version") or "")
        if not version or self.rollout(version) is not None:
            return None
        return record

    def record_policy(self, policy: dict[str, object]) -> None:
        """How the servers test a new version (written by the rollout authority)."""
        self._write_rollout_file(POLICY_RECORD, policy, first=False)

    def policy(self) -> dict[str, object] | None:
        """The servers' rollout policy as last recorded; None before any server wrote it."""
        try:
            return json.loads((self.root / ROLLOUT_DIR / POLICY_RECORD).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def servable(self, version: str) -> bool:
        """Neither refused by the learner nor rolled back by a server."""
        if version == BASE_VERSION:
            return True
        if self.rejected(version):
            return False
        record = self.rollout(version)
        return record is None or record["state"] != ROLLED_BACK

    def latest_accepted(self) -> str:
        """The newest version the learner did not reject (v0 when none): what a restarted
        learner resumes from."""
        for version in reversed(self.versions()):
            if not self.rejected(version):
                return version
        return BASE_VERSION

    def latest_servable(self) -> str:
        """The newest version that may be served (v0 when none may)."""
        for version in reversed(self.versions()):
            if self.servable(version):
                return version
        return BASE_VERSION

    def rollout_stamp(self) -> int:
        """Changes whenever a rollout record is written (the folder's mtime, ns; 0: none)."""
        try:
            return (self.root / ROLLOUT_DIR).stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def decisions(self) -> dict[str, dict[str, object]]:
        """Every rollout record, by version."""
        folder = self.root / ROLLOUT_DIR
        records = (
            [json.loads(p.read_text()) for p in folder.glob("v*.json")] if folder.is_dir() else []
        )
        return {str(r["version"]): r for r in records}

    def serving(self) -> str:
        """The version servers promoted last (by time) and did not roll back since, or v0:
        what a (re)started server serves."""
        promoted = [
            r
            for r in self.decisions().values()
            if r["state"] == PROMOTED and not self.rejected(str(r["version"]))
        ]
        return str(max(promoted, key=lambda r: r["at"])["version"]) if promoted else BASE_VERSION

    def verify(self, version: str) -> Manifest:
        """Check every file against the manifest; raise CorruptVersion on any mismatch."""
        manifest = self.manifest(version)
        root = self.path(version)
        for name, expected in manifest.files.items():
            path = root / name
            if not path.is_file():
                raise CorruptVersion(f"{version}: {name} is missing")
            actual = _sha256(path)
            if actual != expected:
                raise CorruptVersion(
                    f"{version}: {name} has sha256 {actual[:12]}…, manifest says {expected[:12]}…"
                )
        return manifest

    @contextmanager
    def publish(
        self, base_model: str, metadata: dict[str, object] | None = None, parent: str | None = None
    ) -> Iterator[Path]:
        """Yield a staging directory to fill; on exit, publish it as the next version, whose
        parent is `parent` (default: the newest version).

        The new version's manifest is readable as `self.manifest(self.latest())` after.
        """
        latest = self.latest()
        parent = latest if parent is None else parent
        version = f"v{version_number(latest) + 1}"
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            yield staging
            files = {}
            for path in sorted(staging.iterdir()):
                if not path.is_file():
                    raise ValueError(f"registry: {path.name} is not a plain file")
                with path.open("rb") as f:
                    os.fsync(f.fileno())
                files[path.name] = _sha256(path)
            manifest = Manifest(
                version=version,
                parent=parent,
                base_model=base_model,
                created_at=time.time(),
                files=files,
                metadata=dict(metadata or {}),
            )
            manifest_path = staging / MANIFEST
            with manifest_path.open("w") as f:
                json.dump(manifest.__dict__, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(staging)
            # rename() refuses a non-empty target, so two publishers cannot both win vN.
            os.rename(staging, self.path(version))
            _fsync_dir(self.root)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
