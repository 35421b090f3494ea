"""Generate the Python stubs in kaizen/v1/ from proto/kaizen/v1/*.proto."""

from __future__ import annotations

import importlib.resources
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate(out_dir: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Run protoc (grpcio-tools) on every .proto under proto_dir; return the files written."""
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(proto_dir)) for p in proto_dir.rglob("*.proto"))
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = [
        "protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {protos}")
    suffixes = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
    return [out_dir / (p.removesuffix(".proto") + s) for p in protos for s in suffixes]


if __name__ == "__main__":
    written = generate(ROOT)
    print("\n".join(str(p.relative_to(ROOT)) for p in written), file=sys.stderr)
