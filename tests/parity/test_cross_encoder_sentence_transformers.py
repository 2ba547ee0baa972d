"""Cross-encoders (families/cross_encoder.py) against Sentence-Transformers' CrossEncoder.predict.

CrossEncoder 6.2.0 runs in its own venv (.refs/sentence_transformers, `make refs`;
tests/oracles/sentence_transformers_oracle.py) on tiny BertForSequenceClassification and
XLMRobertaForSequenceClassification checkpoints with one label (tests/fixtures/cross_encoder.py). Its
default activation for one label, with no activation in config.json, is Sigmoid (the oracle reports the
class it used); the runner returns raw logits and the engine applies the sigmoid, so the in-process
tests apply it here. The pair encoding is checked against transformers' own tokenizer(q, text_pair=d).

/score and /rerank through a live server: the engine routes cross-encoders to encode_pair (one joint input
per pair, never cached) and applies the activation (engine/pairs.py, engine/engine.py).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from lateserve.server.config import ServerConfig
from lateserve.server.domain import (
    EncodeOptions,
    ModelKind,
    ModelLoadError,
    Task,
    TextItem,
    TokenItem,
    TruncationSide,
    WorkItem,
)
from lateserve.server.families.base import Family
from lateserve.server.families.cross_encoder import CrossEncoder
from lateserve.server.families.registry import family_for, load_source
from tests.fixtures.checkpoints import CORPUS, edit_weights
from tests.fixtures.cross_encoder import write_bert_cross_encoder, write_xlmr_cross_encoder
from tests.fixtures.toy_vision import http_json
from tests.live import LiveServer
from tests.oracles.runner import run_oracle

QUERY = "What is the capital of France?"
DOCUMENTS = [
    "The capital of France is Paris.",
    "The weather is sunny.",
    "Paris is the largest city in France.",
    " ".join(CORPUS[30:40]),  # a long document: pairs of different lengths share a batch
]
PAIRS = [
    *([QUERY, d] for d in DOCUMENTS),
    ["What is machine learning?", "Machine learning is a subset of artificial intelligence."],
    ["Hi", "Deep learning uses neural networks."],
]
WRITERS = {"bert": write_bert_cross_encoder, "xlmr": write_xlmr_cross_encoder}
ARCHITECTURES = {"bert": "BertForSequenceClassification", "xlmr": "XLMRobertaForSequenceClassification"}
REL = 1e-5


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cross_encoder")
    return {key: write(root / key) for key, write in WRITERS.items()}


@pytest.fixture(scope="module")
def oracle(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    request = {"cross": {k: str(v) for k, v in model_dirs.items()}, "pairs": PAIRS}
    return run_oracle("sentence_transformers", "sentence_transformers_oracle.py", request, tmp_path_factory.mktemp("o"))


@pytest.fixture(scope="module", params=sorted(WRITERS))
def key(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def family(path: Path) -> Family:
    return family_for(load_source(str(path)))


def sigmoid(x: np.ndarray) -> np.ndarray:
    result: np.ndarray = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
    return result


def logits(fam: Family, pairs: list[list[str]], options: EncodeOptions | None = None) -> np.ndarray:
    processor = fam.processor()
    sequences = [processor.encode_pair(TextItem(q), TextItem(d), options or EncodeOptions()) for q, d in pairs]
    outputs = fam.runner("cpu", "float32").forward([WorkItem(s, frozenset({Task.CLASSIFY})) for s in sequences])
    for out in outputs:
        assert out[Task.CLASSIFY].dtype == np.float32 and out[Task.CLASSIFY].shape == (1,)
    return np.array([out[Task.CLASSIFY][0] for out in outputs], dtype=np.float32)


# ------------------------------------------------------------------------------------ in process


def test_spec(key: str, model_dirs: dict[str, Path]) -> None:
    fam = family(model_dirs[key])
    assert isinstance(fam, CrossEncoder)
    spec = fam.spec()
    assert spec.architecture == ARCHITECTURES[key]
    assert spec.kind == ModelKind.CROSS_ENCODER
    assert (spec.tasks, spec.default_task) == (frozenset({Task.CLASSIFY}), Task.CLASSIFY)
    assert (spec.num_labels, spec.embed_dim, spec.token_dim) == (1, 0, 0)
    assert spec.max_model_len == 512


def test_the_oracle_uses_sigmoid_by_default(key: str, oracle: dict[str, Any]) -> None:
    assert str(oracle[f"cross/{key}/activation"]) == "Sigmoid"
    np.testing.assert_allclose(oracle[f"cross/{key}"], sigmoid(oracle[f"cross/{key}/raw"]), rtol=1e-6)


def test_scores_match_cross_encoder_predict(key: str, model_dirs: dict[str, Path], oracle: dict[str, Any]) -> None:
    raw = logits(family(model_dirs[key]), PAIRS)
    np.testing.assert_allclose(sigmoid(raw), oracle[f"cross/{key}"], rtol=REL)
    np.testing.assert_allclose(raw, oracle[f"cross/{key}/raw"], rtol=REL, atol=1e-5)
    assert np.ptp(raw) > 0.5, "the fixture's scores must differ between pairs"


def test_a_pair_does_not_depend_on_its_batch(key: str, model_dirs: dict[str, Path]) -> None:
    fam = family(model_dirs[key])
    together = logits(fam, PAIRS)
    alone = np.concatenate([logits(fam, [p]) for p in PAIRS])
    np.testing.assert_allclose(together, alone, rtol=1e-6, atol=1e-6)  # padding changes summation order only


def test_the_pair_encoding_is_the_tokenizers(key: str, model_dirs: dict[str, Path]) -> None:
    """[CLS] q [SEP] d [SEP] with segment 1 for `d [SEP]` (BERT); <s> q </s></s> d </s> without segments (XLM-R)."""
    reference = AutoTokenizer.from_pretrained(str(model_dirs[key]))
    processor = family(model_dirs[key]).processor()
    for q, d in PAIRS:
        want = reference(q, text_pair=d, return_token_type_ids=True)
        seq = processor.encode_pair(TextItem(q), TextItem(d), EncodeOptions())
        assert list(seq.ids) == list(want["input_ids"])
        assert seq.prompt_tokens == len(seq.ids)
        if key == "bert":
            assert seq.token_type_ids == tuple(want["token_type_ids"])
            assert seq.token_type_ids[seq.ids.index(reference.sep_token_id) + 1] == 1
        else:
            assert seq.token_type_ids is None
            sep = reference.sep_token_id
            assert seq.ids[0] == reference.cls_token_id and seq.ids.count(sep) == 3


@pytest.mark.parametrize("limit", [12, 20, 31])
def test_truncation_cuts_the_longest_text_first(key: str, model_dirs: dict[str, Path], limit: int) -> None:
    """truncate_prompt_tokens k: the fast tokenizer's longest_first to k tokens, specials kept, on the asked side."""
    reference = AutoTokenizer.from_pretrained(str(model_dirs[key]))
    processor = family(model_dirs[key]).processor()
    q, d = PAIRS[3]
    for side in (TruncationSide.RIGHT, TruncationSide.LEFT):
        reference.truncation_side = side.value
        want = reference(q, text_pair=d, truncation="longest_first", max_length=limit, return_token_type_ids=True)
        options = EncodeOptions(truncate_prompt_tokens=limit, truncation_side=side)
        seq = processor.encode_pair(TextItem(q), TextItem(d), options)
        assert list(seq.ids) == list(want["input_ids"]) and len(seq.ids) == limit
        if key == "bert":
            assert seq.token_type_ids == tuple(want["token_type_ids"])


