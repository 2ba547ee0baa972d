"""Independent reference for Jina XLM-RoBERTa ColBERT checkpoints (jina-colbert-v2 layout) under
vLLM's raw semantics: tokenizer defaults -> transformers' JinaEmbeddingsV3Model last_hidden_state ->
`linear.weight` (no bias) -> L2 normalise -> MaxSim.

Shares no code with lateserve: the weights are renamed by transformers' own conversion mapping for
`jina_embeddings_v3` (emb_ln, encoder.layers, mixer.Wqkv, ...) inside `from_pretrained`, not by the
family's rename table, and attention runs eager rather than sdpa. What it cannot show: that
transformers' port matches Jina's remote flash implementation numerically (that code is not
shipped, so that comparison is impossible offline).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoTokenizer, JinaEmbeddingsV3Config, JinaEmbeddingsV3Model


class JinaColbertReference:
    def __init__(self, path: Path) -> None:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
        config = JinaEmbeddingsV3Config(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            intermediate_size=raw["intermediate_size"],
            hidden_act=raw["hidden_act"],
            max_position_embeddings=raw["max_position_embeddings"],
            type_vocab_size=raw["type_vocab_size"],
            layer_norm_eps=raw["layer_norm_eps"],
            pad_token_id=raw["pad_token_id"],
            rope_parameters={"rope_type": "default", "rope_theta": float(raw["rotary_emb_base"])},
        )
        model, info = JinaEmbeddingsV3Model.from_pretrained(
            str(path), config=config, output_loading_info=True, attn_implementation="eager"
        )
        # Everything but the ColBERT head must load (the pooler loads into the pooler, unused).
        assert not info["missing_keys"] and not info["mismatched_keys"], info
        assert set(info["unexpected_keys"]) == {"linear.weight"}, info
        self.model = model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
            self.linear = fh.get_tensor("linear.weight").float()

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def num_tokens(self, text: str) -> int:
        return len(self.ids(text))

    def token_embed(self, text: str) -> np.ndarray:
        """One text alone (no padding): [n_tokens, dim] unit vectors, float32."""
        return self.embed_ids(self.ids(text))

    @torch.inference_mode()
    def embed_ids(self, ids: list[int], attention_mask: list[int] | None = None) -> np.ndarray:
        """Token ids as given (one sequence, no padding) -> [n_tokens, dim] unit vectors."""
        batch = torch.tensor([ids])
        mask = torch.tensor([attention_mask]) if attention_mask is not None else torch.ones_like(batch)
        hidden = self.model(input_ids=batch, attention_mask=mask).last_hidden_state[0].float()
        return F.normalize(F.linear(hidden, self.linear), p=2, dim=-1).numpy()

    def maxsim(self, query: str, document: str) -> float:
        q, d = self.token_embed(query), self.token_embed(document)
        return float((q @ d.T).max(axis=1).sum())
