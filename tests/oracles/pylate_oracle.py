"""PyLate 1.6.0 oracle: query and document token embeddings of ColBERT checkpoints, plus MaxSim.

Runs inside .refs/pylate (tools/oracles/pylate.sh), never imports lateserve.
Usage: python pylate_oracle.py REQUEST.json OUT.npz

Request: {"models": {"<key>": "<model_dir>", ...}, "queries": [...], "documents": [...]}
(a single {"model_dir": ...} is accepted as the key "model"). Output arrays, per key:
  <key>/query/<i>, <key>/document/<j>   float32 [rows, dim], as ColBERT.encode returns them
  <key>/query_ids/<i>, <key>/document_ids/<j>   the token ids PyLate fed the model
  <key>/scores   float32 [n_queries, n_documents], pylate.scores.colbert_scores of each pair
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from pylate import models, scores


def main(request_path: str, out_path: str) -> None:
    with open(request_path, encoding="utf-8") as fh:
        request = json.load(fh)
    model_dirs = request.get("models") or {"model": request["model_dir"]}
    queries, documents = request["queries"], request["documents"]
    torch.manual_seed(0)
    arrays: dict[str, np.ndarray] = {}
    for key, model_dir in model_dirs.items():
        model = models.ColBERT(model_name_or_path=model_dir, device="cpu")
        # Queries go in one batch of at least two: with transformers 5.3, LFM2 zeroes masked (expansion)
        # positions before its convolutions only in batches of more than one row, and batched encoding
        # is what PyLate users (and transformers >= 5.x for any batch) get.
        batch = queries if len(queries) > 1 else queries * 2
        q = model.encode(batch, is_query=True, batch_size=len(batch), convert_to_numpy=True)[: len(queries)]
        d = model.encode(documents, is_query=False, batch_size=len(documents), convert_to_numpy=True)
        for i, emb in enumerate(q):
            arrays[f"{key}/query/{i}"] = np.asarray(emb, dtype=np.float32)
        for j, emb in enumerate(d):
            arrays[f"{key}/document/{j}"] = np.asarray(emb, dtype=np.float32)
        for kind, texts, is_query in (("query_ids", queries, True), ("document_ids", documents, False)):
            for i, text in enumerate(texts):
                arrays[f"{key}/{kind}/{i}"] = model.tokenize([text], is_query=is_query)["input_ids"][0].numpy()
        # One pair at a time: lists of unequal lengths would be zero-padded, and a zero row can win a max.
        matrix = [
            [float(scores.colbert_scores(torch.from_numpy(qi)[None], torch.from_numpy(dj)[None])[0, 0]) for dj in d]
            for qi in q
        ]
        arrays[f"{key}/scores"] = np.asarray(matrix, dtype=np.float32)
        arrays[f"{key}/vocab_size"] = np.asarray(len(model.tokenizer))
    np.savez(out_path, **arrays)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
