"""ColQwen3.5 (`ColQwen3_5`, Qwen3.5 hybrid backbone) in raw mode against plain transformers.

Reference: tests/reference_qwen3_5.py (AutoTokenizer + Qwen2VLImageProcessorPil + Qwen3_5Model with eager
attention + `custom_text_proj` with its bias, one input at a time), sharing no code with lateserve. Two tiny
checkpoints: the bidirectional one (`is_causal: false`, as vLLM serves ColQwen3.5) with an `mtp.*` head to
skip, and a causal one. Checked in process (processor + runner, one right-padded batch of text and image
items; every item of a mixed-length batch equal to the item alone) and through a live server started from
the reference doc's command (`--served-model-name athrael-soju/colqwen3.5-4.5B --max-model-len 4096`):
HTTP /pooling (`input`, and `messages` with an image), /rerank with image documents and top_n, /score with
data_1/data_2 content lists, gRPC Pool / Rerank with image parts, and the doc's ColQwen3.5 curls verbatim.

Tolerances (float32): every token's cosine >= 0.9999 and MaxSim relative error <= 1e-4.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lateserve.server.cli import build_parser, config_from_args
from lateserve.server.domain import (
    ChatItem,
    ChatMessage,
    EncodeOptions,
    ImagePart,
    Modality,
    ModelLoadError,
    Task,
    TextItem,
    TextPart,
    WorkItem,
)
from lateserve.server.families.registry import family_for, load_source
from tests.fixtures.colqwen3 import token_id
from tests.fixtures.colqwen3_5 import DIM, TEXT_HIDDEN, write_colqwen3_5
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
    check_maxsim,
    check_padded_batch,
    data_url,
    rewrite_weights,
)
from tests.reference_qwen3_5 import Qwen3_5Reference, maxsim
from tests.reference_qwen3vl import Qwen3VLReference

HUB_NAME = "athrael-soju/colqwen3.5-4.5B"
VARIANTS: dict[str, dict[str, bool]] = {
    "bidirectional": {"is_causal": False, "mtp": True},
    "causal": {"is_causal": True, "mtp": False},
}


@pytest.fixture(scope="module")
def variant_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("colqwen3_5")
    return {name: write_colqwen3_5(root / name, **kwargs) for name, kwargs in VARIANTS.items()}


_CASES: dict[str, Case] = {}


@pytest.fixture(params=list(VARIANTS))
def case(request: pytest.FixtureRequest, variant_dirs: dict[str, Path]) -> Case:
    name = request.param
    if name not in _CASES:
        _CASES[name] = Case.load(name, variant_dirs[name], Qwen3_5Reference)
    return _CASES[name]


# --- in process -------------------------------------------------------------------------------


def test_spec(case: Case) -> None:
    assert type(case.family).__name__ == "ColQwen3_5Family"
    spec = case.family.spec()
    assert spec.architecture == "ColQwen3_5" and spec.token_dim == DIM
    assert spec.tasks == TOKEN_EMBED and spec.modalities == {Modality.TEXT, Modality.IMAGE}
    assert spec.max_model_len == 262144
    assert family_for(load_source(str(case.path), max_model_len=4096)).spec().max_model_len == 4096


def test_prompt_ids_and_image_cost_match_the_reference(case: Case) -> None:
    for parts in INPUTS:
        seq = case.processor.encode(as_item(parts), EncodeOptions(), "input")
        ids, _ = case.reference.prompt(parts)
        assert list(seq.ids) == ids and seq.prompt_tokens == len(ids)
        assert len(seq.media) == sum(isinstance(p, bytes) for p in parts)
        for payload in seq.media:
            assert set(seq.ids[payload.offset : payload.offset + payload.length]) == {token_id("<|image_pad|>")}
            grid = payload.array("grid_thw").to_numpy()
            assert payload.cost == int(np.prod(grid)) == payload.array("pixel_values").shape[0]  # batch budget


def test_token_vectors_and_maxsim_match_the_reference_in_a_padded_batch(case: Case) -> None:
    ours, worst, worst_rel = check_padded_batch(case)
    print(f"colqwen3.5 {case.name}: worst cosine {worst:.8f}, worst MaxSim rel {worst_rel:.2e}")
    for vectors in ours:
        assert vectors.dtype == np.float32 and vectors.shape[1] == DIM
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), 1.0, atol=1e-5)


def test_unnormalized_vectors_include_the_projection_bias(case: Case) -> None:
    (ours,) = case.embed([as_item(INPUTS[3])], normalize=False)
    expected = case.reference.vectors(INPUTS[3], normalize=False)
    # Float32 summation order (oneDNN GEMMs for transformers' MKL linears and Conv3d, each as close to a
    # float64 result as the original) moves single elements of these random-weight vectors by up to ~3e-4.
    np.testing.assert_allclose(ours, expected, rtol=1e-3, atol=1e-3)
    bias = load_file(str(case.path / "model.safetensors"))["custom_text_proj.bias"].numpy()
    without = expected - bias  # the bias is a real part of every vector, not a rounding detail
    assert np.abs(ours - without).max() > 0.1


def test_a_batch_of_different_lengths_gives_the_single_item_results(case: Case) -> None:
    """Right padding: the gated delta-net layers are zero-fed and causal, the full-attention layers mask pads."""
    alone = [case.embed([as_item(p)])[0] for p in INPUTS]
    order = [5, 0, 3, 1, 6, 2, 4]  # longest first, shortest in the middle
    batched = case.embed([as_item(INPUTS[k]) for k in order])
    worst = 0.0
    for k, vectors in zip(order, batched, strict=True):
        assert vectors.shape == alone[k].shape
        worst = max(worst, float(np.abs(vectors - alone[k]).max()))
    print(f"colqwen3.5 {case.name}: batch vs single max abs diff {worst:.2e}")
    assert worst < 1e-5


def test_chat_with_an_image_matches_the_reference_template(case: Case) -> None:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    chat = ChatItem((ChatMessage("user", (ImagePart(data_url(IMAGES["jpeg"])), TextPart("Describe the image."))),))
    seq = case.processor.encode(case.processor.render(chat), EncodeOptions(add_special_tokens=False), "input")
    ids, images = case.reference.chat_ids(messages, [IMAGES["jpeg"]])
    assert list(seq.ids) == ids
    (ours,) = [o[Task.TOKEN_EMBED] for o in case.runner.forward([WorkItem(seq, TOKEN_EMBED)])]
    check_close(ours, case.reference.vectors_for(ids, images))


def test_attention_direction(case: Case) -> None:
    """is_causal false: a later token changes an earlier token's vector (through the full-attention layers);
    is_causal true: it does not (and neither do the always-causal gated delta-net layers)."""
    a, b = case.embed([TextItem("The capital of France is Paris."), TextItem("The capital of France is Rome.")])
    n = 4  # "The capital of France" tokens are shared
    if case.name == "bidirectional":
        assert not np.allclose(a[:n], b[:n], atol=1e-3)
    else:
        np.testing.assert_allclose(a[:n], b[:n], atol=1e-5)


def test_bfloat16_stays_close_to_float32(case: Case) -> None:
    """bf16 backbone (the delta rule itself runs in float32 inside transformers), float32 head. The tiny random
    model is more sensitive than real weights: measured worst cosine 0.989 (an image token), MaxSim off by at
    most 0.007 per query token (relative 1.6 %); transformers' own Qwen3_5Model in bf16 is as far (0.987)."""
    worst, per_token, rel = bfloat16_errors(case)
    print(f"colqwen3.5 {case.name} bf16: worst cosine {worst:.5f}, MaxSim error {per_token:.4f}/token (rel {rel:.2e})")
    assert worst > 0.98 and per_token < 0.02


