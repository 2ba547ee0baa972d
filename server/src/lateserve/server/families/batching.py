"""Shared runner plumbing: right-padded id/mask tensors for a batch, and the token-embed runner
whose forward (pad, embed, slice each row back, apply the skiplist, normalise) every ColBERT
backbone shares. torch is imported inside the functions: family modules (and so this one) are
imported by the server process, which only tokenizes."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import numpy as np

from lateserve.server.domain import ItemOutputs, Task, UnsupportedTask, WorkItem
from lateserve.server.families.base import ModelRunner

if TYPE_CHECKING:
    import torch


def pad_batch(batch: Seq[WorkItem], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """[batch, width] ids and attention mask (right padding) plus each row's length."""
    import torch

    lengths = [item.sequence.num_tokens for item in batch]
    width = max(lengths, default=0)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        seq = item.sequence
        ids[row, : len(seq.ids)] = torch.tensor(seq.ids, dtype=torch.long)
        mask[row, : len(seq.ids)] = torch.tensor(seq.attention_mask or [1] * len(seq.ids), dtype=torch.long)
    return ids, mask, lengths


class TokenEmbedRunner(ModelRunner):
    """A replica whose one task is token_embed; subclasses supply `_embed` and set device/pad_id/dim."""

    device: torch.device
    pad_id: int
    dim: int

    @abstractmethod
    def _embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[batch, width] ids -> [batch, width, dim] float32 token vectors, not yet normalised."""

    def forward(self, batch: Seq[WorkItem]) -> list[ItemOutputs]:
        import torch
        import torch.nn.functional as F

        for item in batch:
            if item.tasks - {Task.TOKEN_EMBED}:
                raise UnsupportedTask(f"this model only computes token_embed, not {sorted(item.tasks)}")
        if not batch:
            return []
        ids, mask, lengths = pad_batch(batch, self.pad_id)
        with torch.inference_mode():
            vectors = self._embed(ids.to(self.device), mask.to(self.device)) if ids.shape[1] else None
            outputs: list[ItemOutputs] = []
            for row, item in enumerate(batch):
                rows = vectors[row, : lengths[row]] if vectors is not None else torch.zeros((0, self.dim))
                if item.sequence.keep is not None:
                    rows = rows[list(item.sequence.keep)]
                if item.normalize:
                    rows = F.normalize(rows, p=2, dim=-1)
                outputs.append({Task.TOKEN_EMBED: np.array(rows.cpu().numpy(), dtype=np.float32)})
        return outputs
