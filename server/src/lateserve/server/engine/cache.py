"""Document-embedding cache: repeated documents in /rerank and /score skip their forward pass.

Keyed by (model, a hash of the exact prepared input: token ids, mask, kept rows, segment ids and the
content digest and placement of every media payload; the tasks, normalisation and activation), so two
inputs share an entry only when the model would see the same thing. Two images with the same grid
have identical placeholder ids; their digests differ.
Bounded by bytes of stored arrays; least recently used entries go first. Single-threaded: only
the event loop touches it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from lateserve.server import metrics
from lateserve.server.domain import ItemOutputs, WorkItem


def cache_key(model: str, item: WorkItem) -> bytes:
    """Content hash of everything that determines an item's outputs."""
    seq = item.sequence
    h = hashlib.blake2b(digest_size=20)
    for part in (
        model,
        ",".join(map(str, seq.ids)),
        ",".join(map(str, seq.attention_mask or ())),
        ",".join(map(str, seq.keep)) if seq.keep is not None else "*",
        ",".join(map(str, seq.token_type_ids)) if seq.token_type_ids is not None else "*",
        ";".join(f"{m.modality}:{m.offset}:{m.length}:{m.digest.hex()}" for m in seq.media),
        ",".join(sorted(t.value for t in item.tasks)),
        "n" if item.normalize else "u",
        "a" if item.activation else "r",
    ):
        h.update(part.encode())
        h.update(b"\x00")
    return h.digest()


class DocumentCache:
    """LRU of item outputs under a byte budget (0 disables)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[bytes, tuple[ItemOutputs, int]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> ItemOutputs | None:
        hit = self._entries.get(key)
        if hit is None:
            metrics.CACHE_MISSES.inc()
            return None
        self._entries.move_to_end(key)
        metrics.CACHE_HITS.inc()
        return hit[0]

    def put(self, key: bytes, outputs: ItemOutputs) -> None:
        size = sum(int(a.nbytes) for a in outputs.values())
        if size > self.max_bytes or key in self._entries:
            return
        for array in outputs.values():
            array.setflags(write=False)  # shared between requests from now on
        self._entries[key] = (outputs, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, old) = self._entries.popitem(last=False)
            self.bytes -= old
        metrics.CACHE_BYTES.set(self.bytes)
