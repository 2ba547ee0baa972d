"""Token pooling for index storage: fewer vectors per document, as colpali-engine's HierarchicalTokenPooler.

The rule (colpali-engine 0.3.18, `HierarchicalTokenPooler.pool_embeddings(..., pool_factor=k)`), implemented
here on numpy without scipy (scipy is not a server dependency):

* `pool_factor` 1 returns the vectors unchanged.
* Otherwise the n vectors are clustered into at most `max(n // pool_factor, 1)` clusters (floor, not ceil)
  by Ward-linkage agglomerative clustering. colpali hands scipy's `linkage(..., method="ward")` the whole
  n x n matrix `1 - E @ E.T` as *observations*, so the Ward criterion runs on the Euclidean distances
  between rows of the cosine-distance matrix (not on the cosine distances themselves); this module does
  the same. The tree is cut as scipy's `fcluster(criterion="maxclust")` cuts it: the smallest merge height
  that leaves at most that many clusters (ties in height can leave fewer).
* Each cluster's vectors are averaged and the mean L2-normalised (colpali always re-normalises; here only
  when the caller's vectors were normalised, see `pool_tokens`).
* Clusters come out in colpali's order, scipy's flat-cluster labels: a walk from the root of the dendrogram
  (children ordered by cluster id: leaves, then merges in height order) that descends into a node's merged
  children before it labels its leaf children.

The linkage is the nearest-neighbour-chain algorithm with the Lance-Williams update for Ward, O(n^2)
memory and O(n^2) time after the O(n^3) Gram product; ties resolve as scipy resolves them (the previous
chain element first, then the lowest index).
"""

from __future__ import annotations

import numpy as np

from lateserve.server.domain import Array, MediaPayload, Sequence


def _observation_distances(vectors: Array) -> np.ndarray:
    """Euclidean distances between rows of `1 - E @ E.T`, in float64 (colpali computes the similarities in
    float32, scipy the distances in float64)."""
    e = vectors.astype(np.float32, copy=False)
    observations = (1.0 - e @ e.T).astype(np.float64)
    squared = np.einsum("ij,ij->i", observations, observations)
    gram = observations @ observations.T
    d2 = squared[:, None] + squared[None, :] - 2.0 * gram
    np.maximum(d2, 0.0, out=d2)
    distances: np.ndarray = np.sqrt(d2)
    return distances


def _ward_merges(distances: np.ndarray) -> list[tuple[int, int, float]]:
    """Nearest-neighbour chain over an n x n distance matrix (modified in place): the n - 1 merges in the
    order found, each as (a, b, height) with a < b the slots merged; the union lives on in slot b (so it
    always contains leaf b) and slot a is retired."""
    n = distances.shape[0]
    d = distances
    np.fill_diagonal(d, np.inf)
    size = np.ones(n, dtype=np.float64)
    alive = np.ones(n, dtype=bool)
    merges: list[tuple[int, int, float]] = []
    chain: list[int] = []
    for _ in range(n - 1):
        if not chain:
            chain.append(int(np.argmax(alive)))
        while True:
            x = chain[-1]
            row = d[x]
            y = int(np.argmin(row))
            best = float(row[y])
            if len(chain) > 1:
                previous = chain[-2]
                if not best < float(row[previous]):
                    y, best = previous, float(row[previous])
                    break
            chain.append(y)
        chain.pop()
        chain.pop()
        a, b = (x, y) if x < y else (y, x)
        na, nb = size[a], size[b]
        merges.append((a, b, best))
        # Lance-Williams for Ward on every live cluster k: the distance to the union of a and b.
        others = alive.copy()
        others[a] = others[b] = False
        nk = size[others]
        total = na + nb + nk
        da, db = d[a, others], d[b, others]
        updated = np.sqrt(np.maximum(((na + nk) * da * da + (nb + nk) * db * db - nk * best * best) / total, 0.0))
        d[b, others] = updated
        d[others, b] = updated
        alive[a] = False
        d[a, :] = np.inf
        d[:, a] = np.inf
        size[b] = na + nb
        size[a] = 0
    return merges