def test_long_pairs_are_left_long_without_truncation(key: str, model_dirs: dict[str, Path]) -> None:
    """The engine, not the processor, rejects inputs over max_model_len (vLLM's error)."""
    processor = family(model_dirs[key]).processor()
    long_document = " ".join(CORPUS) * 3
    seq = processor.encode_pair(TextItem(QUERY), TextItem(long_document), EncodeOptions())
    assert seq.num_tokens > 512
    cut = processor.encode_pair(TextItem(QUERY), TextItem(long_document), EncodeOptions(truncate_prompt_tokens=-1))
    assert cut.num_tokens == 512
    assert cut.ids[: len(processor.tokenize(QUERY, True)) - 1] == tuple(processor.tokenize(QUERY, True)[:-1])


def test_a_single_text_is_encoded_alone(key: str, model_dirs: dict[str, Path]) -> None:
    """/pooling classify of one text: the text with the tokenizer's special tokens, no second segment."""
    reference = AutoTokenizer.from_pretrained(str(model_dirs[key]))
    seq = family(model_dirs[key]).processor().encode(TextItem(QUERY), EncodeOptions(), "input")
    assert list(seq.ids) == list(reference(QUERY)["input_ids"]) and seq.token_type_ids is None


def test_token_ids_cannot_be_paired(model_dirs: dict[str, Path]) -> None:
    from lateserve.server.domain import InvalidArgument

    processor = family(model_dirs["bert"]).processor()
    with pytest.raises(InvalidArgument, match="text pairs"):
        processor.encode_pair(TokenItem((5, 6)), TextItem("x"), EncodeOptions())


