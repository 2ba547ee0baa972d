"""colpali-engine 0.3.18 oracle: ColQwen3 / ColQwen3_5 query and document token embeddings, plus MaxSim.

Runs inside .refs/colpali (tools/oracles/colpali.sh), never imports lateserve.
Usage: python colpali_oracle.py REQUEST.json OUT.npz

Request:
  {"models": {"<key>": {"dir": "<model_dir>", "layout": "tomoro" | "ops" | "colqwen3_5",
                        "image_backend": "pil" (default) | "torchvision"}, ...},
   "queries": [...], "images": ["<png/jpeg path>", ...], "texts": [...]}

Per layout (reference/vl-families.md section 2, offline-models-and-oracles.md section 3):
* "tomoro": colpali's `ColQwen3` + `ColQwen3Processor` on the Tomoro layout through a key mapping
  (`vlm.model.` -> root, `embedding_proj_layer` -> `custom_text_proj`, `vlm.lm_head` unexpected). Tomoro's own
  processor strips each query, so queries are stripped before process_queries.
* "ops": the same classes on the OpenSearch layout, with OpenSearch's processor strings set on colpali's
  processor (query_prefix "Query: ", and `<|im_start|>assistant\\n` before the image prompt's final
  `<|endoftext|>`); the projection keeps its first `dims` rows, which is the reference's
  `proj(h)[..., :dims]` (Matryoshka) before the L2 norm.
* "colqwen3_5": `ColQwen3_5` + `ColQwen3_5Processor`, loaded as they are.
colpali's ColQwen3 hard-codes a 320-wide projection (the real Tomoro width); the tiny fixtures use other
widths so shape bugs fail, so the model class here sizes the projection from the checkpoint.

Output arrays, per key (float32 unless said):
  <key>/query/<i>, <key>/document/<j>, <key>/text/<k>   [rows, dim]: the embeddings at attention-mask-1 rows
      (process_queries, process_images, process_texts; one batch each, left padded as colpali pads)
  <key>/query_ids/<i>, <key>/document_ids/<j>, <key>/text_ids/<k>   int64: the ids colpali fed the model
  <key>/scores   [n_queries, n_images]: processor.score_multi_vector of each (query, image document) pair
  <key>/text_scores   [n_queries, n_texts]

Pooling mode (no model is loaded): {"pool": {"vectors": "<in.npz>", "pool_factors": [1, 2, 3]}} runs colpali's
`HierarchicalTokenPooler().pool_embeddings([E], pool_factor=k, return_dict=True)` on each float32 [n, dim]
array E of in.npz (keys are free-form names), one document at a time:
  pool/<name>/<k>          [clusters, dim] float32: the pooled vectors, in colpali's order
  pool/<name>/<k>/labels   [n] int64: the cluster (row of the pooled output) of each input row
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

OPS_QUERY_PREFIX = "Query: "
OPS_VISUAL_PROMPT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>"
    "<|im_start|>assistant\n<|endoftext|>"
)
TOMORO_KEYS = {r"^vlm\.model\.": "", r"^embedding_proj_layer": "custom_text_proj", r"^vlm\.lm_head": "lm_head"}
_TOKEN_IDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def _projection_shape(model_dir: Path) -> tuple[int, int]:
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if key.endswith(("custom_text_proj.weight", "embedding_proj_layer.weight")):
                rows, cols = f.get_slice(key).get_shape()
                return int(rows), int(cols)
    raise SystemExit(f"{model_dir}: no projection weight")


def load_colqwen3(model_dir: Path, layout: str, backend: str) -> tuple[Any, Any]:
    from colpali_engine.models import ColQwen3, ColQwen3Processor
    from transformers import Qwen3VLConfig

    raw = json.loads((model_dir / "config.json").read_text())
    config = Qwen3VLConfig(
        text_config=raw["text_config"],
        vision_config=raw["vision_config"],
        **{k: raw[k] for k in _TOKEN_IDS if k in raw},
    )
    rows, hidden = _projection_shape(model_dir)

    class SizedColQwen3(ColQwen3):  # colpali's class, with the checkpoint's projection width instead of 320
        def __init__(self, config: Any, **kwargs: Any) -> None:
            super().__init__(config, **kwargs)
            self.dim = rows
            self.custom_text_proj = torch.nn.Linear(hidden, rows)

    kwargs: dict[str, Any] = {"config": config, "dtype": torch.float32}
    if layout == "tomoro":
        kwargs["key_mapping"] = TOMORO_KEYS
    model = SizedColQwen3.from_pretrained(str(model_dir), **kwargs).eval()
    dims = int(raw.get("embed_dim") or raw.get("dims") or rows)
    if dims < rows:  # Ops: proj(h)[..., :dims] is the projection's first dims rows
        proj = model.custom_text_proj
        cut = torch.nn.Linear(hidden, dims)
        with torch.no_grad():
            cut.weight.copy_(proj.weight[:dims])
            cut.bias.copy_(proj.bias[:dims])
        model.custom_text_proj, model.dim = cut, dims
    processor = _processor(ColQwen3Processor, model_dir, backend)
    if layout == "ops":
        processor.query_prefix = OPS_QUERY_PREFIX
        processor.visual_prompt_prefix = OPS_VISUAL_PROMPT
    return model, processor


def load_colqwen3_5(model_dir: Path, backend: str) -> tuple[Any, Any]:
    from colpali_engine.models import ColQwen3_5, ColQwen3_5Processor

    model = ColQwen3_5.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return model, _processor(ColQwen3_5Processor, model_dir, backend)


def _processor(cls: Any, model_dir: Path, backend: str) -> Any:
    """colpali's processor from the checkpoint's tokenizer and preprocessor_config.json. Built from its parts
    because the Tomoro/Ops model types are unknown to transformers' video-processor lookup and the
    checkpoints ship no video processor config.

    `backend` "pil": transformers' Qwen2VLImageProcessorPil (what transformers uses without torchvision, and
    what lateserve's image preparation is bit-identical to); "torchvision": the class preprocessor_config.json
    names (Qwen2VLImageProcessorFast), colpali's default, whose antialiased resize differs from Pillow's by
    a few levels (reference/vl-families.md section 0.6)."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    if backend == "pil":
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(model_dir))
    else:
        image_processor = AutoImageProcessor.from_pretrained(str(model_dir), trust_remote_code=False)
    return cls(
        image_processor=image_processor,
        tokenizer=AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False),
        video_processor=Qwen3VLVideoProcessor(),
    )


