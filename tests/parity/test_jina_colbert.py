"""ColBERTJinaRobertaModel (jina-colbert-v2 layout) against an independent transformers oracle.

The live server is started as vLLM serves the model:
`--hf-overrides '{"architectures": ["ColBERTJinaRobertaModel"]}' --trust-remote-code`.
Oracle (tests/reference_jina.py): JinaEmbeddingsV3Model.from_pretrained (transformers' own rename of
Jina's flash names, eager attention) -> F.linear(linear.weight) -> F.normalize, one text at a time.
Parity with Jina's remote flash implementation itself cannot be checked offline (not shipped).
"""

from __future__ import annotations

import json
import shutil
import string
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from lateserve.server.config import ServerConfig
from lateserve.server.domain import EmbeddingMode, EncodeOptions, ModelLoadError, Task, TextItem, WorkItem
from lateserve.server.families import jina_colbert
from lateserve.server.families.registry import family_for, load_source
from lateserve.v1 import common_pb2 as c
from lateserve.v1 import (
    info_service_pb2,
    info_service_pb2_grpc,
    pool_service_pb2,
    pool_service_pb2_grpc,
    score_service_pb2,
    score_service_pb2_grpc,
)
from lateserve.wire.tensors import from_tensor
from tests.fixtures.checkpoints import CORPUS, edit_weights
from tests.fixtures.jina_colbert import COLBERT_DIM, jina_weight_shapes, write_jina_colbert
from tests.live import LiveServer
from tests.reference_jina import JinaColbertReference

MODEL = "jinaai/jina-colbert-v2"
OVERRIDES = {"architectures": ["ColBERTJinaRobertaModel"]}
QUERIES = ["What is machine learning?", "What is the capital of France?", "Is the weather nice in Brazil?"]
DOCUMENTS = [
    "Machine learning is a subset of artificial intelligence.",
    "The capital of France is Paris.",
    "The capital of Brazil is Brasilia.",
    "The weather is sunny.",
    " ".join(CORPUS[10:20]),  # long: every other item of a batch is padded
]
MIN_COSINE = 0.9999
MAX_ABS = 1e-5
SCORE_REL = 1e-4


@pytest.fixture(scope="module")
def jina_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jina_colbert(tmp_path_factory.mktemp("jina_colbert"))


@pytest.fixture(scope="module")
def oracle(jina_dir: Path) -> JinaColbertReference:
    return JinaColbertReference(jina_dir)


@pytest.fixture(scope="module")
def jina_server(jina_dir: Path) -> Iterator[LiveServer]:
    config = ServerConfig(
        model=str(jina_dir),
        served_model_name=MODEL,
        hf_overrides=OVERRIDES,
        trust_remote_code=True,
        workers=1,
        threads_per_worker=1,
    )
    with LiveServer(config) as live:
        yield live


