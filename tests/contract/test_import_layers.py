"""The import layering contracts in the root pyproject.toml ([tool.importlinter]) hold.

The gateway and the client must stay installable without torch, and the client must not reach into
server or gateway internals; import-linter checks every import chain, direct or indirect.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept() -> None:
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint_imports is not None, "import-linter is not installed (requirements/dev.txt)"
    result = subprocess.run(
        [lint_imports, "--config", str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
