"""Llama-Nemotron-VL building blocks, each against an independent statement of what it must do:

* the tiling table of vl-families.md §3.1 (512 px tiles, at most 6) and the target-ratio order it prints;
* tiles bit-identical to NVIDIA's PIL `dynamic_preprocess` (tests/reference_nemotron_vl.py) for odd sizes;
* the pixel shuffle on an arange tensor against the index formula it implements;
* `<IMG_CONTEXT>` counts and layout in prepared sequences; refusals of text that spells the image token;
* the three shipped templates rendered against the texts of vllm-spec.md §1.8 (here and by transformers);
* the weight mappers (nested and flat vision keys) and strict loading;
* processor settings: processor_config.json, --mm-processor-kwargs and per-request mm_processor_kwargs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lateserve.server.domain import (
    ChatItem,
    ChatMessage,
    EncodeOptions,
    ImagePart,
    InvalidArgument,
    ModelKind,
    ModelLoadError,
    MultiModalItem,
    Task,
    TextItem,
    TextPart,
    TokenItem,
)
from lateserve.server.families.chat_template import ChatTemplate
from lateserve.server.families.internvl.runner import pixel_shuffle
from lateserve.server.families.internvl.tiling import TilingSettings, choose_grid, target_ratios, tile_count, tile_image
from lateserve.server.families.internvl.weights import split_checkpoint
from lateserve.server.families.registry import family_for, load_source
from tests.fixtures.nemotron_vl import (
    MAX_TILES,
    TILE,
    TOKENS_PER_TILE,
    token_id,
    write_nemotron_embed_vl,
    write_nemotron_rerank_vl,
)
from tests.parity.common import data_url, image_bytes
from tests.reference_nemotron_vl import decode_image, nvidia_dynamic_preprocess, nvidia_target_ratios

REPO = Path(__file__).resolve().parents[2]
EMBED_TEMPLATE = REPO / "examples/pooling/embed/template/nemotron_embed_vl.jinja"
RERANK_VL_TEMPLATE = REPO / "examples/pooling/score/template/nemotron-vl-rerank.jinja"
RERANK_TEMPLATE = REPO / "examples/pooling/score/template/nemotron-rerank.jinja"

# vllm-spec.md §1.8, verbatim.
EMBED_TEMPLATE_TEXT = """{%- if messages | length > 1 -%}
    {{ raise_exception('Embedding models should only embed one message at a time') }}
{%- endif -%}

{% set vars = namespace(prefix='', images=[], texts=[]) %}
{%- for message in messages -%}
    {%- if message['role'] == 'query' -%}
        {%- set vars.prefix = 'query: ' %}
    {%- elif message['role'] == 'document' -%}
        {%- set vars.prefix = 'passage: ' %}
    {%- endif -%}
    {%- for content in message['content'] -%}
        {%- if content['type'] == 'text' -%}
            {%- set vars.texts = vars.texts + [content['text']] %}
        {%- elif content['type'] == 'image' -%}
            {%- set vars.images = vars.images + ['<image> '] %}
        {%- endif -%}
    {%- endfor -%}
{%- endfor -%}
{{- bos_token }}{{ vars.prefix }}{{ (vars.images + vars.texts) | join('') }}
"""
RERANK_VL_TEMPLATE_TEXT = """{%- set query_msg = (messages | selectattr('role', 'equalto', 'query') | list | first) -%}
{%- set doc_msg   = (messages | selectattr('role', 'equalto', 'document') | list | first) -%}

{%- set q = query_msg['content'] -%}
{%- set d = doc_msg['content'] -%}