@pytest.fixture(scope="module")
def channel(jina_server: LiveServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(jina_server.grpc_target) as ch:
        yield ch


def text(t: str) -> c.Input:
    return c.Input(text=t)


def compare(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(smallest per-token cosine, largest absolute difference)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    cosines = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    return float(cosines.min()), float(np.abs(got - want).max())


# ---------------------------------------------------------------- through the live server (gRPC)


def test_info_reports_the_jina_family(channel: grpc.Channel) -> None:
    info = info_service_pb2_grpc.InfoServiceStub(channel).GetInfo(info_service_pb2.GetInfoRequest())
    (model,) = info.models
    assert (model.id, model.architecture, model.token_dim) == (MODEL, "ColBERTJinaRobertaModel", COLBERT_DIM)
    assert model.max_model_len == 8192  # tokenizer model_max_length under max_position_embeddings 8194


def test_pool_token_embed_matches_oracle(channel: grpc.Channel, oracle: JinaColbertReference) -> None:
    texts = QUERIES + DOCUMENTS
    assert len({oracle.num_tokens(t) for t in texts}) > 3, "lengths must differ so padding is exercised"
    resp = pool_service_pb2_grpc.PoolServiceStub(channel).Pool(
        pool_service_pb2.PoolRequest(model=MODEL, inputs=[text(t) for t in texts])
    )
    assert [o.index for o in resp.outputs] == list(range(len(texts)))
    worst_cos, worst_abs = 1.0, 0.0
    for out, t in zip(resp.outputs, texts, strict=True):
        got, want = from_tensor(out.data), oracle.token_embed(t)
        assert got.dtype == np.float32 and got.shape == (oracle.num_tokens(t), COLBERT_DIM)
        cos, diff = compare(got, want)
        worst_cos, worst_abs = min(worst_cos, cos), max(worst_abs, diff)
    print(f"jina token_embed vs oracle: min cosine {worst_cos:.9f}, max abs diff {worst_abs:.3g}")
    assert worst_cos >= MIN_COSINE and worst_abs < MAX_ABS, (worst_cos, worst_abs)
    assert resp.usage.prompt_tokens == sum(oracle.num_tokens(t) for t in texts)


def test_score_one_to_n_and_n_to_n_match_oracle(channel: grpc.Channel, oracle: JinaColbertReference) -> None:
    stub = score_service_pb2_grpc.ScoreServiceStub(channel)
    one_n = stub.Score(
        score_service_pb2.ScoreRequest(queries=[text(QUERIES[0])], documents=[text(d) for d in DOCUMENTS])
    )
    want = [oracle.maxsim(QUERIES[0], d) for d in DOCUMENTS]
    got = [r.score for r in one_n.results]
    np.testing.assert_allclose(got, want, rtol=SCORE_REL)
    pairs = list(zip(QUERIES, DOCUMENTS[:3], strict=True))
    n_n = stub.Score(
        score_service_pb2.ScoreRequest(queries=[text(q) for q, _ in pairs], documents=[text(d) for _, d in pairs])
    )
    np.testing.assert_allclose([r.score for r in n_n.results], [oracle.maxsim(q, d) for q, d in pairs], rtol=SCORE_REL)
    rel = max(abs(g - w) / abs(w) for g, w in zip(got, want, strict=True))
    print(f"jina MaxSim 1:N vs oracle: max relative diff {rel:.3g}")


# ---------------------------------------------------------------- over HTTP, when the gateway is up


def _post(url: str, body: object) -> tuple[int, object]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def test_http_rerank_sorts_by_oracle_maxsim(jina_server: LiveServer, oracle: JinaColbertReference) -> None:
    if not jina_server.config.gateway or not jina_server.server.http_port:
        pytest.skip("the HTTP gateway is not running in this server")
    try:
        status, data = _post(
            f"{jina_server.http_url}/rerank", {"model": MODEL, "query": QUERIES[0], "documents": DOCUMENTS}
        )
    except urllib.error.URLError as exc:
        pytest.skip(f"the HTTP gateway does not answer ({exc.reason})")
    assert status == 200, data
    assert isinstance(data, dict)
    want = [oracle.maxsim(QUERIES[0], d) for d in DOCUMENTS]
    assert [r["index"] for r in data["results"]] == sorted(range(len(DOCUMENTS)), key=lambda i: -want[i])
    for result in data["results"]:
        assert result["relevance_score"] == pytest.approx(want[result["index"]], rel=SCORE_REL)


# ---------------------------------------------------------------- loading, in process


def test_without_the_override_the_bert_family_fails_loudly(jina_dir: Path) -> None:
    """config.json says HF_ColBERT (the BERT family): it must refuse the Jina weights, not serve noise."""
    family = family_for(load_source(str(jina_dir)))
    with pytest.raises(ModelLoadError) as info:
        family.runner("cpu", "float32")
    message = str(info.value)
    assert "missing weights" in message and "unexpected weights" in message
    assert "bert.embeddings.word_embeddings.weight" in message
    assert "roberta.emb_ln.weight" in message and "roberta.encoder.layers.0.mixer.Wqkv.weight" in message


@pytest.mark.parametrize(
    "dropped",
    [
        "roberta.encoder.layers.1.norm2.weight",
        "roberta.encoder.layers.0.mixer.Wqkv.bias",
        "roberta.emb_ln.bias",
        "linear.weight",
    ],
)
def test_a_missing_weight_is_named(jina_dir: Path, tmp_path: Path, dropped: str) -> None:
    broken = shutil.copytree(jina_dir, tmp_path / "broken")
    edit_weights(broken, drop=[dropped])
    family = family_for(load_source(str(broken), hf_overrides=OVERRIDES, trust_remote_code=True))
    with pytest.raises(ModelLoadError) as info:
        family.runner("cpu", "float32")
    message = str(info.value)
    assert dropped in message
    assert "missing weights: 1:" in message or message.endswith("has no linear.weight projection")


def test_an_unexpected_weight_is_named(jina_dir: Path, tmp_path: Path) -> None:
    """jina-embeddings-v3 style LoRA parametrizations are refused by name, not merged or dropped."""
    broken = shutil.copytree(jina_dir, tmp_path / "lora")
    extra = "roberta.encoder.layers.0.mixer.out_proj.parametrizations.weight.0.lora_A"
    edit_weights(broken, add={extra: torch.zeros((4, 4, 32))})
    family = family_for(load_source(str(broken), hf_overrides=OVERRIDES))
    with pytest.raises(ModelLoadError) as info:
        family.runner("cpu", "float32")
    assert f"unexpected weights: 1: {extra}" in str(info.value)
    assert "LoRA" in str(info.value)


def test_a_wrongly_shaped_weight_fails(jina_dir: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(jina_dir, tmp_path / "shape")
    edit_weights(broken, add={"roberta.encoder.layers.0.mixer.Wqkv.weight": torch.zeros((64, 32))})
    family = family_for(load_source(str(broken), hf_overrides=OVERRIDES))
    with pytest.raises(ModelLoadError, match=r"Wqkv|q_proj"):
        family.runner("cpu", "float32")


def test_every_checkpoint_key_is_renamed_or_skipped(jina_dir: Path) -> None:
    names = [name for name, _ in jina_weight_shapes(vocab_size=10)] + ["linear.weight"]
    backbone, projection, unmatched = jina_colbert.split_checkpoint(dict.fromkeys(names, 0))
    assert projection == 0 and not unmatched
    kept = [n.removeprefix("roberta.") for n in names if n.startswith("roberta.") and ".pooler." not in n]
    assert sorted(backbone) == sorted(kept)
    for short in backbone:
        for native in jina_colbert.backbone_names(short) or ():
            assert jina_colbert.checkpoint_name(native) == f"roberta.{short}"  # the inverse names the file's key
    assert jina_colbert.backbone_names("encoder.layers.3.mixer.Wqkv.bias") == (
        "layers.3.self_attn.q_proj.bias",
        "layers.3.self_attn.k_proj.bias",
        "layers.3.self_attn.v_proj.bias",
    )


def test_rotary_config_is_derived_from_the_flash_config() -> None:
    base = {
        "hidden_size": 32,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "vocab_size": 9,
    }
    derived = jina_colbert.backbone_config({**base, "position_embedding_type": "rotary", "rotary_emb_base": 20000.0})
    assert derived["rope_parameters"] == {"rope_type": "default", "rope_theta": 20000.0}
    # XLMRobertaFlashConfig's defaults: rotary, base 10000.
    assert jina_colbert.backbone_config(base)["rope_parameters"]["rope_theta"] == 10000.0
    with pytest.raises(ModelLoadError, match="rotary"):
        jina_colbert.backbone_config({**base, "position_embedding_type": "absolute"})


def test_in_process_batch_and_bfloat16(jina_dir: Path, oracle: JinaColbertReference) -> None:
    family = family_for(load_source(str(jina_dir), hf_overrides=OVERRIDES, trust_remote_code=True))
    processor = family.processor()
    texts = [DOCUMENTS[-1], QUERIES[0], DOCUMENTS[3]]
    seqs = [processor.encode(TextItem(t), EncodeOptions(), "input") for t in texts]
    assert [list(s.ids) for s in seqs] == [oracle.ids(t) for t in texts]
    assert seqs[1].ids[0] == oracle.tokenizer.bos_token_id and seqs[1].ids[-1] == oracle.tokenizer.eos_token_id
    items = [WorkItem(s, frozenset({Task.TOKEN_EMBED})) for s in seqs]
    f32 = family.runner("cpu", "float32")
    alone = f32.forward(items[1:2])[0][Task.TOKEN_EMBED]
    batched = f32.forward(items)[1][Task.TOKEN_EMBED]
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-6)  # padding does not leak into an item
    bf16 = family.runner("cpu", "bfloat16").forward(items)
    for out, t in zip(bf16, texts, strict=True):
        cos, _ = compare(out[Task.TOKEN_EMBED], oracle.token_embed(t))
        assert out[Task.TOKEN_EMBED].dtype == np.float32 and cos > 0.98


def test_bfloat16_keeps_rotary_positions_precise(jina_dir: Path) -> None:
    """A bfloat16 backbone with float32 rotary frequencies stays close to float32 thousands of tokens in
    (with bfloat16 frequencies this long document dropped to a 0.996 cosine on this checkpoint)."""
    family = family_for(load_source(str(jina_dir), hf_overrides=OVERRIDES))
    seq = family.processor().encode(TextItem(" ".join(CORPUS * 3)), EncodeOptions(), "input")
    assert seq.num_tokens > 2000
    items = [WorkItem(seq, frozenset({Task.TOKEN_EMBED}))]
    f32 = family.runner("cpu", "float32").forward(items)[0][Task.TOKEN_EMBED]
    bf16 = family.runner("cpu", "bfloat16").forward(items)[0][Task.TOKEN_EMBED]
    assert compare(bf16, f32)[0] > 0.999


def faithful_query(oracle: JinaColbertReference, text: str, length: int = 32) -> np.ndarray:
    """PyLate's query encoding as jina-colbert-v2's card configures it, written out by hand: marker
    after <s>, padded with <mask> to `length`, expansion tokens attended."""
    tok = oracle.tokenizer
    ids = list(tok(text.strip(), truncation=True, max_length=length - 1)["input_ids"])
    ids += [tok.mask_token_id] * (length - 1 - len(ids))
    return oracle.embed_ids([ids[0], tok.convert_tokens_to_ids("[QueryMarker]"), *ids[1:]])


def faithful_document(oracle: JinaColbertReference, text: str, length: int = 300) -> np.ndarray:
    """Marker after <s>, at most `length` tokens, punctuation rows dropped."""
    tok = oracle.tokenizer
    ids = list(tok(text.strip(), truncation=True, max_length=length - 1)["input_ids"])
    ids = [ids[0], tok.convert_tokens_to_ids("[DocumentMarker]"), *ids[1:]]
    skip = {tok.convert_tokens_to_ids(p) for p in string.punctuation}
    rows = oracle.embed_ids(ids)
    return rows[[i for i, t in enumerate(ids) if t not in skip]]


@pytest.mark.parametrize("mode", ["query", "document"])
def test_faithful_modes_match_a_hand_written_pylate_encoding(
    channel: grpc.Channel, oracle: JinaColbertReference, mode: str
) -> None:
    texts = QUERIES if mode == "query" else DOCUMENTS
    enum = c.EMBEDDING_MODE_QUERY if mode == "query" else c.EMBEDDING_MODE_DOCUMENT
    resp = pool_service_pb2_grpc.PoolServiceStub(channel).Pool(
        pool_service_pb2.PoolRequest(
            model=MODEL, inputs=[text(t) for t in texts], options=c.EncodeOptions(embedding_mode=enum)
        )
    )
    for out, t in zip(resp.outputs, texts, strict=True):
        want = faithful_query(oracle, t) if mode == "query" else faithful_document(oracle, t)
        cos, diff = compare(from_tensor(out.data), want)
        assert cos >= MIN_COSINE and diff < MAX_ABS, (t, cos, diff)
    if mode == "query":
        assert {from_tensor(o.data).shape[0] for o in resp.outputs} == {32}


def test_faithful_defaults_when_the_metadata_is_silent(
    jina_dir: Path, tmp_path: Path, oracle: JinaColbertReference
) -> None:
    """Jina's markers and attended expansion tokens, when artifact.metadata does not name them."""
    quiet = shutil.copytree(jina_dir, tmp_path / "quiet")
    metadata = json.loads((quiet / "artifact.metadata").read_text())
    for key in ("query_token_id", "doc_token_id", "attend_to_mask_tokens"):
        del metadata[key]
    (quiet / "artifact.metadata").write_text(json.dumps(metadata))
    processor = family_for(load_source(str(quiet), hf_overrides=OVERRIDES)).processor()
    seq = processor.encode(TextItem(QUERIES[0]), EncodeOptions(embedding_mode=EmbeddingMode.QUERY), "query")
    markers = oracle.tokenizer.convert_tokens_to_ids(["[QueryMarker]", "[DocumentMarker]"])
    assert seq.ids[1] == markers[0] and len(seq.ids) == 32
    assert seq.attention_mask is None  # expansion tokens attended
    doc = processor.encode(TextItem(DOCUMENTS[0]), EncodeOptions(embedding_mode=EmbeddingMode.DOCUMENT), "document")
    assert doc.ids[:2] == (oracle.tokenizer.bos_token_id, markers[1])
