"""BGE-M3 pieces without a server: score-mode parsing, FlagEmbedding's score formulas, lexical
weights and their BOS/EOS alignment, and the fixture's byte-identical output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lateserve.server.domain import InvalidArgument
from lateserve.server.engine.lexical import LexicalSpec, lexical_score, lexical_weights, trimmed_span
from lateserve.server.engine.scoring import (
    DEFAULT_WEIGHTS,
    ScoreMode,
    colbert_score,
    maxsim,
    parse_score_mode,
    weighted_score,
)
from tests.fixtures.bge_m3 import write_bge_m3

MODES = ("dense", "sparse", "colbert", "weighted")
SPEC = LexicalSpec(bos_token_id=0, eos_token_id=2, skip_ids=frozenset({0, 1, 2, 3}))


@pytest.mark.parametrize(
    ("mode", "parsed"),
    [
        ("", None),
        ("dense", ScoreMode("dense")),
        ("sparse", ScoreMode("sparse")),
        ("colbert", ScoreMode("colbert")),
        ("weighted", ScoreMode("weighted", DEFAULT_WEIGHTS)),
        ("weighted:0.4,0.2,0.4", ScoreMode("weighted", (0.4, 0.2, 0.4))),
        ("weighted:1, 0 ,0", ScoreMode("weighted", (1.0, 0.0, 0.0))),
    ],
)
def test_parse_score_mode(mode: str, parsed: ScoreMode | None) -> None:
    assert parse_score_mode(mode, MODES) == parsed


@pytest.mark.parametrize(
    "mode",
    ["nope", "Dense", "dense:1", "weighted:", "weighted:1,2", "weighted:a,b,c", "weighted:1,-1,1", "weighted:0,0,0"],
)
def test_bad_score_modes(mode: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_score_mode(mode, MODES, "BgeM3EmbeddingModel")
    assert err.value.field == "score_mode"


def test_models_without_modes_accept_only_the_default() -> None:
    assert parse_score_mode("", ()) is None
    with pytest.raises(InvalidArgument, match="only the default"):
        parse_score_mode("dense", ())


def test_flagembedding_formulas() -> None:
    q = np.array([[1, 0], [0, 1]], dtype=np.float32)
    d = np.array([[1, 0], [0.6, 0.8]], dtype=np.float32)
    assert colbert_score(q, d) == pytest.approx(maxsim(q, d) / 2)
    assert colbert_score(q[:0], d) == 0.0
    # compute_score's "colbert+sparse+dense": (w1*dense + w2*sparse + w3*colbert) / (w1 + w2 + w3)
    assert weighted_score(0.5, 0.2, 0.8, (0.4, 0.2, 0.4)) == pytest.approx((0.2 + 0.04 + 0.32) / 1.0)
    assert weighted_score(0.3, 0.6, 0.9, DEFAULT_WEIGHTS) == pytest.approx(0.6)
    assert lexical_score({5: 0.5, 6: 1.0}, {6: 0.25, 7: 2.0}) == pytest.approx(0.25)
    assert lexical_score({}, {6: 1.0}) == 0.0


@pytest.mark.parametrize(
    ("ids", "span"),
    [
        ([0, 5, 6, 2], (1, 3)),
        ([5, 6], (0, 2)),
        ([0, 5], (1, 2)),
        ([5, 2], (0, 1)),
        ([0, 2], (1, 1)),
        ([0], (1, 1)),
        ([2], (0, 0)),
        ([], (0, 0)),
    ],
)
def test_trimmed_span_checks_each_end_as_vllm(ids: list[int], span: tuple[int, int]) -> None:
    assert trimmed_span(ids, 0, 2) == span


def test_lexical_weights_max_per_id_first_occurrence_order() -> None:
    ids = [0, 9, 7, 9, 3, 1, 8, 2]
    weights = np.array([0.1, 0.5, 0.3, 0.0, 0.9, -0.2], dtype=np.float32)  # BOS and EOS already dropped
    assert lexical_weights(ids, weights, SPEC) == [(9, pytest.approx(0.3)), (7, pytest.approx(0.5))]
    # Untrimmed outputs (one weight per position) line up with the ids directly.
    full = np.array([4.0, 0.1, 0.5, 0.3, 0.9, 0.9, 0.2, 4.0], dtype=np.float32)
    assert lexical_weights(ids, full, SPEC) == [
        (9, pytest.approx(0.3)),
        (7, pytest.approx(0.5)),
        (8, pytest.approx(0.2)),
    ]
    with pytest.raises(ValueError, match="token weights"):
        lexical_weights(ids, weights[:3], SPEC)


def test_fixture_is_byte_identical(tmp_path: Path) -> None:
    first, second = write_bge_m3(tmp_path / "a"), write_bge_m3(tmp_path / "b")
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert {"colbert_linear.pt", "sparse_linear.pt", "model.safetensors", "tokenizer.json"} <= {str(f) for f in files}
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for f in files:
        assert (first / f).read_bytes() == (second / f).read_bytes(), f
