"""ColQwen3 family (Tomoro, Ops, Nemotron layouts) in raw mode against plain transformers.

Reference: tests/reference_qwen3vl.py (AutoTokenizer + Qwen2VLImageProcessorPil + Qwen3VLModel with eager
attention + the layout's head, one input at a time), sharing no code with lateserve. Checked in process
(processor + runner, one right-padded batch of text and image items) and through live servers: HTTP
/pooling (`input`, and `messages` with an image), /rerank with image documents and top_n, /score with
data_1/data_2 content lists, and gRPC Pool / Rerank with image content parts. Images are made here: odd
sizes, RGBA with varying alpha, grayscale, JPEG.

Tolerances (float32): every token's cosine >= 0.9999 and MaxSim relative error <= 1e-4; the measured
worst values are far tighter (about 1e-7).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lateserve.server.domain import (
    ChatItem,
    ChatMessage,
    EmbeddingMode,
    EncodeOptions,
    ImagePart,
    InvalidArgument,
    Modality,
    ModelLoadError,
    MultiModalItem,
    Task,
    TextItem,
    TextPart,
    TokenItem,
    WorkItem,
)
from lateserve.server.families.registry import family_for, load_source
from tests.fixtures.colqwen3 import (
    EMBED_DIM,
    TEXT_HIDDEN,
    token_id,
    write_colqwen3_tomoro,
    write_nemotron_colembed,
    write_ops_colqwen3,
)
from tests.live import LiveServer
from tests.parity.common import (
    IMAGES,
    INPUTS,
    TOKEN_EMBED,
    Case,
    as_item,
    bfloat16_errors,
    check_close,
    check_grpc_pool_and_rerank,
    check_http_pooling,
    check_http_rerank,
    check_http_score,
    check_padded_batch,
    data_url,
    image_bytes,
    live_server,
    rewrite_weights,
)
from tests.reference_qwen3vl import Qwen3VLReference

WRITERS: dict[str, Callable[[Path], Path]] = {
    "tomoro": write_colqwen3_tomoro,
    "ops": write_ops_colqwen3,
    "nemotron": write_nemotron_colembed,
}
DIMS = {"tomoro": EMBED_DIM, "ops": EMBED_DIM, "nemotron": TEXT_HIDDEN}


@pytest.fixture(scope="module")
def layout_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("colqwen3")
    return {name: write(root / name) for name, write in WRITERS.items()}


_CASES: dict[str, Case] = {}


@pytest.fixture(params=list(WRITERS))
def case(request: pytest.FixtureRequest, layout_dirs: dict[str, Path]) -> Case:
    name = request.param
    if name not in _CASES:
        _CASES[name] = Case.load(name, layout_dirs[name], Qwen3VLReference)
    return _CASES[name]


# --- in process -------------------------------------------------------------------------------


def test_spec(case: Case) -> None:
    spec = case.family.spec()
    assert spec.token_dim == DIMS[case.name]
    assert spec.tasks == TOKEN_EMBED and spec.modalities == {Modality.TEXT, Modality.IMAGE}
    assert spec.max_model_len == 262144
    assert family_for(load_source(str(case.path), max_model_len=4096)).spec().max_model_len == 4096


def test_prompt_ids_match_the_reference(case: Case) -> None:
    for parts in INPUTS:
        seq = case.processor.encode(as_item(parts), EncodeOptions(), "input")
        ids, _ = case.reference.prompt(parts)
        assert list(seq.ids) == ids
        assert seq.prompt_tokens == len(ids)
        pad = token_id("<|image_pad|>")
        runs = [m for m in seq.media]
        assert len(runs) == sum(isinstance(p, bytes) for p in parts)
        for payload in runs:
            assert payload.modality is Modality.IMAGE
            assert set(seq.ids[payload.offset : payload.offset + payload.length]) == {pad}
            assert seq.ids[payload.offset - 1] == token_id("<|vision_start|>")
            assert seq.ids[payload.offset + payload.length] == token_id("<|vision_end|>")
            grid = payload.array("grid_thw").to_numpy()
            assert payload.cost == int(np.prod(grid)) == payload.array("pixel_values").shape[0]
            assert payload.length == payload.cost // 4


def test_token_vectors_and_maxsim_match_the_reference_in_a_padded_batch(case: Case) -> None:
    ours, worst, worst_rel = check_padded_batch(case)
    print(f"{case.name}: worst cosine {worst:.8f}, worst MaxSim rel {worst_rel:.2e}")
    np.testing.assert_allclose(np.linalg.norm(ours[3], axis=-1), 1.0, atol=1e-5)
    assert ours[0].shape[1] == DIMS[case.name]


def test_unnormalized_vectors_include_the_projection_bias(case: Case) -> None:
    (ours,) = case.embed([as_item(INPUTS[3])], normalize=False)
    expected = case.reference.vectors(INPUTS[3], normalize=False)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)


def test_an_item_does_not_depend_on_its_batch_mates(case: Case) -> None:
    (alone,) = case.embed([as_item(INPUTS[3])])
    batched = case.embed([as_item(INPUTS[5]), as_item(INPUTS[3]), as_item(INPUTS[0])])[1]
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_chat_with_an_image_matches_the_reference_template(case: Case) -> None:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    chat = ChatItem((ChatMessage("user", (ImagePart(data_url(IMAGES["jpeg"])), TextPart("Describe the image."))),))
    rendered = case.processor.render(chat)
    seq = case.processor.encode(rendered, EncodeOptions(add_special_tokens=False), "input")
    ids, images = case.reference.chat_ids(messages, [IMAGES["jpeg"]])
    assert list(seq.ids) == ids and ids[0] == token_id("<|im_start|>")
    (ours,) = [o[Task.TOKEN_EMBED] for o in case.runner.forward([WorkItem(seq, TOKEN_EMBED)])]
    check_close(ours, case.reference.vectors_for(ids, images))


def test_text_that_spells_the_image_pad_is_refused(case: Case) -> None:
    for item in (
        TextItem("look <|image_pad|> here"),
        TokenItem((1, token_id("<|image_pad|>"))),
        MultiModalItem((ImagePart(data_url(IMAGES["odd"])), TextPart("<|image_pad|>"))),
    ):
        with pytest.raises(InvalidArgument, match="image_pad"):
            case.processor.encode(item, EncodeOptions(), "input")
    if case.name == "nemotron":  # faithful modes exist for Tomoro and Ops (test_colqwen3_colpali.py), not Nemotron
        with pytest.raises(InvalidArgument) as mode:
            case.processor.encode(TextItem("x"), EncodeOptions(embedding_mode=EmbeddingMode.QUERY), "query")
        assert mode.value.field == "embedding_mode"


def test_bad_images_name_their_part(case: Case) -> None:
    item = MultiModalItem((TextPart("x"), ImagePart("data:image/png;base64,aGVsbG8=")))
    with pytest.raises(InvalidArgument) as err:
        case.processor.encode(item, EncodeOptions(), "input")
    assert err.value.field == "content[1].image_url"
    thin = image_bytes((402, 2), 6)  # aspect ratio over 200: transformers refuses it too
    with pytest.raises(InvalidArgument, match="aspect ratio") as ratio:
        case.processor.encode(MultiModalItem((ImagePart(data_url(thin)),)), EncodeOptions(), "input")
    assert ratio.value.field == "content[0].image_url"


def test_request_mm_processor_kwargs_change_the_grid_and_the_digest(case: Case) -> None:
    item = as_item([IMAGES["jpeg"]])
    default = case.processor.encode(item, EncodeOptions(), "input")
    small = case.processor.encode(item, EncodeOptions(mm_processor_kwargs=(("max_pixels", 4096),)), "input")
    assert small.media[0].length < default.media[0].length
    assert small.media[0].digest != default.media[0].digest
    again = case.processor.encode(item, EncodeOptions(), "input")
    assert again.media[0].digest == default.media[0].digest
    with pytest.raises(InvalidArgument) as bad:
        case.processor.encode(item, EncodeOptions(mm_processor_kwargs=(("max_pixel", 4096),)), "input")
    assert bad.value.field == "mm_processor_kwargs"
    (ours,) = [o[Task.TOKEN_EMBED] for o in case.runner.forward([WorkItem(small, TOKEN_EMBED)])]
    reference = Qwen3VLReference(case.path, max_pixels=4096)
    check_close(ours, reference.vectors([IMAGES["jpeg"]]))


def test_bfloat16_stays_close_to_float32(case: Case) -> None:
    """bf16 backbone, float32 head. The tiny random model is more sensitive than real weights; measured worst
    cosine about 0.9992 and MaxSim off by at most 0.006 per query token (relative 1-2 %)."""
    worst, per_token, rel = bfloat16_errors(case)
    print(f"{case.name} bf16: worst cosine {worst:.5f}, MaxSim error {per_token:.4f} per query token (rel {rel:.2e})")
    assert worst > 0.995 and per_token < 0.02


def test_attention_direction(case: Case) -> None:
    """Nemotron is bidirectional: a later token changes an earlier token's vector; the others are causal."""
    a, b = case.embed([TextItem("The capital of France is Paris."), TextItem("The capital of France is Rome.")])
    n = 4  # "The capital of France" tokens are shared
    if case.name == "nemotron":
        assert not np.allclose(a[:n], b[:n], atol=1e-3)
    else:
        np.testing.assert_allclose(a[:n], b[:n], atol=1e-5)


