"""Core lending on CPU: what `--lend-cores-min-ms` (idle workers lend their cores to a lone long batch) does
to latency and throughput, against the same layout without it and against one replica with all the cores.

Three lateserve servers on the bundled all-MiniLM-L6-v2 (late interaction), pinned to the same cores and
running side by side, take turns chunk by chunk (each chunk starts from a quiet machine):
  lend  : the default, 2 single-threaded workers, lending on (100 ms);
  nolend: 2 single-threaded workers, `--lend-cores-min-ms -1` (the layout before lending);
  1x2   : `--workers 1`, one replica with both threads.
Mixes: one ~400-token /pooling input at concurrency 1 (a lone long input: the case lending is for),
/rerank 1 query x 20 documents at concurrency 1 (split over the workers, never lent), and /pooling of one
short text at concurrency 8 (many small batches: throughput must not drop).

    .venv/bin/python bench/bench_lending.py --rounds 6 --out .bench/lending.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench_serving import ROOT, ServerProcess, Workload, free_port, percentile, pinned, wait_idle

LAYOUTS: dict[str, list[str]] = {
    "lend": ["--workers", "2", "--threads-per-worker", "1"],
    "nolend": ["--workers", "2", "--threads-per-worker", "1", "--lend-cores-min-ms", "-1"],
    "1x2": ["--workers", "1", "--threads-per-worker", "2"],
}


def post(url: str, path: str, body: dict[str, Any]) -> float:
    """Seconds for one request (raises on a non-200)."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()
    return time.perf_counter() - start


@contextlib.contextmanager
def server(name: str, args: argparse.Namespace) -> Iterator[str]:
    port, grpc_port = free_port(), free_port()
    cmd = [
        str(ROOT / ".venv/bin/lateserve"), "serve", "--host", "127.0.0.1", "--port", str(port),
        "--grpc-host", "127.0.0.1", "--grpc-port", str(grpc_port), "--dtype", args.dtype, *LAYOUTS[name],
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process = ServerProcess(name, pinned(cmd, args.cores), env, args.log_dir / f"lending-{name}.log")
    try:
        process.wait_http(f"http://127.0.0.1:{port}/health", 300)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop()


def mixes(workload: Workload) -> dict[str, tuple[int, Callable[[int], tuple[str, dict[str, Any]]]]]:
    """name -> (concurrency, request n -> (route, body))."""
    long_text = " ".join(workload.documents[:6])  # ~400 tokens of model-card words
    return {
        "pool 1 long input c=1": (1, lambda n: ("/pooling", {"input": f"{long_text} {n}", "task": "token_embed"})),
        "rerank 1x20 c=1": (
            1,
            lambda n: ("/rerank", {"query": workload.query(n), "documents": workload.cold_documents()}),
        ),
        "pool 1 short text c=8": (
            8,
            lambda n: ("/pooling", {"input": workload.query(n), "task": "token_embed"}),
        ),
    }


def lent_batches(url: str) -> float:
    """lateserve_lent_core_batches_total of a server: whether lending happened in a mix at all."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("lateserve_lent_core_batches_total "):
                return float(line.split()[1])
    return 0.0


def chunk(url: str, concurrency: int, make: Callable[[int], tuple[str, dict[str, Any]]], n: int, start: int) -> Any:
    def one(i: int) -> float:
        route, body = make(start + i)
        return post(url, route, body)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as executor:
        latencies = list(executor.map(one, range(n)))
    return latencies, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cores", default="0-1")
    parser.add_argument("--requests", type=int, default=24, help="per chunk")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mixes", default="", help="comma-separated substrings of mix names (default: all)")
    parser.add_argument("--log-dir", type=Path, default=ROOT / ".bench" / "logs")
    parser.add_argument("--out", type=Path, default=ROOT / ".bench" / "lending.json")
    args = parser.parse_args()
    workload = Workload()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(server(name, args)) for name in LAYOUTS}
        for mix, (concurrency, make) in mixes(workload).items():
            if args.mixes and not any(m in mix for m in args.mixes.split(",")):
                continue
            for url in urls.values():  # warm-up: first batches, measured speed for the scheduler
                chunk(url, concurrency, make, 2 * concurrency, 10_000)
            for r in range(args.rounds):
                order = list(urls.items())
                for name, url in order[r % len(order) :] + order[: r % len(order)]:  # each layout goes first in turn
                    busy = wait_idle(10.0)
                    lent = lent_batches(url)
                    latencies, wall = chunk(url, concurrency, make, args.requests, r * args.requests)
                    cell = results.setdefault(mix, {}).setdefault(
                        name, {"latencies": [], "wall": 0.0, "busy": [], "lent_batches": 0.0}
                    )
                    cell["latencies"] += latencies
                    cell["wall"] += wall
                    cell["busy"].append(busy)
                    cell["lent_batches"] += lent_batches(url) - lent
            row = results[mix]
            for cell in row.values():
                cell["req_per_s"] = round(len(cell["latencies"]) / cell["wall"], 2)
                cell["p50_ms"] = round(statistics.median(cell["latencies"]) * 1e3, 1)
                cell["p99_ms"] = round(percentile(cell["latencies"], 99) * 1e3, 1)
            base = row["nolend"]
            print(f"{mix}:")
            for name, cell in row.items():
                print(
                    f"  {name:7s} {cell['req_per_s']:7.2f} req/s  p50 {cell['p50_ms']:7.1f} ms"
                    f"  p99 {cell['p99_ms']:7.1f} ms"
                    f"  req/s vs nolend {cell['req_per_s'] / base['req_per_s']:.2f}x"
                    f"  p50 vs nolend {cell['p50_ms'] / base['p50_ms']:.2f}x  lent batches {cell['lent_batches']:.0f}"
                    f"  busy before {cell['busy']}"
                )
    for row in results.values():
        for cell in row.values():
            del cell["latencies"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"dtype": args.dtype, "cores": args.cores, "results": results}, indent=2))


if __name__ == "__main__":
    main()