# --- loading ----------------------------------------------------------------------------------


def _prefix_all(prefix: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(state: dict[str, torch.Tensor]) -> None:
        for name in [k for k in state if k.startswith(("visual.", "language_model."))]:
            state[prefix + name] = state.pop(name)

    return edit


@pytest.mark.parametrize(
    ("edit", "overrides", "named"),
    [
        (lambda s: s.pop("language_model.layers.0.linear_attn.A_log"), {}, r"layers\.0\.linear_attn\.A_log"),
        (lambda s: s.pop("language_model.layers.1.self_attn.q_norm.weight"), {}, r"layers\.1\.self_attn\.q_norm"),
        (lambda s: s.update({"visual.extra": torch.zeros(2)}), {}, r"visual\.extra"),
        (lambda s: s.update({"visual.deepstack_merger_list.0.norm.weight": torch.zeros(128)}), {}, r"deepstack"),
        (_prefix_all("model."), {}, r"model\.language_model\.layers\.0\.linear_attn"),
        (lambda s: s.pop("custom_text_proj.weight"), {}, r"custom_text_proj\.weight"),
        (lambda s: None, {"dim": 16}, r"custom_text_proj\.weight.*\[16, 64\]"),
    ],
    ids=["missing-linear", "missing-full", "unexpected", "deepstack", "model-prefix", "no-projection", "dim"],
)
def test_wrong_layouts_fail_naming_the_weights(
    tmp_path: Path, edit: Callable[[dict[str, torch.Tensor]], None], overrides: dict[str, Any], named: str
) -> None:
    path = write_colqwen3_5(tmp_path / "bad")
    rewrite_weights(path, edit)
    with pytest.raises(ModelLoadError, match=named):
        family_for(load_source(str(path), hf_overrides=overrides)).runner("cpu", "float32")


def test_layer_types_that_do_not_match_the_weights_fail_naming_them(tmp_path: Path) -> None:
    path = write_colqwen3_5(tmp_path / "swapped")
    config = json.loads((path / "config.json").read_text())
    text = {**config["text_config"], "layer_types": ["full_attention", "linear_attention"] * 2}
    with pytest.raises(ModelLoadError, match=r"missing weights.*layers\.0\.self_attn\.q_proj.*layers\.1\.linear_attn"):
        family_for(load_source(str(path), hf_overrides={"text_config": text})).runner("cpu", "float32")


def test_mtp_and_lm_head_are_skipped_and_dim_comes_from_the_weight(tmp_path: Path) -> None:
    path = write_colqwen3_5(tmp_path / "extra", mtp=True)
    rewrite_weights(path, lambda s: s.update({"lm_head.weight": torch.zeros(4, TEXT_HIDDEN)}))
    family = family_for(load_source(str(path), hf_overrides={"dim": None}))
    assert family.spec().token_dim == DIM
    family.runner("cpu", "float32")


def test_a_qwen3_vl_checkpoint_declared_colqwen3_5_fails(tmp_path: Path) -> None:
    from tests.fixtures.colqwen3 import write_ops_colqwen3

    path = write_ops_colqwen3(tmp_path / "ops")
    overrides = {"architectures": ["ColQwen3_5"], "dims": None}  # projection dim from the weight
    with pytest.raises(ModelLoadError, match=r"linear_attn.*deepstack_merger_list|deepstack_merger_list.*linear_attn"):
        family_for(load_source(str(path), hf_overrides=overrides)).runner("cpu", "float32")


# --- live server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(variant_dirs: dict[str, Path]) -> Iterator[LiveServer]:
    """Started as the reference doc's `vllm serve athrael-soju/colqwen3.5-4.5B --max-model-len 4096`, on the tiny
    checkpoint under the Hub model's name."""
    args = ["serve", str(variant_dirs["bidirectional"]), "--served-model-name", HUB_NAME, "--max-model-len", "4096"]
    config = config_from_args(build_parser().parse_args([*args, "--workers", "1", "--threads-per-worker", "1"]))
    assert config.max_model_len == 4096 and config.served_model_name == HUB_NAME
    with LiveServer(config) as server:
        yield server


@pytest.fixture(scope="module")
def reference(variant_dirs: dict[str, Path]) -> Qwen3VLReference:
    cached = _CASES.get("bidirectional")
    return cached.reference if cached else Qwen3_5Reference(variant_dirs["bidirectional"])


def test_http_pooling_input_and_messages(live: LiveServer, reference: Qwen3VLReference) -> None:
    check_http_pooling(live, reference, HUB_NAME)


def test_http_rerank_with_image_documents(live: LiveServer, reference: Qwen3VLReference) -> None:
    check_http_rerank(live, reference)


def test_http_score_with_content_lists(live: LiveServer, reference: Qwen3VLReference) -> None:
    check_http_score(live, reference)


def test_grpc_pool_and_rerank_with_image_parts(live: LiveServer, reference: Qwen3VLReference) -> None:
    check_grpc_pool_and_rerank(live, reference)


# The reference doc's ColQwen3.5 section, verbatim (only the host:port is the live server's).
DOC_RERANK = """curl -s http://localhost:8000/rerank -H "Content-Type: application/json" -d '{ "model": "athrael-soju/colqwen3.5-4.5B", "query": "What is machine learning?", "documents": [ "Machine learning is a subset of artificial intelligence.", "Python is a programming language.", "Deep learning uses neural networks." ] }'"""  # noqa: E501
DOC_SCORE = """curl -s http://localhost:8000/score -H "Content-Type: application/json" -d '{ "model": "athrael-soju/colqwen3.5-4.5B", "text_1": "What is the capital of France?", "text_2": ["The capital of France is Paris.", "Python is a programming language."] }'"""  # noqa: E501


def _curl(live: LiveServer, command: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Runs the doc's curl against the live server; (request body, response)."""
    argv = shlex.split(command.replace("http://localhost:8000", live.http_url))
    done = subprocess.run([*argv, "-w", "\n%{http_code}"], capture_output=True, text=True, timeout=120, check=True)
    text, _, code = done.stdout.rpartition("\n")
    assert code == "200", done.stdout
    return json.loads(argv[argv.index("-d") + 1]), json.loads(text)


def test_reference_doc_commands(live: LiveServer, reference: Qwen3VLReference) -> None:
    request, body = _curl(live, DOC_RERANK)
    assert body["model"] == HUB_NAME and body["id"].startswith("score-")
    q = reference.vectors([request["query"]])
    expected = [maxsim(q, reference.vectors([d])) for d in request["documents"]]
    assert [r["index"] for r in body["results"]] == sorted(range(3), key=lambda i: -expected[i])
    for result in body["results"]:
        assert result["document"]["text"] == request["documents"][result["index"]]
        check_maxsim(result["relevance_score"], expected[result["index"]])

    request, body = _curl(live, DOC_SCORE)
    assert body["model"] == HUB_NAME and body["object"] == "list"
    q = reference.vectors([request["text_1"]])
    for k, item in enumerate(body["data"]):
        assert item["index"] == k
        check_maxsim(item["score"], maxsim(q, reference.vectors([request["text_2"][k]])))