{# If the doc contains <image> anywhere, hoist a single <image> to the front #}
{%- set has_image = ("<image>" in d) -%}
{%- set d_clean = d | replace("<image>", "") -%}
{%- set q_clean = q | replace("<image>", "") -%}

{%- if has_image -%}<image>{{ " " }}{%- endif -%}
question:{{ q_clean }}{{ " " }}
{{ " " }}
{{ " " }}passage:{{ d_clean }}
"""
RERANK_TEMPLATE_TEXT = (
    'question:{{ (messages | selectattr("role", "eq", "query") | first).content }} \n \n '
    'passage:{{ (messages | selectattr("role", "eq", "document") | first).content }}\n'
)


# --- tiling -------------------------------------------------------------------------------------------


def test_target_ratio_order_is_the_printed_one() -> None:
    printed = [
        (1, 1),
        (1, 2),
        (2, 1),
        (3, 1),
        (1, 3),
        (4, 1),
        (1, 4),
        (2, 2),
        (1, 5),
        (5, 1),
        (6, 1),
        (2, 3),
        (1, 6),
        (3, 2),
    ]
    assert list(target_ratios(1, 6)) == printed == nvidia_target_ratios(1, 6)
    for low, high in ((1, 1), (1, 2), (1, 12), (2, 9), (3, 40)):
        assert list(target_ratios(low, high)) == nvidia_target_ratios(low, high)


@pytest.mark.parametrize(
    ("size", "grid", "tiles", "tokens"),
    [
        ((64, 64), (1, 1), 1, 256),
        ((512, 512), (1, 1), 1, 256),
        ((1275, 1650), (2, 3), 7, 1792),
        ((2000, 500), (4, 1), 5, 1280),
        ((800, 600), (3, 2), 7, 1792),
    ],
)
def test_tiling_table(size: tuple[int, int], grid: tuple[int, int], tiles: int, tokens: int) -> None:
    """vl-families.md §3.1 worked examples: 512 px tiles, at most 6, thumbnail, 256 tokens a tile."""
    settings = TilingSettings(image_size=512, max_tiles=6)
    assert choose_grid(*size, settings) == grid
    assert tile_count(*size, settings) == tiles
    assert tiles * 256 == tokens
    assert len(nvidia_dynamic_preprocess(Image.new("RGB", size), 1, 6, 512, True)) == tiles


def test_static_size_and_bounds() -> None:
    assert tile_count(2000, 500, TilingSettings(dynamic=False)) == 1
    assert tile_count(2000, 500, TilingSettings(use_thumbnail=False)) == 4
    assert tile_count(2000, 500, TilingSettings(max_tiles=2)) == 3


@pytest.mark.parametrize("size", [(97, 61), (50, 130), (33, 31), (300, 20), (8, 8), (64, 96)])
def test_tiles_equal_nvidias_pil_tiles(size: tuple[int, int]) -> None:
    image = decode_image(image_bytes(size, seed=sum(size)))
    for settings in (TilingSettings(image_size=TILE, max_tiles=6), TilingSettings(image_size=TILE, max_tiles=12)):
        ours = tile_image(image, settings)
        theirs = nvidia_dynamic_preprocess(image, 1, settings.max_tiles, TILE, True)
        assert ours.dtype == np.uint8 and ours.shape == (len(theirs), TILE, TILE, 3)
        for k, tile in enumerate(theirs):
            np.testing.assert_array_equal(ours[k], np.asarray(tile))


def test_pixel_shuffle_on_arange() -> None:
    """Output token (i, j) of the 2x2 shuffle (ps v2) holds input patches (2i, 2j), (2i, 2j+1), (2i+1, 2j),
    (2i+1, 2j+1) in that channel order (worked out by hand from NVIDIA's view/permute/view/permute); v1 is
    the same with the two spatial axes swapped."""
    n, side, c = 2, 4, 3
    x = torch.arange(n * side * side * c, dtype=torch.float32).reshape(n, side, side, c)
    out = pixel_shuffle(x, 0.5, "v2")
    assert out.shape == (n, 2, 2, 4 * c)
    for b in range(n):
        for i in range(2):
            for j in range(2):
                expected = torch.cat([x[b, 2 * i + di, 2 * j + dj] for di in (0, 1) for dj in (0, 1)])
                torch.testing.assert_close(out[b, i, j], expected, rtol=0, atol=0)
    v1 = pixel_shuffle(x, 0.5, "v1")
    torch.testing.assert_close(v1, out.permute(0, 2, 1, 3), rtol=0, atol=0)


# --- the processor ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_nemotron_embed_vl(tmp_path_factory.mktemp("nvl") / "embed")


@pytest.fixture(scope="module")
def rerank_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_nemotron_rerank_vl(tmp_path_factory.mktemp("nvl") / "rerank")


def test_specs(embed_dir: Path, rerank_dir: Path) -> None:
    embed = family_for(load_source(str(embed_dir), trust_remote_code=True)).spec()
    assert embed.kind is ModelKind.BI_ENCODER and embed.tasks == {Task.EMBED, Task.TOKEN_EMBED}
    assert embed.embed_dim == 48 and embed.max_model_len == 131072
    rerank = family_for(load_source(str(rerank_dir))).spec()
    assert rerank.kind is ModelKind.CROSS_ENCODER and rerank.tasks == {Task.CLASSIFY} and rerank.num_labels == 1


def test_image_context_counts(embed_dir: Path) -> None:
    processor = family_for(load_source(str(embed_dir))).processor()
    images = [image_bytes((97, 61), 1), image_bytes((20, 20), 2), image_bytes((300, 40), 3)]
    item = MultiModalItem((TextPart("first"), *(ImagePart(data_url(b)) for b in images), TextPart("second")))
    seq = processor.encode(item, EncodeOptions(), "input")
    context = token_id("<IMG_CONTEXT>")
    expected_tiles = [len(nvidia_dynamic_preprocess(decode_image(b), 1, MAX_TILES, TILE, True)) for b in images]
    assert [m.length for m in seq.media] == [t * TOKENS_PER_TILE for t in expected_tiles]
    assert sum(1 for i in seq.ids if i == context) == sum(expected_tiles) * TOKENS_PER_TILE
    assert seq.ids[0] == token_id("<|begin_of_text|>")
    for payload in seq.media:
        assert set(seq.ids[payload.offset : payload.offset + payload.length]) == {context}
        assert seq.ids[payload.offset - 1] == token_id("<img>")
        assert seq.ids[payload.offset + payload.length] == token_id("</img>")
        tiles = payload.array("tiles")
        assert tiles.dtype == "uint8" and tiles.shape[1:] == (TILE, TILE, 3)
        assert payload.cost == tiles.shape[0] * (TILE // 8) ** 2
    assert seq.prompt_tokens == len(seq.ids)


def test_text_spelling_the_image_token_is_refused(embed_dir: Path) -> None:
    processor = family_for(load_source(str(embed_dir))).processor()
    context = token_id("<IMG_CONTEXT>")
    for item in (TextItem("look <IMG_CONTEXT> here"), TokenItem((1, context))):
        with pytest.raises(InvalidArgument, match="IMG_CONTEXT"):
            processor.encode(item, EncodeOptions(), "input")
    with pytest.raises(InvalidArgument, match="IMG_CONTEXT"):
        processor.encode(
            MultiModalItem((ImagePart(data_url(image_bytes((20, 20), 1))), TextPart("<IMG_CONTEXT>"))),
            EncodeOptions(),
            "input",
        )
    # `<image>` without an image is just text, as in vLLM
    assert processor.encode(TextItem("an <image> tag"), EncodeOptions(), "input").media == ()


def test_chat_placeholder_mismatch_and_bad_images_name_the_part(embed_dir: Path) -> None:
    processor = family_for(load_source(str(embed_dir), chat_template=str(EMBED_TEMPLATE))).processor()
    bad = MultiModalItem((TextPart("x"), ImagePart("data:image/png;base64,aGVsbG8=")))
    with pytest.raises(InvalidArgument) as err:
        processor.encode(bad, EncodeOptions(), "input")
    assert err.value.field == "content[1].image_url"
    chat = ChatItem((ChatMessage("document", (ImagePart(data_url(image_bytes((20, 20), 1))), TextPart("x"))),))
    rendered = processor.render(chat)
    assert rendered.text == "<|begin_of_text|>passage: <image> x" and len(rendered.images) == 1
    with pytest.raises(InvalidArgument, match="placeholders"):
        processor.encode(type(rendered)("no placeholder", rendered.images), EncodeOptions(), "input")


def test_processor_settings_and_overrides(embed_dir: Path) -> None:
    wide = MultiModalItem((ImagePart(data_url(image_bytes((300, 40), 3))),))
    default = family_for(load_source(str(embed_dir))).processor()
    assert default.encode(wide, EncodeOptions(), "input").media[0].length == 7 * TOKENS_PER_TILE
    two = family_for(load_source(str(embed_dir), mm_processor_kwargs={"max_input_tiles": 2})).processor()
    assert two.encode(wide, EncodeOptions(), "input").media[0].length == 3 * TOKENS_PER_TILE
    one = default.encode(wide, EncodeOptions(mm_processor_kwargs=(("dynamic_image_size", False),)), "input")
    assert one.media[0].length == TOKENS_PER_TILE
    alias = default.encode(wide, EncodeOptions(mm_processor_kwargs=(("max_dynamic_patch", 2),)), "input")
    assert alias.media[0].length == 3 * TOKENS_PER_TILE
    assert alias.media[0].digest != default.encode(wide, EncodeOptions(), "input").media[0].digest
    with pytest.raises(InvalidArgument) as bad:
        default.encode(wide, EncodeOptions(mm_processor_kwargs=(("max_tiles", 2),)), "input")
    assert bad.value.field == "mm_processor_kwargs"
    with pytest.raises(ModelLoadError, match="max_input_tiles"):
        family_for(load_source(str(embed_dir), mm_processor_kwargs={"max_input_tiles": 0})).processor()


# --- templates ----------------------------------------------------------------------------------------


def test_shipped_templates_are_the_documented_texts() -> None:
    assert EMBED_TEMPLATE.read_text() == EMBED_TEMPLATE_TEXT
    assert RERANK_VL_TEMPLATE.read_text() == RERANK_VL_TEMPLATE_TEXT
    assert RERANK_TEMPLATE.read_text() == RERANK_TEMPLATE_TEXT


def test_template_rendering(embed_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(embed_dir), trust_remote_code=False)
    embed = ChatTemplate(EMBED_TEMPLATE_TEXT)
    bos = {"bos_token": "<|begin_of_text|>"}
    cases = [
        (
            "query",
            [{"type": "text", "text": "What is machine learning?"}],
            "<|begin_of_text|>query: What is machine learning?",
        ),
        (
            "document",
            [{"type": "image"}, {"type": "text", "text": "Describe the image."}],
            "<|begin_of_text|>passage: <image> Describe the image.",
        ),
        (
            "user",
            [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "image"}],
            "<|begin_of_text|><image> <image> a",
        ),
    ]
    for role, content, expected in cases:
        messages = [{"role": role, "content": content}]
        assert embed.render(messages, special_tokens=bos) == expected
        assert tok.apply_chat_template(messages, chat_template=EMBED_TEMPLATE_TEXT, tokenize=False) == expected
    with pytest.raises(InvalidArgument, match="one message at a time"):
        embed.render([{"role": "query", "content": []}, {"role": "document", "content": []}], special_tokens=bos)

    pair = [{"role": "query", "content": "Find robots"}, {"role": "document", "content": "<image>Robotics diagram."}]
    vl = ChatTemplate(RERANK_VL_TEMPLATE_TEXT)
    assert vl.render(pair) == "<image> question:Find robots \n \n passage:Robotics diagram."
    text_pair = [pair[0], {"role": "document", "content": "Robotics diagram."}]
    assert vl.render(text_pair) == "question:Find robots \n \n passage:Robotics diagram."
    assert (
        ChatTemplate(RERANK_TEMPLATE_TEXT).render(text_pair) == "question:Find robots \n \n passage:Robotics diagram."
    )
    for template in (RERANK_VL_TEMPLATE_TEXT, RERANK_TEMPLATE_TEXT):
        assert tok.apply_chat_template(text_pair, chat_template=template, tokenize=False) == ChatTemplate(
            template
        ).render(text_pair)


# --- weights ------------------------------------------------------------------------------------------


def test_weight_mapper_table() -> None:
    state = {
        "vision_model.embeddings.patch_embedding.weight": 1,
        "language_model.layers.0.mlp.up_proj.weight": 2,
        "mlp1.0.weight": 3,
        "language_model.lm_head.weight": 4,
    }
    flat = split_checkpoint(state)
    assert flat.state == {
        "vision.embeddings.patch_embedding.weight": 1,
        "language.layers.0.mlp.up_proj.weight": 2,
        "mlp1.0.weight": 3,
    }
    assert flat.ignored == ["language_model.lm_head.weight"]
    nested = split_checkpoint(
        {
            "model.vision_model.vision_model.post_layernorm.bias": 1,
            "model.language_model.model.norm.weight": 2,
            "model.vision_model.vision_model.head.probe": 9,
            "score.weight": 3,
            "something.else": 4,
        }
    )
    assert nested.state == {
        "vision.post_layernorm.bias": 1,
        "language.norm.weight": 2,
        "score.weight": 3,
        "something.else": 4,
    }
    assert nested.origin["vision.post_layernorm.bias"] == "model.vision_model.vision_model.post_layernorm.bias"


@pytest.mark.parametrize(
    ("writer", "edit", "named"),
    [
        ("embed", lambda s: s.pop("language_model.layers.1.mlp.up_proj.weight"), r"language\.layers\.1\.mlp\.up_proj"),
        ("embed", lambda s: s.update({"vision_model.extra": torch.zeros(2)}), r"vision_model\.extra"),
        ("rerank", lambda s: s.pop("score.weight"), r"score\.weight"),
        ("rerank", lambda s: s.pop("model.mlp1.3.bias"), r"mlp1\.3\.bias"),
    ],
    ids=["missing", "unexpected", "no-score", "no-mlp1-bias"],
)
def test_strict_loading_names_the_weights(tmp_path: Path, writer: str, edit, named: str) -> None:  # type: ignore[no-untyped-def]
    path = (write_nemotron_embed_vl if writer == "embed" else write_nemotron_rerank_vl)(tmp_path / writer)
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"), {"format": "pt"})
    with pytest.raises(ModelLoadError, match=named):
        family_for(load_source(str(path))).runner("cpu", "float32")


def test_both_vision_spellings_load_to_the_same_model(tmp_path: Path) -> None:
    flat = family_for(load_source(str(write_nemotron_embed_vl(tmp_path / "flat")))).runner("cpu", "float32")
    nested_dir = write_nemotron_embed_vl(tmp_path / "nested", nested_vision=True)
    nested = family_for(load_source(str(nested_dir))).runner("cpu", "float32")
    for a, b in zip(flat.vision.state_dict().values(), nested.vision.state_dict().values(), strict=True):  # type: ignore[attr-defined]
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_config_is_refused(tmp_path: Path) -> None:
    path = write_nemotron_embed_vl(tmp_path / "e")
    with pytest.raises(ModelLoadError, match="pool_type"):
        family_for(load_source(str(path), hf_overrides={"pooling": "weighted_avg"})).spec()
    with pytest.raises(ModelLoadError, match="force_image_size"):
        family_for(load_source(str(path), hf_overrides={"force_image_size": 64})).spec()
