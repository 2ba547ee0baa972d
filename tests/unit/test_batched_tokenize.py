"""The batched tokenization path gives exactly what item-by-item tokenization gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from lateserve.server.domain import EmbeddingMode, EncodeOptions, TextItem, TruncationSide
from lateserve.server.families.registry import family_for, load_source

TEXTS = [
    "What is machine learning?",
    "machine learning is fun " * 40,
    "",
    "The capital of France is Paris. " * 5,
    "Deep learning uses neural networks.",
]


@pytest.mark.parametrize("which", ["colbert_dir", "minilm_dir"])
@pytest.mark.parametrize(
    "options",
    [
        EncodeOptions(embedding_mode=EmbeddingMode.RAW),
        EncodeOptions(embedding_mode=EmbeddingMode.RAW, add_special_tokens=False),
        EncodeOptions(embedding_mode=EmbeddingMode.RAW, truncate_prompt_tokens=12),
        EncodeOptions(
            embedding_mode=EmbeddingMode.RAW, truncate_prompt_tokens=12, truncation_side=TruncationSide.RIGHT
        ),
        EncodeOptions(embedding_mode=EmbeddingMode.RAW, truncate_prompt_tokens=1),
    ],
)
def test_batched_equals_one_by_one(request: pytest.FixtureRequest, which: str, options: EncodeOptions) -> None:
    path: Path = request.getfixturevalue(which)
    processor = family_for(load_source(str(path))).processor()
    items = [TextItem(t) for t in TEXTS]
    batched = processor.encode_many(items, options, "document")
    single = [processor.encode(item, options, "document") for item in items]
    assert batched == single
    if options.truncate_prompt_tokens:
        assert max(s.num_tokens for s in batched) == options.truncate_prompt_tokens
