"""The jina-colbert-v2 layout generator is deterministic, across processes too (the `tokenizers`
Unigram trainer is not, which is why the fixture computes its vocabulary itself)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.fixtures.jina_colbert import write_jina_colbert

REPO = Path(__file__).resolve().parents[2]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_processes_write_byte_identical_checkpoints(tmp_path: Path) -> None:
    write_jina_colbert(tmp_path / "here")
    script = "import sys; from pathlib import Path; from tests.fixtures.jina_colbert import write_jina_colbert; "
    script += "write_jina_colbert(Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "there")], cwd=REPO, check=True, timeout=120)
    first, second = _files(tmp_path / "here"), _files(tmp_path / "there")
    assert sorted(first) == [
        "artifact.metadata",
        "config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert first == second


def test_seed_changes_the_weights_only(tmp_path: Path) -> None:
    one = _files(write_jina_colbert(tmp_path / "one", seed=0))
    two = _files(write_jina_colbert(tmp_path / "two", seed=1))
    assert [name for name in one if one[name] != two[name]] == ["model.safetensors"]
