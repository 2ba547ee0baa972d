"""The tiny-checkpoint generator is deterministic, so parity failures never come from the fixture."""

from __future__ import annotations

from pathlib import Path

from tests.fixtures.checkpoints import write_bert_model, write_hf_colbert


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_runs_write_byte_identical_checkpoints(tmp_path: Path) -> None:
    for run in ("a", "b"):
        write_hf_colbert(tmp_path / run / "hf_colbert")
        write_bert_model(tmp_path / run / "bert")
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(first) == 13
    assert first == second


def test_seed_changes_the_weights_only(tmp_path: Path) -> None:
    one = _files(write_hf_colbert(tmp_path / "one", seed=0))
    two = _files(write_hf_colbert(tmp_path / "two", seed=1))
    assert [name for name in one if one[name] != two[name]] == ["model.safetensors"]
