"""ColBERTModernBertModel and ColBERTLfm2Model in raw (vLLM) mode against plain transformers, through a
live server (gRPC + worker processes).

Reference, sharing no code with lateserve: AutoTokenizer with its default special tokens ->
AutoModel(dir).last_hidden_state -> F.linear with `1_Dense/model.safetensors` `linear.weight` ->
F.normalize, one text at a time; MaxSim = sum over query tokens of the best dot product.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModel, AutoTokenizer

from lateserve.server.config import ServerConfig
from lateserve.server.domain import EncodeOptions, ModelLoadError, Task, TextItem, WorkItem
from lateserve.server.families.base import ModelRunner
from lateserve.server.families.registry import family_for, load_source
from lateserve.v1 import common_pb2 as c
from lateserve.v1 import pool_service_pb2, pool_service_pb2_grpc, score_service_pb2, score_service_pb2_grpc
from lateserve.wire.tensors import from_tensor
from tests.fixtures.checkpoints import COLBERT_DIM, CORPUS, edit_weights
from tests.fixtures.st_colbert import write_lfm2_colbert, write_modernbert_colbert
from tests.live import LiveServer

ARCHITECTURES = {"modernbert": "ColBERTModernBertModel", "lfm2": "ColBERTLfm2Model"}
WRITERS = {"modernbert": write_modernbert_colbert, "lfm2": write_lfm2_colbert}
QUERIES = ["What is machine learning?", "What is the capital of France?", "Is the weather nice in Brazil?"]
DOCUMENTS = [
    "Machine learning is a subset of artificial intelligence.",
    "The capital of France is Paris.",
    "The weather is sunny.",
    " ".join(CORPUS[10:20]),  # long enough that the other items of a batch are padded, and past the window
]
MIN_COSINE = 0.9999
REL = 1e-4


class Reference:
    """Plain transformers for a Sentence-Transformers ColBERT directory."""

    def __init__(self, path: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        model, info = AutoModel.from_pretrained(str(path), output_loading_info=True, attn_implementation="eager")
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        self.model = model.eval()
        with safe_open(str(path / "1_Dense" / "model.safetensors"), framework="pt") as fh:
            self.projection = fh.get_tensor("linear.weight").float()

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    @torch.inference_mode()
    def vectors(self, text: str) -> np.ndarray:
        ids = torch.tensor([self.ids(text)])
        hidden = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0].float()
        return F.normalize(F.linear(hidden, self.projection), p=2, dim=-1).numpy()

    def maxsim(self, query: str, document: str) -> float:
        return float((self.vectors(query) @ self.vectors(document).T).max(axis=1).sum())


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def kind(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(scope="module")
def model_dir(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return WRITERS[kind](tmp_path_factory.mktemp(kind))


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Reference:
    return Reference(model_dir)


@pytest.fixture(scope="module")
def channel(kind: str, model_dir: Path) -> Iterator[grpc.Channel]:
    config = ServerConfig(
        model=str(model_dir),
        hf_overrides={"architectures": [ARCHITECTURES[kind]]},
        workers=1,
        threads_per_worker=1,
    )
    with LiveServer(config) as live, grpc.insecure_channel(live.grpc_target) as chan:
        yield chan


def text(t: str) -> c.Input:
    return c.Input(text=t)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_pool_token_embed_matches_transformers(channel: grpc.Channel, reference: Reference) -> None:
    texts = QUERIES + DOCUMENTS
    assert len({len(reference.ids(t)) for t in texts}) > 2, "lengths must differ so padding is exercised"
    resp = pool_service_pb2_grpc.PoolServiceStub(channel).Pool(pool_service_pb2.PoolRequest(inputs=map(text, texts)))
    worst = 1.0
    for out, t in zip(resp.outputs, texts, strict=True):
        got, want = from_tensor(out.data), reference.vectors(t)
        assert got.dtype == np.float32
        assert got.shape == want.shape == (len(reference.ids(t)), COLBERT_DIM)
        worst = min(worst, float(cosines(got, want).min()))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert worst >= MIN_COSINE
    assert resp.usage.prompt_tokens == sum(len(reference.ids(t)) for t in texts)


def test_score_one_to_n_and_n_to_n_match_transformers(channel: grpc.Channel, reference: Reference) -> None:
    stub = score_service_pb2_grpc.ScoreServiceStub(channel)
    one_n = stub.Score(score_service_pb2.ScoreRequest(queries=[text(QUERIES[0])], documents=map(text, DOCUMENTS)))
    want = [reference.maxsim(QUERIES[0], d) for d in DOCUMENTS]
    np.testing.assert_allclose([r.score for r in one_n.results], want, rtol=REL)
    n_n = stub.Score(score_service_pb2.ScoreRequest(queries=map(text, QUERIES), documents=map(text, DOCUMENTS[:3])))
    want = [reference.maxsim(q, d) for q, d in zip(QUERIES, DOCUMENTS[:3], strict=True)]
    np.testing.assert_allclose([r.score for r in n_n.results], want, rtol=REL)


def test_the_backbone_declared_in_config_is_not_served_as_colbert(kind: str, model_dir: Path) -> None:
    """config.json says ModernBertModel / Lfm2Model, as on the Hub: without the override the server refuses
    (it would otherwise have to guess a projection), and the message says how to select the family."""
    declared = {"modernbert": "ModernBertModel", "lfm2": "Lfm2Model"}[kind]
    with pytest.raises(ModelLoadError, match=f"unsupported architecture.*{declared}.*hf-overrides"):
        family_for(load_source(str(model_dir)))


def test_the_override_must_match_the_backbone(kind: str, model_dir: Path) -> None:
    other = next(a for k, a in ARCHITECTURES.items() if k != kind)
    with pytest.raises(ModelLoadError, match=f"{other} needs a"):
        family_for(load_source(str(model_dir), hf_overrides={"architectures": [other]})).spec()


def test_spec_reads_the_dense_dim_and_sentence_transformers_limit(kind: str, model_dir: Path) -> None:
    spec = family_for(load_source(str(model_dir), hf_overrides={"architectures": [ARCHITECTURES[kind]]})).spec()
    # vLLM: sentence_bert_config.json max_seq_length (299) replaces max_position_embeddings.
    assert (spec.architecture, spec.token_dim, spec.max_model_len) == (ARCHITECTURES[kind], COLBERT_DIM, 299)
    assert spec.tasks == frozenset({Task.TOKEN_EMBED})


def _copy(kind: str, model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / kind
    shutil.copytree(model_dir, target)
    return target


def _load(kind: str, path: Path) -> ModelRunner:
    family = family_for(load_source(str(path), hf_overrides={"architectures": [ARCHITECTURES[kind]]}))
    family.spec()
    return family.runner("cpu", "float32")


def test_a_missing_dense_weight_fails_naming_it(kind: str, model_dir: Path, tmp_path: Path) -> None:
    broken = _copy(kind, model_dir, tmp_path)
    weights = broken / "1_Dense" / "model.safetensors"
    save_file({"other.weight": torch.zeros(COLBERT_DIM, 32)}, str(weights))
    with pytest.raises(ModelLoadError, match=r"1_Dense/model\.safetensors has no projection weight.*linear\.weight"):
        _load(kind, broken)
    weights.unlink()
    with pytest.raises(ModelLoadError, match=r"1_Dense has no weights.*1_Dense/model\.safetensors"):
        _load(kind, broken)
    (broken / "modules.json").write_text("[]")
    with pytest.raises(ModelLoadError, match=r"no projection.*1_Dense"):
        _load(kind, broken)


def test_mismatched_backbone_weights_fail_naming_them(kind: str, model_dir: Path, tmp_path: Path) -> None:
    broken = _copy(kind, model_dir, tmp_path)
    with safe_open(str(broken / "model.safetensors"), framework="pt") as fh:
        victim = sorted(fh.keys())[3]
    edit_weights(broken, drop=[victim], add={"layers.0.extra.weight": torch.zeros(2)})
    with pytest.raises(ModelLoadError, match=rf"missing weights: 1: backbone\.{victim}.*unexpected.*layers\.0\.extra"):
        _load(kind, broken)


def test_a_projection_in_the_main_checkpoint_wins_as_in_vllm(kind: str, model_dir: Path, tmp_path: Path) -> None:
    """vLLM takes linear.weight from model.safetensors when present, before 1_Dense; `model.` is stripped."""
    moved = _copy(kind, model_dir, tmp_path)
    with safe_open(str(moved / "model.safetensors"), framework="pt") as fh:
        state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    with safe_open(str(moved / "1_Dense" / "model.safetensors"), framework="pt") as fh:
        projection = fh.get_tensor("linear.weight")
    edit_weights(moved, drop=state, add={**{f"model.{k}": v for k, v in state.items()}, "linear.weight": projection})
    shutil.rmtree(moved / "1_Dense")
    (moved / "modules.json").write_text("[]")
    original = family_for(load_source(str(model_dir), hf_overrides={"architectures": [ARCHITECTURES[kind]]}))
    seq = original.processor().encode(TextItem(DOCUMENTS[0]), EncodeOptions(), "document")
    item = WorkItem(seq, frozenset({Task.TOKEN_EMBED}))
    (expected,) = original.runner("cpu", "float32").forward([item])
    (got,) = _load(kind, moved).forward([item])
    np.testing.assert_array_equal(got[Task.TOKEN_EMBED], expected[Task.TOKEN_EMBED])