# --- loading ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "edit", "overrides", "named"),
    [
        (
            "tomoro",
            lambda s: s.pop("vlm.model.language_model.layers.1.mlp.up_proj.weight"),
            {},
            r"layers\.1\.mlp\.up_proj",
        ),
        ("tomoro", lambda s: s.update({"vlm.model.visual.extra": torch.zeros(2)}), {}, r"vlm\.model\.visual\.extra"),
        ("tomoro", lambda s: s.pop("embedding_proj_layer.weight"), {"embed_dim": 24}, r"embedding_proj_layer\.weight"),
        ("ops", lambda s: s.pop("visual.deepstack_merger_list.1.norm.bias"), {}, r"deepstack_merger_list\.1\.norm"),
        ("nemotron", lambda s: None, {"architectures": ["ColQwen3"], "embed_dim": 24}, r"embedding_proj_layer"),
        ("tomoro", lambda s: None, {"architectures": ["Qwen3VLNemotronEmbedModel"]}, r"embedding_proj_layer\.weight"),
        ("tomoro", lambda s: None, {"embed_dim": 16}, r"embedding_proj_layer\.weight.*\[16, 64\]"),
    ],
    ids=["missing", "unexpected", "no-projection", "ops-missing", "nemotron-as-tomoro", "tomoro-as-nemotron", "dim"],
)
def test_wrong_layouts_fail_naming_the_weights(
    tmp_path: Path,
    name: str,
    edit: Callable[[dict[str, torch.Tensor]], None],
    overrides: dict[str, Any],
    named: str,
) -> None:
    path = WRITERS[name](tmp_path / name)
    rewrite_weights(path, edit)
    with pytest.raises(ModelLoadError, match=named):
        family_for(load_source(str(path), hf_overrides=overrides)).runner("cpu", "float32")


