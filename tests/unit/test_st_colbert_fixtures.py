"""The ModernBERT and LFM2 ColBERT fixtures are deterministic across processes and in the real layout."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.fixtures.st_colbert import DOCUMENT_PREFIX, QUERY_PREFIX, write_lfm2_colbert, write_modernbert_colbert

ROOT = Path(__file__).resolve().parents[2]
LAYOUT = [
    "1_Dense/config.json",
    "1_Dense/model.safetensors",
    "config.json",
    "config_sentence_transformers.json",
    "model.safetensors",
    "modules.json",
    "sentence_bert_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
]
_WRITE = """
import sys
from pathlib import Path
from tests.fixtures.st_colbert import write_lfm2_colbert, write_modernbert_colbert
write_modernbert_colbert(Path(sys.argv[1]) / "modernbert")
write_lfm2_colbert(Path(sys.argv[1]) / "lfm2")
"""


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_runs_in_other_processes_write_byte_identical_files(tmp_path: Path) -> None:
    """The tokenizers trainers were not deterministic across processes for WordPiece and Unigram
    (hash order); the BPE one must be, and the hash seed must not matter."""
    write_modernbert_colbert(tmp_path / "here" / "modernbert")
    write_lfm2_colbert(tmp_path / "here" / "lfm2")
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-c", _WRITE, str(tmp_path / seed)], check=True, env=env, cwd=ROOT)
    here = _digests(tmp_path / "here")
    assert sorted(here) == sorted(f"{m}/{f}" for m in ("lfm2", "modernbert") for f in LAYOUT)
    assert _digests(tmp_path / "1") == here == _digests(tmp_path / "2")


def test_layout_declares_the_backbone_and_the_pylate_settings(tmp_path: Path) -> None:
    for writer, arch, model_type in (
        (write_modernbert_colbert, "ModernBertModel", "modernbert"),
        (write_lfm2_colbert, "Lfm2Model", "lfm2"),
    ):
        out = writer(tmp_path / model_type)
        config = json.loads((out / "config.json").read_text())
        assert (config["architectures"], config["model_type"]) == ([arch], model_type)
        modules = json.loads((out / "modules.json").read_text())
        assert [(m["path"], m["type"]) for m in modules] == [
            ("", "sentence_transformers.models.Transformer"),
            ("1_Dense", "pylate.models.Dense.Dense"),
        ]
        st = json.loads((out / "config_sentence_transformers.json").read_text())
        assert (st["query_prefix"], st["document_prefix"], st["query_length"]) == (QUERY_PREFIX, DOCUMENT_PREFIX, 32)
        tokenizer = json.loads((out / "tokenizer.json").read_text())
        added = {t["content"]: t["special"] for t in tokenizer["added_tokens"]}
        assert added[QUERY_PREFIX] is False and added[DOCUMENT_PREFIX] is False
        tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
        assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
        assert tokenizer_config["model_input_names"] == ["input_ids", "attention_mask"]
