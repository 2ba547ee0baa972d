"""Sentence-Transformers 6.2.0 oracle: SentenceTransformer.encode and CrossEncoder.predict.

Runs inside .refs/sentence_transformers (tools/oracles/sentence_transformers.sh), never imports lateserve.
Usage: python sentence_transformers_oracle.py REQUEST.json OUT.npz

Request: {"embed": {"<key>": "<model_dir>", ...}, "texts": [...],
          "cross": {"<key>": "<model_dir>", ...}, "pairs": [[query, document], ...]}
Output arrays, per key:
  embed/<key>            float32 [n_texts, dim]: SentenceTransformer(dir).encode(texts), the checkpoint's own
                         modules (its Normalize module, or none): what a user gets by default
  embed/<key>/normalized float32 [n_texts, dim]: encode(texts, normalize_embeddings=True)
  embed/<key>/tokens/<i> float32 [n_tokens, hidden]: encode(output_value="token_embeddings"), unnormalised
  embed/<key>/max_seq_length  the length the library truncates to
  cross/<key>            float32 [n_pairs]: CrossEncoder(dir).predict(pairs), the default activation
                         (Sigmoid for one label in 6.2.0 when the config names none)
  cross/<key>/raw        float32 [n_pairs]: predict(pairs, activation_fn=Identity()), the logits
  cross/<key>/activation the default activation's class name
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from sentence_transformers import CrossEncoder, SentenceTransformer


def main(request_path: str, out_path: str) -> None:
    with open(request_path, encoding="utf-8") as fh:
        request = json.load(fh)
    torch.manual_seed(0)
    arrays: dict[str, np.ndarray] = {}
    texts = request.get("texts", [])
    for key, model_dir in request.get("embed", {}).items():
        model = SentenceTransformer(model_dir, device="cpu")
        # batch_size 2 with texts of different lengths: padding inside a batch is exercised.
        arrays[f"embed/{key}"] = np.asarray(model.encode(texts, batch_size=2, convert_to_numpy=True), dtype=np.float32)
        arrays[f"embed/{key}/normalized"] = np.asarray(
            model.encode(texts, batch_size=2, convert_to_numpy=True, normalize_embeddings=True), dtype=np.float32
        )
        tokens = model.encode(texts, batch_size=1, output_value="token_embeddings")
        for i, matrix in enumerate(tokens):
            arrays[f"embed/{key}/tokens/{i}"] = np.asarray(matrix.float().numpy(), dtype=np.float32)
        arrays[f"embed/{key}/max_seq_length"] = np.asarray(model.max_seq_length)
    pairs = [tuple(p) for p in request.get("pairs", [])]
    for key, model_dir in request.get("cross", {}).items():
        model = CrossEncoder(model_dir, device="cpu")
        arrays[f"cross/{key}"] = np.asarray(model.predict(pairs, batch_size=2), dtype=np.float32)
        raw = model.predict(pairs, batch_size=2, activation_fn=torch.nn.Identity())
        arrays[f"cross/{key}/raw"] = np.asarray(raw, dtype=np.float32)
        arrays[f"cross/{key}/activation"] = np.asarray(type(model.activation_fn).__name__)
    np.savez(out_path, **arrays)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
