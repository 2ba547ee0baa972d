"""Faithful ColBERT encoding (embedding_mode query/document) against PyLate 1.6.0, through live servers.

PyLate runs in its own venv (.refs/pylate, `make refs`; tests/oracles/pylate_oracle.py) on the same
tiny checkpoints: HF_ColBERT (Stanford layout, `[unused0]`/`[unused1]` from artifact.metadata),
ColBERTModernBertModel and ColBERTLfm2Model (Sentence-Transformers layout, `[Q] `/`[D] `). Each server
is started with `--scoring-embedding-mode faithful`, so /score encodes queries as queries and
documents as documents; /pooling takes the mode per request.

Checked: the token ids PyLate feeds its model, every returned row (same count: the 32 query rows
with their [MASK]/EOS expansion, documents without skiplist rows; cosine >= 0.9999 per row), and
MaxSim against `pylate.scores.colbert_scores` (rel 1e-4) for 1:N and N:N.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_status import rpc_status

from lateserve.server.config import ServerConfig
from lateserve.server.domain import EmbeddingMode, EncodeOptions, InvalidArgument, Task, TextItem, TokenItem, WorkItem
from lateserve.server.families.registry import family_for, load_source
from lateserve.v1 import common_pb2 as c
from lateserve.v1 import pool_service_pb2, pool_service_pb2_grpc, score_service_pb2, score_service_pb2_grpc
from lateserve.wire.status import unpack_details
from lateserve.wire.tensors import from_tensor
from tests.fixtures.checkpoints import CORPUS, write_hf_colbert
from tests.fixtures.st_colbert import write_lfm2_colbert, write_modernbert_colbert
from tests.live import LiveServer
from tests.oracles.runner import oracle_python, run_oracle

QUERIES = [
    "What is machine learning?",
    "  what is the capital of France?  ",  # PyLate strips
    "Is the weather nice in Brazil, or in Paris? Python; Java!",
    " ".join(CORPUS[:4]),  # longer than query_length: truncated, no expansion left
]
DOCUMENTS = [
    "Machine learning is a subset of artificial intelligence.",
    "The capital of France is Paris.",
    "It's sunny -- and warm (in Paris) this week!",
    " ".join(CORPUS[10:16]),
]
MIN_COSINE = 0.9999
REL = 1e-4
# name -> (writer, --hf-overrides architectures or None)
CHECKPOINTS: dict[str, tuple[Any, list[str] | None]] = {
    "hf_colbert": (write_hf_colbert, None),
    "modernbert": (write_modernbert_colbert, ["ColBERTModernBertModel"]),
    "lfm2": (write_lfm2_colbert, ["ColBERTLfm2Model"]),
}
# In-process variants: settings PyLate reads from config_sentence_transformers.json.
VARIANTS: dict[str, tuple[Any, list[str], dict[str, Any]]] = {
    "modernbert_short_attend": (
        write_modernbert_colbert,
        ["ColBERTModernBertModel"],
        {"query_length": 12, "document_length": 10, "attend_to_expansion_tokens": True},
    ),
    "lfm2_no_expansion": (
        write_lfm2_colbert,
        ["ColBERTLfm2Model"],
        {"do_query_expansion": False, "query_length": 9, "skiplist_words": ["?", ".", "Ġthe"]},
    ),
    "modernbert_no_prefix": (
        write_modernbert_colbert,
        ["ColBERTModernBertModel"],
        {"query_prefix": "", "document_prefix": ""},
    ),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pylate_models")
    dirs = {name: writer(root / name) for name, (writer, _) in CHECKPOINTS.items()}
    for name, (writer, _, settings) in VARIANTS.items():
        dirs[name] = writer(root / name, st_config=settings)
    return dirs


@pytest.fixture(scope="module")
def oracle_job(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Future[dict[str, np.ndarray]]:
    """PyLate runs in the background (about 10 s) while the servers start."""
    oracle_python("pylate")  # fails (or skips with LATESERVE_SKIP_ORACLES=1) here, in the test's thread
    request = {"models": {k: str(v) for k, v in model_dirs.items()}, "queries": QUERIES, "documents": DOCUMENTS}
    workdir = tmp_path_factory.mktemp("pylate_oracle")
    job: Future[dict[str, np.ndarray]] = Future()

    def work() -> None:
        try:
            job.set_result(run_oracle("pylate", "pylate_oracle.py", request, workdir))
        except BaseException as exc:
            job.set_exception(exc)

    threading.Thread(target=work, daemon=True, name="pylate-oracle").start()
    return job


@pytest.fixture(scope="module")
def oracle(oracle_job: Future[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return oracle_job.result(timeout=600)


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def name(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture(scope="module")
def server(name: str, model_dirs: dict[str, Path], oracle_job: Future[dict[str, np.ndarray]]) -> Iterator[LiveServer]:
    _, architectures = CHECKPOINTS[name]
    config = ServerConfig(
        model=str(model_dirs[name]),
        hf_overrides={"architectures": architectures} if architectures else {},
        scoring_embedding_mode="faithful",
        workers=1,
        threads_per_worker=1,
    )
    with LiveServer(config) as live:
        yield live


@pytest.fixture(scope="module")
def channel(server: LiveServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_target) as chan:
        yield chan


def text(t: str) -> c.Input:
    return c.Input(text=t)


def expected(oracle: dict[str, np.ndarray], name: str, kind: str, count: int) -> list[np.ndarray]:
    return [oracle[f"{name}/{kind}/{i}"] for i in range(count)]


def assert_rows_match(got: np.ndarray, want: np.ndarray, what: str) -> float:
    """Same rows, each with cosine >= MIN_COSINE; returns the largest absolute difference."""
    assert got.dtype == np.float32
    assert got.shape == want.shape, f"{what}: {got.shape} rows x dim, PyLate {want.shape}"
    cos = (got * want).sum(axis=-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    assert cos.min() >= MIN_COSINE, f"{what}: worst row cosine {cos.min()}"
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=what)
    return float(np.abs(got - want).max())


def pool(channel: grpc.Channel, texts: list[str], mode: int) -> pool_service_pb2.PoolResponse:
    request = pool_service_pb2.PoolRequest(inputs=map(text, texts), options=c.EncodeOptions(embedding_mode=mode))
    return pool_service_pb2_grpc.PoolServiceStub(channel).Pool(request)


def test_pool_query_mode_matches_pylate(channel: grpc.Channel, oracle: dict[str, np.ndarray], name: str) -> None:
    resp = pool(channel, QUERIES, c.EMBEDDING_MODE_QUERY)
    want = expected(oracle, name, "query", len(QUERIES))
    for i, (out, ref) in enumerate(zip(resp.outputs, want, strict=True)):
        assert_rows_match(from_tensor(out.data), ref, f"{name} query {i}")
        assert ref.shape[0] == 32  # query_length rows, expansion included
    assert resp.usage.prompt_tokens == sum(len(oracle[f"{name}/query_ids/{i}"]) for i in range(len(QUERIES)))


def test_pool_document_mode_matches_pylate(channel: grpc.Channel, oracle: dict[str, np.ndarray], name: str) -> None:
    resp = pool(channel, DOCUMENTS, c.EMBEDDING_MODE_DOCUMENT)
    want = expected(oracle, name, "document", len(DOCUMENTS))
    for j, (out, ref) in enumerate(zip(resp.outputs, want, strict=True)):
        assert_rows_match(from_tensor(out.data), ref, f"{name} document {j}")
    skipped = [len(oracle[f"{name}/document_ids/{j}"]) - len(want[j]) for j in range(len(DOCUMENTS))]
    assert skipped[2] > 0, "the punctuation document must lose skiplist rows"


def test_faithful_scores_match_pylate(channel: grpc.Channel, oracle: dict[str, np.ndarray], name: str) -> None:
    stub = score_service_pb2_grpc.ScoreServiceStub(channel)
    matrix = oracle[f"{name}/scores"]
    one_n = stub.Score(score_service_pb2.ScoreRequest(queries=[text(QUERIES[0])], documents=map(text, DOCUMENTS)))
    np.testing.assert_allclose([r.score for r in one_n.results], matrix[0], rtol=REL)
    n_n = stub.Score(score_service_pb2.ScoreRequest(queries=map(text, QUERIES), documents=map(text, DOCUMENTS)))
    np.testing.assert_allclose([r.score for r in n_n.results], np.diag(matrix), rtol=REL)
    ids = [len(oracle[f"{name}/query_ids/0"])] + [len(oracle[f"{name}/document_ids/{j}"]) for j in range(4)]
    assert one_n.usage.prompt_tokens == sum(ids)
    # An explicit raw mode opts out of the server's faithful default: vLLM's numbers again.
    raw_options = c.EncodeOptions(embedding_mode=c.EMBEDDING_MODE_RAW)
    raw = stub.Score(
        score_service_pb2.ScoreRequest(queries=[text(QUERIES[0])], documents=map(text, DOCUMENTS), options=raw_options)
    )
    raw_q = pool(channel, [QUERIES[0]], c.EMBEDDING_MODE_RAW).outputs[0]
    raw_d = pool(channel, DOCUMENTS, c.EMBEDDING_MODE_RAW).outputs
    want_raw = [float((from_tensor(raw_q.data) @ from_tensor(d.data).T).max(1).sum()) for d in raw_d]
    np.testing.assert_allclose([r.score for r in raw.results], want_raw, rtol=1e-5)
    assert not np.allclose(want_raw, matrix[0], rtol=1e-3)


@pytest.mark.parametrize("name", ["hf_colbert"], indirect=True)
def test_http_pooling_takes_embedding_mode(server: LiveServer, oracle: dict[str, np.ndarray], name: str) -> None:
    body = {"input": QUERIES[:2], "embedding_mode": "query", "task": "token_embed"}
    request = urllib.request.Request(
        server.http_url + "/pooling", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            reply = json.loads(response.read())
    except urllib.error.HTTPError as error:
        if error.code == 404:
            pytest.skip("the gateway has no /pooling route yet")
        raise AssertionError(f"/pooling answered {error.code}: {error.read()!r}") from error
    for i, item in enumerate(reply["data"]):
        got = np.asarray(item["data"], dtype=np.float32)
        assert_rows_match(got, oracle[f"{name}/query/{i}"], f"HTTP query {i}")


@pytest.mark.parametrize("name", ["hf_colbert"], indirect=True)
def test_unknown_embedding_mode_is_invalid_argument(channel: grpc.Channel, name: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        pool(channel, QUERIES[:1], 99)
    call = info.value
    details = unpack_details(call.code(), call.details() or "", rpc_status.from_call(call))  # type: ignore[arg-type]
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.field == "embedding_mode" and "embedding_mode" in details.message


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_checkpoint_settings_match_pylate_in_process(
    variant: str, model_dirs: dict[str, Path], oracle: dict[str, np.ndarray]
) -> None:
    """Shorter lengths (truncation), attend_to_expansion_tokens, no expansion, a custom skiplist, no prefix."""
    _, architectures, _ = VARIANTS[variant]
    family = family_for(load_source(str(model_dirs[variant]), hf_overrides={"architectures": architectures}))
    processor, runner = family.processor(), family.runner("cpu", "float32")
    for mode, kind, texts in ((EmbeddingMode.QUERY, "query", QUERIES), (EmbeddingMode.DOCUMENT, "document", DOCUMENTS)):
        seqs = [processor.encode(TextItem(t), EncodeOptions(embedding_mode=mode), kind) for t in texts]
        for i, seq in enumerate(seqs):
            assert list(seq.ids) == oracle[f"{variant}/{kind}_ids/{i}"].tolist(), f"{variant} {kind} {i} ids"
        outputs = runner.forward([WorkItem(s, frozenset({Task.TOKEN_EMBED})) for s in seqs])
        for i, out in enumerate(outputs):
            assert_rows_match(out[Task.TOKEN_EMBED], oracle[f"{variant}/{kind}/{i}"], f"{variant} {kind} {i}")


def test_faithful_modes_reject_what_they_cannot_encode(model_dirs: dict[str, Path]) -> None:
    processor = family_for(load_source(str(model_dirs["hf_colbert"]))).processor()
    query = EncodeOptions(embedding_mode=EmbeddingMode.QUERY)
    with pytest.raises(InvalidArgument, match="embedding_mode 'query' encodes text") as tokens:
        processor.encode(TokenItem((4, 5)), query, "query")
    assert tokens.value.field == "embedding_mode"
    no_specials = EncodeOptions(embedding_mode=EmbeddingMode.DOCUMENT, add_special_tokens=False)
    with pytest.raises(InvalidArgument, match="add_special_tokens") as specials:
        processor.encode(TextItem("hi"), no_specials, "document")
    assert specials.value.field == "embedding_mode"
    # truncate_prompt_tokens lowers the checkpoint's lengths; the query is still padded to the new length.
    short = processor.encode(
        TextItem(QUERIES[3]), EncodeOptions(embedding_mode=EmbeddingMode.QUERY, truncate_prompt_tokens=8), "query"
    )
    assert len(short.ids) == 8 and short.ids[1] == 1  # [CLS] [unused0] ...


def test_plain_bert_serves_raw_only(minilm_dir: Path) -> None:
    processor = family_for(load_source(str(minilm_dir))).processor()
    with pytest.raises(InvalidArgument, match="needs a ColBERT checkpoint") as err:
        processor.encode(TextItem("hi"), EncodeOptions(embedding_mode=EmbeddingMode.QUERY), "query")
    assert err.value.field == "embedding_mode"