def test_projection_dim_comes_from_the_weight_without_config(tmp_path: Path) -> None:
    path = write_colqwen3_tomoro(tmp_path / "nodim")
    family = family_for(load_source(str(path), hf_overrides={"embed_dim": None}))
    assert family.spec().token_dim == EMBED_DIM


# --- live servers -----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(WRITERS))
def live(request: pytest.FixtureRequest, layout_dirs: dict[str, Path]) -> Iterator[tuple[str, LiveServer]]:
    with live_server(layout_dirs[request.param], f"tiny-{request.param}") as server:
        yield request.param, server


def _reference(name: str, layout_dirs: dict[str, Path]) -> Qwen3VLReference:
    if name in _CASES:
        return _CASES[name].reference
    return Qwen3VLReference(layout_dirs[name])


def test_http_pooling_input_and_messages(live: tuple[str, LiveServer], layout_dirs: dict[str, Path]) -> None:
    name, server = live
    check_http_pooling(server, _reference(name, layout_dirs), f"tiny-{name}")


def test_http_rerank_with_image_documents(live: tuple[str, LiveServer], layout_dirs: dict[str, Path]) -> None:
    name, server = live
    check_http_rerank(server, _reference(name, layout_dirs), keys=True)


def test_http_score_with_content_lists(live: tuple[str, LiveServer], layout_dirs: dict[str, Path]) -> None:
    name, server = live
    check_http_score(server, _reference(name, layout_dirs), objects=True)


def test_grpc_pool_and_rerank_with_image_parts(live: tuple[str, LiveServer], layout_dirs: dict[str, Path]) -> None:
    name, server = live
    check_grpc_pool_and_rerank(server, _reference(name, layout_dirs), documents_echoed=True)
