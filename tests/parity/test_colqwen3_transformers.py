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

import base64
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lateserve.server.config import ServerConfig
from lateserve.server.domain import (
    ChatItem,
    ChatMessage,
    EmbeddingMode,
    EncodeOptions,
    ImagePart,
    InvalidArgument,
    Item,
    Modality,
    ModelLoadError,
    MultiModalItem,
    Task,
    TextItem,
    TextPart,
    TokenItem,
    WorkItem,
)
from lateserve.server.families.base import Family, InputProcessor, ModelRunner
from lateserve.server.families.registry import family_for, load_source
from lateserve.v1 import common_pb2 as c
from lateserve.v1 import pool_service_pb2, pool_service_pb2_grpc, rerank_service_pb2, rerank_service_pb2_grpc
from lateserve.wire.tensors import from_tensor
from tests.fixtures.colqwen3 import (
    EMBED_DIM,
    TEXT_HIDDEN,
    token_id,
    write_colqwen3_tomoro,
    write_nemotron_colembed,
    write_ops_colqwen3,
)
from tests.fixtures.toy_vision import http_json
from tests.live import LiveServer
from tests.reference_qwen3vl import Part, Qwen3VLReference, maxsim

TOKEN_EMBED = frozenset({Task.TOKEN_EMBED})
MIN_COSINE = 0.9999
MAX_REL = 1e-4
WRITERS: dict[str, Callable[[Path], Path]] = {
    "tomoro": write_colqwen3_tomoro,
    "ops": write_ops_colqwen3,
    "nemotron": write_nemotron_colembed,
}
DIMS = {"tomoro": EMBED_DIM, "ops": EMBED_DIM, "nemotron": TEXT_HIDDEN}


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _noise(size: tuple[int, int], mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    bands = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    base = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, bands), dtype=np.uint8)
    pixels = np.repeat(np.repeat(base, 8, axis=0), 8, axis=1)[: size[1], : size[0]]  # blocks: compressible
    pixels = pixels + rng.integers(0, 24, pixels.shape, dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)


IMAGES: dict[str, bytes] = {
    "odd": _encode(_noise((97, 61), "RGB", 1)),
    "rgba": _encode(_noise((50, 130), "RGBA", 2)),
    "gray": _encode(_noise((73, 45), "L", 3)),
    "jpeg": _encode(_noise((120, 88), "RGB", 4), "JPEG"),
    "tiny": _encode(_noise((9, 13), "RGB", 5)),
}
QUERIES = ["What is machine learning?", "Retrieve the city of Beijing"]
INPUTS: list[list[Part]] = [
    [QUERIES[0]],
    ["The capital of France is Paris. Machine learning is a subset of artificial intelligence."],
    [IMAGES["odd"]],
    [IMAGES["rgba"], "Describe the image."],
    [IMAGES["gray"], "first", "second line"],
    [IMAGES["jpeg"], IMAGES["tiny"], "Two images."],
    ["A text before", IMAGES["odd"]],  # vLLM moves the placeholder first whatever the part order
]


def data_url(data: bytes) -> str:
    mime = "image/jpeg" if data[:2] == b"\xff\xd8" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def as_item(parts: list[Part]) -> Item:
    if len(parts) == 1 and isinstance(parts[0], str):
        return TextItem(parts[0])
    return MultiModalItem(tuple(ImagePart(data_url(p)) if isinstance(p, bytes) else TextPart(p) for p in parts))


def json_parts(parts: list[Part]) -> list[dict[str, Any]]:
    return [
        {"type": "image_url", "image_url": {"url": data_url(p)}}
        if isinstance(p, bytes)
        else {"type": "text", "text": p}
        for p in parts
    ]


def proto_input(parts: list[Part]) -> c.Input:
    if len(parts) == 1 and isinstance(parts[0], str):
        return c.Input(text=parts[0])
    return c.Input(
        content=c.MultiModalContent(
            parts=[
                c.ContentPart(image_url=c.ImageUrl(url=data_url(p))) if isinstance(p, bytes) else c.ContentPart(text=p)
                for p in parts
            ]
        )
    )


def check_close(ours: np.ndarray, expected: np.ndarray) -> float:
    """Asserts the per-token cosine bound; returns the worst cosine."""
    assert ours.dtype == np.float32 and ours.shape == expected.shape, (ours.shape, expected.shape)
    cosines = (ours * expected).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(expected, axis=-1))
    worst = float(cosines.min())
    assert worst >= MIN_COSINE, worst
    return worst


