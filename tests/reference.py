"""Independent plain-transformers reference for BERT ColBERT checkpoints (vLLM's raw semantics):
tokenizer defaults -> BertModel last_hidden_state -> linear (no bias) -> L2 normalise -> MaxSim.
Shares no code with lateserve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoTokenizer, BertModel


class BertColbertReference:
    def __init__(self, path: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        self.model = BertModel.from_pretrained(str(path), add_pooling_layer=False).eval()
        self.linear: torch.Tensor | None = None
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            if "linear.weight" in f.keys():  # noqa: SIM118 - safe_open has no __contains__
                self.linear = f.get_tensor("linear.weight").float()

    @torch.inference_mode()
    def token_embed(self, text: str) -> np.ndarray:
        enc = self.tokenizer(text, return_tensors="pt")
        hidden = self.model(**enc).last_hidden_state[0].float()
        if self.linear is not None:
            hidden = F.linear(hidden, self.linear)
        return F.normalize(hidden, p=2, dim=-1).numpy()

    def maxsim(self, query: str, document: str) -> float:
        q, d = self.token_embed(query), self.token_embed(document)
        return float((q @ d.T).max(axis=1).sum())

    def num_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])