@pytest.mark.parametrize(
    ("drop", "add", "message"),
    [
        ("classifier.bias", None, r"missing weights: 1: classifier\.bias"),
        (None, "classifier.extra", r"unexpected weights: 1: classifier\.extra"),
    ],
)
def test_mismatched_head_weights_fail_naming_them(
    model_dirs: dict[str, Path], tmp_path: Path, drop: str | None, add: str | None, message: str
) -> None:
    path = shutil.copytree(model_dirs["bert"], tmp_path / "m")
    edit_weights(path, drop=[drop] if drop else [], add={add: torch.zeros(1)} if add else None)
    with pytest.raises(ModelLoadError, match=message):
        family(path).runner("cpu", "float32")


def test_a_missing_pooler_fails_for_bert(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The BERT head reads the pooled [CLS]: without the pooler's weights the scores would be random."""
    path = shutil.copytree(model_dirs["bert"], tmp_path / "m")
    edit_weights(path, drop=["bert.pooler.dense.weight"])
    with pytest.raises(ModelLoadError, match=r"missing weights: 1: backbone\.pooler\.dense\.weight"):
        family(path).runner("cpu", "float32")


# ------------------------------------------------------------------------------------ live server


def post(server: LiveServer, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    return http_json(server.http_url, path, body)


@pytest.fixture(scope="module")
def server(model_dirs: dict[str, Path]) -> Iterator[LiveServer]:
    with LiveServer(ServerConfig(model=str(model_dirs["bert"]), workers=1, threads_per_worker=1)) as live:
        yield live


def test_http_score_matches_cross_encoder_predict(server: LiveServer, oracle: dict[str, Any]) -> None:
    status, body = post(server, "/score", {"text_1": QUERY, "text_2": DOCUMENTS})
    assert status == 200, body
    assert [d["index"] for d in body["data"]] == list(range(len(DOCUMENTS)))
    np.testing.assert_allclose([d["score"] for d in body["data"]], oracle["cross/bert"][: len(DOCUMENTS)], rtol=REL)
    status, body = post(server, "/score", {"queries": [q for q, _ in PAIRS], "documents": [d for _, d in PAIRS]})
    assert status == 200, body
    np.testing.assert_allclose([d["score"] for d in body["data"]], oracle["cross/bert"], rtol=REL)


def test_http_rerank_matches_cross_encoder_predict(server: LiveServer, oracle: dict[str, Any]) -> None:
    status, body = post(server, "/rerank", {"query": QUERY, "documents": DOCUMENTS})
    assert status == 200, body
    want = oracle["cross/bert"][: len(DOCUMENTS)]
    assert [r["index"] for r in body["results"]] == sorted(range(len(DOCUMENTS)), key=lambda i: -want[i])
    np.testing.assert_allclose([r["relevance_score"] for r in body["results"]], sorted(want, reverse=True), rtol=REL)


SCORE_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def test_a_chat_template_builds_the_score_prompt(model_dirs: dict[str, Path]) -> None:
    """--chat-template renders messages [query, document] into one prompt (vllm-spec 2.4), tokenized with
    the special tokens; the score equals transformers' classifier on that text."""
    from transformers import AutoModelForSequenceClassification

    config = ServerConfig(model=str(model_dirs["bert"]), workers=1, threads_per_worker=1, chat_template=SCORE_TEMPLATE)
    with LiveServer(config) as live:
        status, body = post(live, "/score", {"text_1": QUERY, "text_2": DOCUMENTS[:2]})
    assert status == 200, body
    tokenizer = AutoTokenizer.from_pretrained(str(model_dirs["bert"]))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dirs["bert"])).eval()
    prompts = [f"query: {QUERY}\ndocument: {d}\n" for d in DOCUMENTS[:2]]
    with torch.inference_mode():
        want = [float(model(**tokenizer(p, return_tensors="pt")).logits[0, 0]) for p in prompts]
    np.testing.assert_allclose([d["score"] for d in body["data"]], sigmoid(np.array(want)), rtol=REL)
    assert body["usage"]["prompt_tokens"] == sum(len(tokenizer(p)["input_ids"]) for p in prompts)
