"""Runs an oracle script inside its own virtual environment (.refs/NAME, made by
tools/oracles/NAME.sh through `make refs`) and returns the arrays it saved.

Oracles never import lateserve: they get a model directory and texts as JSON, and write an .npz.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def oracle_python(name: str) -> Path:
    """The venv interpreter; a missing venv fails (skips only with LATESERVE_SKIP_ORACLES=1)."""
    python = ROOT / ".refs" / name / "bin" / "python"
    if not python.exists():
        message = f"oracle venv .refs/{name} is missing; run `make refs`"
        if os.environ.get("LATESERVE_SKIP_ORACLES") == "1":
            pytest.skip(message)
        pytest.fail(message)
    return python


def run_oracle(name: str, script: str, request: dict[str, Any], workdir: Path) -> dict[str, np.ndarray]:
    """Run tests/oracles/<script> under .refs/<name> with `request` as JSON; return its .npz arrays."""
    workdir.mkdir(parents=True, exist_ok=True)
    req_file, out_file = workdir / f"{script}.request.json", workdir / f"{script}.out.npz"
    req_file.write_text(json.dumps(request))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [str(oracle_python(name)), str(ROOT / "tests" / "oracles" / script), str(req_file), str(out_file)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"oracle {script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    with np.load(out_file, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