def check_maxsim(ours: float, expected: float) -> float:
    rel = abs(ours - expected) / abs(expected)
    assert rel <= MAX_REL, (ours, expected)
    return rel


@dataclass
class Case:
    name: str
    path: Path
    family: Family
    processor: InputProcessor
    runner: ModelRunner
    reference: Qwen3VLReference

    def embed(self, items: list[Item], *, normalize: bool = True) -> list[np.ndarray]:
        seqs = [self.processor.encode(i, EncodeOptions(), "input") for i in items]
        return [o[Task.TOKEN_EMBED] for o in self.runner.forward([WorkItem(s, TOKEN_EMBED, normalize) for s in seqs])]


@pytest.fixture(scope="module")
def layout_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("colqwen3")
    return {name: write(root / name) for name, write in WRITERS.items()}


_CASES: dict[str, Case] = {}


@pytest.fixture(params=list(WRITERS))
def case(request: pytest.FixtureRequest, layout_dirs: dict[str, Path]) -> Case:
    name = request.param
    if name not in _CASES:
        path = layout_dirs[name]
        family = family_for(load_source(str(path)))
        _CASES[name] = Case(
            name, path, family, family.processor(), family.runner("cpu", "float32"), Qwen3VLReference(path)
        )
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
    ours = case.embed([as_item(p) for p in INPUTS])
    expected = [case.reference.vectors(p) for p in INPUTS]
    worst = min(check_close(o, e) for o, e in zip(ours, expected, strict=True))
    rels = [
        check_maxsim(maxsim(ours[q], ours[d]), maxsim(expected[q], expected[d]))
        for q in (0, 1)
        for d in range(len(INPUTS))
    ]
    print(f"{case.name}: worst cosine {worst:.8f}, worst MaxSim rel {max(rels):.2e}")
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
    thin = _encode(_noise((402, 2), "RGB", 6))  # aspect ratio over 200: transformers refuses it too
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
    half = case.family.runner("cpu", "bfloat16")
    seqs = [case.processor.encode(as_item(p), EncodeOptions(), "input") for p in INPUTS]
    outputs = [o[Task.TOKEN_EMBED] for o in half.forward([WorkItem(s, TOKEN_EMBED) for s in seqs])]
    expected = [case.reference.vectors(p) for p in INPUTS]
    worst = min(float((o * e).sum(-1).min()) for o, e in zip(outputs, expected, strict=True))
    per_token, rel = 0.0, 0.0
    for k in range(1, len(INPUTS)):
        ours, ref = maxsim(outputs[0], outputs[k]), maxsim(expected[0], expected[k])
        per_token = max(per_token, abs(ours - ref) / len(expected[0]))
        rel = max(rel, abs(ours - ref) / abs(ref))
    print(f"{case.name} bf16: worst cosine {worst:.5f}, MaxSim error {per_token:.4f} per query token (rel {rel:.2e})")
    assert all(o.dtype == np.float32 for o in outputs)
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