def _rows(model: Any, batch: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Embeddings and ids at attention-mask-1 rows, per item."""
    with torch.inference_mode():
        out = model(**batch)
    mask = batch["attention_mask"].bool()
    vectors = [out[i][mask[i]].float().numpy() for i in range(out.shape[0])]
    ids = [batch["input_ids"][i][mask[i]].numpy().astype(np.int64) for i in range(out.shape[0])]
    return vectors, ids


def pool(spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """colpali's hierarchical token pooling of each array, per pool factor (see the module docstring)."""
    from colpali_engine.compression.token_pooling import HierarchicalTokenPooler

    pooler = HierarchicalTokenPooler()
    with np.load(spec["vectors"], allow_pickle=False) as data:
        inputs = {name: data[name].astype(np.float32) for name in data.files}
    for name, vectors in inputs.items():
        for factor in spec["pool_factors"]:
            out = pooler.pool_embeddings([torch.from_numpy(vectors)], pool_factor=int(factor), return_dict=True)
            pooled = out.pooled_embeddings[0].numpy()
            labels = np.full(vectors.shape[0], -1, dtype=np.int64)
            row = 0
            for cluster_id in sorted(out.cluster_id_to_indices[0]):
                members = out.cluster_id_to_indices[0][cluster_id][0].numpy()
                if members.size:
                    labels[members] = row
                    row += 1
            arrays[f"pool/{name}/{factor}"], arrays[f"pool/{name}/{factor}/labels"] = pooled, labels


def main(request_path: str, out_path: str) -> None:
    request = json.loads(Path(request_path).read_text(encoding="utf-8"))
    if "pool" in request:
        pooled: dict[str, np.ndarray] = {}
        pool(request["pool"], pooled)
        np.savez(out_path, **pooled)
        return
    queries: list[str] = request["queries"]
    images = [Image.open(p) for p in request.get("images", [])]
    for image in images:
        image.load()
    texts: list[str] = request.get("texts", [])
    torch.manual_seed(0)
    arrays: dict[str, np.ndarray] = {}
    for key, spec in request["models"].items():
        model_dir, layout, backend = Path(spec["dir"]), spec["layout"], spec.get("image_backend", "pil")
        if layout == "colqwen3_5":
            model, processor = load_colqwen3_5(model_dir, backend)
        else:
            model, processor = load_colqwen3(model_dir, layout, backend)
        asked = [q.strip() for q in queries] if layout == "tomoro" else queries
        q_vecs, q_ids = _rows(model, processor.process_queries(asked))
        for i, (v, ids) in enumerate(zip(q_vecs, q_ids, strict=True)):
            arrays[f"{key}/query/{i}"], arrays[f"{key}/query_ids/{i}"] = v, ids
        q_tensors = [torch.from_numpy(v) for v in q_vecs]
        for kind, inputs, process in (("document", images, processor.process_images), ("text", texts, None)):
            if not inputs:
                continue
            batch = process(inputs) if process is not None else processor.process_texts(inputs)
            vecs, ids_list = _rows(model, batch)
            for j, (v, ids) in enumerate(zip(vecs, ids_list, strict=True)):
                arrays[f"{key}/{kind}/{j}"], arrays[f"{key}/{kind}_ids/{j}"] = v, ids
            # One pair at a time: lists of unequal lengths are zero-padded, and a zero row can win a max.
            scores = [
                [float(processor.score_multi_vector([q], [torch.from_numpy(v)], device="cpu")[0, 0]) for v in vecs]
                for q in q_tensors
            ]
            arrays[f"{key}/{'scores' if kind == 'document' else 'text_scores'}"] = np.asarray(scores, np.float32)
    np.savez(out_path, **arrays)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
