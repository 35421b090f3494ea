"""The committed stubs match proto/, and the .proto files alone are enough to build a client."""

from __future__ import annotations

from pathlib import Path

from kaizen import protogen

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_are_generated_from_the_proto_files(tmp_path):
    written = protogen.generate(tmp_path)
    assert written, "no stubs generated"
    for path in written:
        committed = ROOT / path.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} is missing: run `make proto`"
        assert committed.read_text() == path.read_text(), (
            f"{committed.relative_to(ROOT)} is stale: run `make proto` and commit the result"
        )
