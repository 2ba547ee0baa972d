"""Draw where a page matches a query: lateserve's similarity maps as a heatmap over the page image.

    python examples/similarity_map.py --url http://localhost:8000 --image page.png \
        --query "Which year had the highest revenue?" --out heatmap.png [--token revenue]

Sends the page as a data: URL to /score with `return_similarity_maps`, takes the map of one query token
(--token, matched against the query's token strings; by default the map of the tokens' maximum, the
best match of any query token for each region), stretches it over the page and blends it in as a
red overlay. Needs only numpy and Pillow.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def score_with_maps(url: str, image: Image.Image, query: str, model: str | None = None) -> dict[str, Any]:
    """The /score answer for one (query, page) pair, with similarity maps."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    page = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    body: dict[str, Any] = {
        "queries": query,
        "documents": [{"content": [{"type": "image_url", "image_url": {"url": page}}]}],
        "return_similarity_maps": True,
    }
    if model:
        body["model"] = model
    request = urllib.request.Request(
        url.rstrip("/") + "/score", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def pick(similarity_map: dict[str, Any], token: str | None) -> np.ndarray:
    """One (height, width) grid: the named query token's, else the maximum over the query's tokens."""
    data = np.asarray(similarity_map["data"], dtype=np.float32)
    if token is None:
        return data.max(axis=0)
    tokens = [t.lstrip("Ġ▁#").lower() for t in similarity_map["query_tokens"]]
    if token.lower() not in tokens:
        raise SystemExit(f"token {token!r} is not among the query's tokens: {similarity_map['query_tokens']}")
    return data[tokens.index(token.lower())]


def overlay(image: Image.Image, grid: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """The grid, scaled to [0, 1] and stretched over the page, blended in as red."""
    low, high = float(grid.min()), float(grid.max())
    scaled = (grid - low) / (high - low) if high > low else np.zeros_like(grid)
    heat = Image.fromarray((scaled * 255).astype(np.uint8), mode="L").resize(image.size, Image.Resampling.BICUBIC)
    red = Image.new("RGB", image.size, (255, 0, 0))
    mask = heat.point(lambda v: int(v * alpha))
    return Image.composite(red, image.convert("RGB"), mask)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://localhost:8000")
    parser.add_argument("--model", default=None)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--query", required=True)
    parser.add_argument("--token", default=None, help="one query token's map (default: the max over tokens)")
    parser.add_argument("--out", type=Path, default=Path("heatmap.png"))
    args = parser.parse_args(argv)
    image = Image.open(args.image).convert("RGB")
    answer = score_with_maps(args.url, image, args.query, args.model)
    result = answer["data"][0]
    maps = result.get("similarity_maps") or []
    if not maps:
        raise SystemExit("the server returned no similarity map (is it a late-interaction vision model?)")
    overlay(image, pick(maps[0], args.token)).save(args.out)
    print(f"score {result['score']:.4f}; map {maps[0]['height']}x{maps[0]['width']} -> {args.out}")
    return Path(args.out)


if __name__ == "__main__":
    main()