def _rewrite(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"), {"format": "pt"})


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
    _rewrite(path, edit)
    with pytest.raises(ModelLoadError, match=named):
        family_for(load_source(str(path), hf_overrides=overrides)).runner("cpu", "float32")


def test_projection_dim_comes_from_the_weight_without_config(tmp_path: Path) -> None:
    path = write_colqwen3_tomoro(tmp_path / "nodim")
    family = family_for(load_source(str(path), hf_overrides={"embed_dim": None}))
    assert family.spec().token_dim == EMBED_DIM


# --- live servers -----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(WRITERS))
def live(request: pytest.FixtureRequest, layout_dirs: dict[str, Path]) -> Iterator[tuple[str, LiveServer]]:
    config = ServerConfig(
        model=str(layout_dirs[request.param]),
        served_model_name=f"tiny-{request.param}",
        workers=1,
        threads_per_worker=1,
        max_model_len=4096,
    )
    with LiveServer(config) as server:
        yield request.param, server


def _reference(name: str, layout_dirs: dict[str, Path]) -> Qwen3VLReference:
    if name in _CASES:
        return _CASES[name].reference
    return Qwen3VLReference(layout_dirs[name])


def test_http_pooling_input_and_messages(live: tuple[str, LiveServer], layout_dirs: dict[str, Path]) -> None:
    name, server = live
    ref = _reference(name, layout_dirs)
    status, body = http_json(server.http_url, "/pooling", {"input": QUERIES[0], "task": "token_embed"})
    assert status == 200, body
    assert body["object"] == "list" and body["model"] == f"tiny-{name}"
    check_close(np.asarray(body["data"][0]["data"], dtype=np.float32), ref.vectors([QUERIES[0]]))

    content = json_parts([IMAGES["rgba"], "Describe the image."])
    status, body = http_json(
        server.http_url, "/pooling", {"messages": [{"role": "user", "content": content}], "task": "token_embed"}
    )
    assert status == 200, body
    ids, images = ref.chat_ids(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
        [IMAGES["rgba"]],
    )
    got = np.asarray(body["data"][0]["data"], dtype=np.float32)
    check_close(got, ref.vectors_for(ids, images))
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_http_rerank_with_image_documents(live: tuple[str, LiveServer], layout_dirs: dict[str, Path]) -> None:
    name, server = live
    ref = _reference(name, layout_dirs)
    documents: list[list[Part]] = [[IMAGES["odd"], "Describe the image."], [IMAGES["gray"]], [IMAGES["jpeg"]]]
    request = {
        "query": QUERIES[1],
        "documents": [{"content": json_parts(d)} for d in documents],
        "top_n": 2,
    }
    status, body = http_json(server.http_url, "/rerank", request)
    assert status == 200, body
    assert list(body) == ["id", "model", "usage", "results"] and body["id"].startswith("score-")
    q = ref.vectors([QUERIES[1]])
    expected = [maxsim(q, ref.vectors(d)) for d in documents]
    order = sorted(range(len(documents)), key=lambda i: -expected[i])[:2]
    assert [r["index"] for r in body["results"]] == order
    for result in body["results"]:
        assert list(result) == ["index", "document", "relevance_score"]
        assert result["document"] == {"text": None, "multi_modal": request["documents"][result["index"]]["content"]}
        check_maxsim(result["relevance_score"], expected[result["index"]])
    q_len = len(ref.prompt([QUERIES[1]])[0])
    tokens = q_len + sum(len(ref.prompt(d)[0]) for d in documents)  # every input encoded, as for text models
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_http_score_with_content_lists(live: tuple[str, LiveServer], layout_dirs: dict[str, Path]) -> None:
    name, server = live
    ref = _reference(name, layout_dirs)
    queries: list[list[Part]] = [[QUERIES[0]], [QUERIES[1], IMAGES["tiny"]]]
    documents: list[list[Part]] = [[IMAGES["jpeg"], "text too"], [IMAGES["rgba"]]]
    request = {
        "data_1": [{"content": json_parts(q)} for q in queries],
        "data_2": [{"content": json_parts(d)} for d in documents],
    }
    status, body = http_json(server.http_url, "/score", request)
    assert status == 200, body
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
    for k, item in enumerate(body["data"]):
        assert item["object"] == "score"
        check_maxsim(item["score"], maxsim(ref.vectors(queries[k]), ref.vectors(documents[k])))


def test_grpc_pool_and_rerank_with_image_parts(live: tuple[str, LiveServer], layout_dirs: dict[str, Path]) -> None:
    name, server = live
    ref = _reference(name, layout_dirs)
    with grpc.insecure_channel(server.grpc_target) as channel:
        pool = pool_service_pb2_grpc.PoolServiceStub(channel)
        inputs = [INPUTS[0], INPUTS[4], INPUTS[5]]
        reply = pool.Pool(pool_service_pb2.PoolRequest(inputs=[proto_input(p) for p in inputs]), timeout=120)
        for parts, output in zip(inputs, reply.outputs, strict=True):
            check_close(from_tensor(output.data), ref.vectors(parts))
        rerank = rerank_service_pb2_grpc.RerankServiceStub(channel)
        documents = [INPUTS[2], INPUTS[3], INPUTS[1]]
        ranked = rerank.Rerank(
            rerank_service_pb2.RerankRequest(
                query=proto_input(INPUTS[0]), documents=[proto_input(d) for d in documents], top_n=3
            ),
            timeout=120,
        )
    q = ref.vectors(INPUTS[0])
    expected = [maxsim(q, ref.vectors(d)) for d in documents]
    assert [r.index for r in ranked.results] == sorted(range(3), key=lambda i: -expected[i])
    for result in ranked.results:
        check_maxsim(result.relevance_score, expected[result.index])
        assert result.document == proto_input(documents[result.index])
