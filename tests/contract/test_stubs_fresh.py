"""The committed lateserve.v1 stubs are exactly what proto/python/codegen.py generates from proto/.

Stubs are committed so a fresh clone installs without protoc; this test keeps them honest: editing a
.proto without rerunning codegen (or hand-editing a stub) fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CODEGEN = ROOT / "proto" / "python" / "codegen.py"
COMMITTED = ROOT / "proto" / "python" / "src" / "lateserve" / "v1"


def _files(folder: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under folder, bytecode caches left out."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def test_committed_stubs_match_codegen(tmp_path: Path) -> None:
    # protoc finds protoc-gen-mypy(_grpc) on PATH; put this interpreter's scripts folder first so the
    # pinned mypy-protobuf is used even when the virtualenv is not activated.
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    result = subprocess.run(
        [sys.executable, str(CODEGEN), "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"codegen failed:\n{result.stdout}\n{result.stderr}"

    fresh = _files(tmp_path / "lateserve" / "v1")
    committed = _files(COMMITTED)
    assert fresh, "codegen wrote no files"
    assert sorted(committed) == sorted(fresh), (
        f"missing from the commit: {sorted(set(fresh) - set(committed))}; "
        f"stale in the commit: {sorted(set(committed) - set(fresh))}. Run `make proto`."
    )
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"committed stubs differ from codegen output: {stale}. Run `make proto`."