def _flat_clusters(n: int, merges: list[tuple[int, int, float]], max_clusters: int) -> list[list[int]]:
    """The leaves of each flat cluster, in scipy's label order, cutting at the smallest height that leaves
    at most `max_clusters` clusters."""
    order = sorted(range(len(merges)), key=lambda i: merges[i][2])  # stable, as scipy's mergesort
    parent = list(range(2 * n - 1))

    def find(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    children: list[tuple[int, int]] = []
    heights: list[float] = []
    for i, k in enumerate(order):
        a, b, height = merges[k]
        ra, rb = find(a), find(b)
        node = n + i
        parent[ra] = parent[rb] = node
        children.append((min(ra, rb), max(ra, rb)))
        heights.append(height)
    # The largest height inside each subtree (equal to the node's own for a monotone linkage like Ward).
    highest = list(heights)
    for i, (left, right) in enumerate(children):
        for child in (left, right):
            if child >= n:
                highest[i] = max(highest[i], highest[child - n])
    cutoff = -np.inf if max_clusters >= n else sorted(highest)[n - max_clusters - 1]
    clusters: list[list[int]] = []
    stack: list[tuple[int, int | None]] = [(2 * n - 2, None)]  # (node, the flat cluster it belongs to)
    while stack:
        node, cluster = stack.pop()
        if node < n:
            if cluster is None:
                clusters.append([node])
            else:
                clusters[cluster].append(node)
            continue
        if cluster is None and highest[node - n] <= cutoff:
            clusters.append([])
            cluster = len(clusters) - 1
        # scipy's walk descends into the merged children (left, then right) before it labels the leaf
        # children (left, then right).
        visit = sorted(children[node - n], key=lambda child: child < n)
        stack.extend((child, cluster) for child in reversed(visit))
    return clusters


def cluster_tokens(vectors: Array, pool_factor: int) -> list[list[int]]:
    """Row indices of each pooled vector, in output order (see the module docstring)."""
    n = vectors.shape[0]
    if pool_factor < 1:
        raise ValueError("pool_factor must be >= 1")
    if pool_factor == 1 or n <= 1:
        return [[i] for i in range(n)]
    merges = _ward_merges(_observation_distances(vectors))
    return _flat_clusters(n, merges, max(n // pool_factor, 1))


def pool_tokens(vectors: Array, pool_factor: int, *, normalize: bool = True) -> Array:
    """colpali's HierarchicalTokenPooler on one document's [n, dim] vectors: the mean of each cluster,
    L2-normalised when `normalize` (the vectors were normalised; colpali's pooler always is). pool_factor 1
    returns the vectors as they are."""
    if pool_factor == 1 or vectors.shape[0] <= 1:
        return vectors
    rows = vectors.astype(np.float32, copy=False)
    pooled = np.stack([rows[members].mean(axis=0) for members in cluster_tokens(rows, pool_factor)])
    if normalize:
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return pooled.astype(vectors.dtype, copy=False)


def image_rows(sequence: Sequence, media: tuple[MediaPayload, ...] | None = None) -> np.ndarray:
    """Output rows of the sequence's image tokens (MediaPayload offset/length), through `keep` when the
    family returns a subset of the rows."""
    positions = np.zeros(sequence.num_tokens, dtype=bool)
    for payload in sequence.media if media is None else media:
        positions[payload.offset : payload.offset + payload.length] = True
    if sequence.keep is None:
        return np.flatnonzero(positions)
    keep = np.asarray(sequence.keep, dtype=np.int64)
    return np.flatnonzero(positions[keep])


def mask_non_image(vectors: Array, sequence: Sequence) -> Array:
    """colpali's mask_non_image_embeddings, returning only the image tokens' rows (colpali zeroes the others
    and keeps the shape). An input without images is returned unchanged, as colpali masks only when the
    batch has pixel values."""
    if not sequence.media:
        return vectors
    return vectors[image_rows(sequence)]
