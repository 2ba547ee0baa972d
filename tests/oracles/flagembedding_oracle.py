"""FlagEmbedding 1.4.2 reference for BGE-M3; runs in .refs/flagembedding (tools/oracles/flagembedding.sh).

Standalone: no lateserve import. Usage: `python flagembedding_oracle.py REQUEST.json OUT.npz`.

Request: {"model_dir": str, "queries": [str], "documents": [str], "pairs": [[query, document]],
"weights": [dense, sparse, colbert]}.

Writes, for side in (query, document) with texts in request order:
  {side}_dense       [n, H]      BGEM3FlagModel.encode dense vectors
  {side}_colbert     [rows, H]   colbert vectors of every text, concatenated
  {side}_colbert_len [n]         rows per text
  {side}_lex_ids     [m]         lexical weights as parallel arrays (dict order), concatenated
  {side}_lex_weights [m]
  {side}_lex_tokens  [m]         vocabulary strings of the ids (convert_ids_to_tokens)
  {side}_lex_len     [n]         entries per text
and lexical_scores / colbert_scores / dense_scores [n_queries, n_documents] from
compute_lexical_matching_score, colbert_score and dense dot products, plus compute_score on
`pairs` with `weights`: score_dense, score_sparse, score_colbert, score_sparse_dense,
score_weighted ("colbert+sparse+dense"). compute_score runs with batch_size=1: batched, it pads
passages with zero colbert vectors that take part in the max (a batching artefact).
"""

from __future__ import annotations

import json
import sys

import numpy as np
from FlagEmbedding import BGEM3FlagModel


def main(request_file: str, out_file: str) -> None:
    with open(request_file, encoding="utf-8") as fh:
        request = json.load(fh)
    model = BGEM3FlagModel(request["model_dir"], use_fp16=False, devices="cpu")
    out: dict[str, np.ndarray] = {}
    encoded = {}
    for side, texts in (("query", request["queries"]), ("document", request["documents"])):
        enc = model.encode(texts, return_dense=True, return_sparse=True, return_colbert_vecs=True)
        encoded[side] = enc
        out[f"{side}_dense"] = np.asarray(enc["dense_vecs"], dtype=np.float32).reshape(len(texts), -1)
        colbert = [np.asarray(v, dtype=np.float32) for v in enc["colbert_vecs"]]
        out[f"{side}_colbert"] = np.concatenate(colbert, axis=0)
        out[f"{side}_colbert_len"] = np.array([len(v) for v in colbert], dtype=np.int64)
        ids, weights, lengths = [], [], []
        for lw in enc["lexical_weights"]:
            ids += [int(k) for k in lw]
            weights += [float(v) for v in lw.values()]
            lengths.append(len(lw))
        out[f"{side}_lex_ids"] = np.array(ids, dtype=np.int64)
        out[f"{side}_lex_weights"] = np.array(weights, dtype=np.float32)
        out[f"{side}_lex_tokens"] = np.array(model.tokenizer.convert_ids_to_tokens(ids) or [""], dtype=str)[: len(ids)]
        out[f"{side}_lex_len"] = np.array(lengths, dtype=np.int64)
    q, d = encoded["query"], encoded["document"]
    out["lexical_scores"] = np.array(
        model.compute_lexical_matching_score(list(q["lexical_weights"]), list(d["lexical_weights"])), dtype=np.float64
    )
    out["colbert_scores"] = np.array(
        [[float(model.colbert_score(qv, dv)) for dv in d["colbert_vecs"]] for qv in q["colbert_vecs"]],
        dtype=np.float64,
    )
    out["dense_scores"] = (out["query_dense"] @ out["document_dense"].T).astype(np.float64)
    pairs = [tuple(p) for p in request["pairs"]]
    scores = model.compute_score(pairs, batch_size=1, weights_for_different_modes=list(request["weights"]))
    for key, name in (
        ("dense", "score_dense"),
        ("sparse", "score_sparse"),
        ("colbert", "score_colbert"),
        ("sparse+dense", "score_sparse_dense"),
        ("colbert+sparse+dense", "score_weighted"),
    ):
        out[name] = np.array(scores[key], dtype=np.float64)
    np.savez(out_file, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
