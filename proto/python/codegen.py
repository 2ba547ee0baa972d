"""Regenerates the committed Python stubs of lateserve.v1 from proto/ (never edit them by hand).

Run with the pinned grpcio-tools: `python proto/python/codegen.py [--out DIR]`. The test suite
regenerates into a temporary folder and fails when the committed stubs differ.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent
PACKAGE_DIR = Path("lateserve") / "v1"
DEFAULT_OUT = HERE / "src"


def proto_files() -> list[Path]:
    """The .proto files of the package, sorted so the output is reproducible."""
    return sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def generate(out_root: Path) -> None:
    """Writes *_pb2.py, *_pb2.pyi and *_pb2_grpc.py (plus typed grpc stubs) under out_root."""
    target = out_root / PACKAGE_DIR
    if target.exists():
        for old in target.glob("*_pb2*.py*"):
            old.unlink()
    target.mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    bin_dir = Path(sys.executable).parent  # mypy-protobuf's plugins live beside the interpreter
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (target / "__init__.py").write_text('"""Generated lateserve.v1 stubs; see proto/python/codegen.py."""\n')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ns = parser.parse_args()
    if ns.out == DEFAULT_OUT:
        generate(DEFAULT_OUT)
        return
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        shutil.copytree(Path(tmp), ns.out, dirs_exist_ok=True)


if __name__ == "__main__":
    sys.exit(main())
