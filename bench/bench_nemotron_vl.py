"""Llama-Nemotron-VL serving benchmark: cross-encoder /rerank (1 x 20 texts, 1 x 4 images) and /v1/embeddings of
image documents, lateserve over HTTP, and vLLM CPU 0.32 on the same checkpoints where it can load them.

Checkpoints: `bench/make_nemotron_vl_checkpoint.py` (random weights at 1b-v2 widths, 2 + 2 layers, in the
layouts of tests/fixtures/nemotron_vl.py), written on first use. Servers are started as the reference doc's
commands do (`--runner pooling --trust-remote-code --chat-template examples/.../nemotron-vl-rerank.jinja`,
`--trust-remote-code --chat-template examples/.../nemotron_embed_vl.jinja`), pinned to the same cores, one at
a time. Every image of every request is stamped with a unique bit pattern and every text document gets a unique
tag, so no cache sees an input twice. Before each measured chunk the script waits (up to --idle-wait s) for the
machine to go under 10 % busy and records the reading.

Mixes (pairs = query-document pairs scored, or items embedded):
  rerank-text   /rerank 1 query x 20 text documents (bench_serving's 32-62-word documents): 20 pairs
  rerank-image  /rerank 1 query x 4 image documents (scanned page, screenshot alternating): 4 pairs
  embed-image   /v1/embeddings, `messages` with one role-"document" message holding one image: 1 item

    .venv/bin/python bench/bench_nemotron_vl.py --with-vllm --out .bench/nemotron-vl.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
sys.path.insert(0, str(ROOT / "bench"))

from bench_serving import (  # noqa: E402
    HttpClient,
    ServerProcess,
    closed_loop,
    free_port,
    load_average,
    machine,
    percentile,
    pinned,
    wait_idle,
)
from bench_serving import Workload as TextWorkload  # noqa: E402
from bench_vision import Images, image_part  # noqa: E402

RERANK_TEMPLATE = "examples/pooling/score/template/nemotron-vl-rerank.jinja"
EMBED_TEMPLATE = "examples/pooling/embed/template/nemotron_embed_vl.jinja"
SERVED = {"rerank": "nemotron-rerank-bench", "embed": "nemotron-embed-bench"}
MIXES = {"rerank-text": ("rerank", 20), "rerank-image": ("rerank", 4), "embed-image": ("embed", 1)}


class Workload:
    def __init__(self) -> None:
        self.text = TextWorkload()
        self.images = Images()
        self.tag = 0

    def body(self, mix: str, target: int, n: int) -> dict[str, Any]:
        """Request n of `target` in `mix`: unique documents (a text tag or a stamped image)."""
        query = self.text.query(n)
        if mix == "rerank-text":
            return {"model": SERVED["rerank"], "query": query, "documents": self.text.cold_documents()}
        prefix = (target * 4 + list(MIXES).index(mix)) * 1_000_000 + n
        if mix == "rerank-image":
            docs = [{"content": [image_part(self.images.url(j, prefix * 16 + j))]} for j in range(4)]
            return {"model": SERVED["rerank"], "query": query, "documents": docs}
        url = self.images.url(n, prefix * 16)
        return {"model": SERVED["embed"], "messages": [{"role": "document", "content": [image_part(url)]}]}


@dataclass
class Result:
    target: str
    mix: str
    dtype: str
    concurrency: int
    pairs_per_request: int
    requests: int = 0
    errors: int = 0
    wall_s: float = 0.0
    pairs_s: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    prepare_p50_ms: float | None = None
    queue_p50_ms: float | None = None
    inference_p50_ms: float | None = None
    prompt_tokens: int | None = None
    load_1m: list[float] = field(default_factory=list)
    busy_before_pct: list[float] = field(default_factory=list)
    first_error: str = ""
    latencies_ms: list[float] = field(default_factory=list)
    stages_ms: list[list[float]] = field(default_factory=list)

    def finish(self) -> Result:
        lat = self.latencies_ms
        self.requests = len(lat)
        if lat and self.wall_s > 0:
            self.pairs_s = round(len(lat) * self.pairs_per_request / self.wall_s, 3)
            self.p50_ms = round(percentile(lat, 50), 1)
            self.p90_ms = round(percentile(lat, 90), 1)
        if self.stages_ms:
            for k, name in enumerate(("prepare_p50_ms", "queue_p50_ms", "inference_p50_ms")):
                setattr(self, name, round(statistics.median(s[k] for s in self.stages_ms), 1))
        self.wall_s = round(self.wall_s, 2)
        return self


class Target(HttpClient):
    total_timeout = 900.0

    def __init__(self, name: str, index: int, bases: dict[str, str]) -> None:
        self.name, self.index, self.bases = name, index, bases

    async def send(self, mix: str, body: dict[str, Any], result: Result | None) -> None:
        kind, pairs = MIXES[mix]
        route = "/rerank" if kind == "rerank" else "/v1/embeddings"
        async with self.session.post(self.bases[kind] + route, json=body) as resp:
            data = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {data[:300]!r}")
            headers = resp.headers
        parsed = json.loads(data)
        got = len(parsed["results"]) if kind == "rerank" else len(parsed["data"])
        if got != pairs:
            raise RuntimeError(f"expected {pairs} results, got {got}")
        if result is not None:
            usage = parsed.get("usage") or {}
            if usage.get("prompt_tokens"):
                result.prompt_tokens = int(usage["prompt_tokens"])
            if "x-inference-ns" in headers:
                result.stages_ms.append(
                    [round(int(headers[f"x-{k}-ns"]) / 1e6, 1) for k in ("tokenize", "queue", "inference")]
                )


async def run_mix(
    args: argparse.Namespace, t: Target, mix: str, dtype: str, concurrency: int, workload: Workload
) -> Result:
    result = Result(t.name, mix, dtype, concurrency, MIXES[mix][1])
    requests = {"rerank-text": args.text_requests, "rerank-image": args.image_requests}.get(mix, args.embed_requests)
    cursor = [1_000 * concurrency]

    def bodies(count: int) -> list[dict[str, Any]]:
        out = [workload.body(mix, t.index, cursor[0] + k) for k in range(count)]
        cursor[0] += count
        return out

    await t.open(concurrency)
    try:
        warm = bodies(min(concurrency, args.warmup))
        _, _, errors, first = await closed_loop(lambda n: t.send(mix, warm[n], None), len(warm), len(warm), 600)
        if errors:
            print(f"  warm-up error on {t.name} {mix}: {first}", flush=True)
        for _ in range(args.rounds):
            chunk = bodies(max(concurrency, requests // args.rounds))
            result.busy_before_pct.append(wait_idle(args.idle_wait))
            result.load_1m.append(round(os.getloadavg()[0], 2))
            lat, wall, errors, first = await closed_loop(
                lambda n, chunk=chunk: t.send(mix, chunk[n], result), concurrency, len(chunk), args.max_seconds
            )
            result.latencies_ms += [round(x * 1e3, 1) for x in lat]
            result.wall_s += wall
            result.errors += errors
            result.first_error = result.first_error or first
            result.load_1m.append(round(os.getloadavg()[0], 2))
    finally:
        await t.close()
    result.finish()
    stage = (
        f" prep/queue/infer p50 {result.prepare_p50_ms}/{result.queue_p50_ms}/{result.inference_p50_ms} ms"
        if result.inference_p50_ms is not None
        else ""
    )
    print(
        f"  {t.name:14s} {mix:12s} {dtype} c={concurrency} n={result.requests} err={result.errors} "
        f"{result.pairs_s:7.2f} pairs/s p50 {result.p50_ms:8.1f} ms prompt_tokens {result.prompt_tokens} "
        f"load1m {max(result.load_1m, default=math.nan):.2f} busy% max {max(result.busy_before_pct, default=math.nan)}"
        f"{stage}" + (f" ({result.first_error})" if result.errors else ""),
        flush=True,
    )
    return result


# --------------------------------------------------------------------------- servers


@contextlib.contextmanager
def lateserve_server(args: argparse.Namespace, kind: str, dtype: str, log_dir: Path) -> Iterator[str]:
    port = free_port()
    model = args.rerank_dir if kind == "rerank" else args.embed_dir
    extra = ["--runner", "pooling"] if kind == "rerank" else []
    cmd = [
        str(ROOT / ".venv/bin/lateserve"), "serve", str(model), *extra, "--trust-remote-code",
        "--chat-template", RERANK_TEMPLATE if kind == "rerank" else EMBED_TEMPLATE,
        "--host", "127.0.0.1", "--port", str(port), "--grpc-host", "127.0.0.1", "--grpc-port", str(free_port()),
        "--served-model-name", SERVED[kind], "--max-model-len", str(args.max_model_len), "--dtype", dtype,
        "--max-queue-wait-ms", "0", *args.lateserve_args,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    server = ServerProcess(
        "lateserve", pinned(cmd, args.cores), env, log_dir / f"nemotron-lateserve-{kind}-{dtype}.log"
    )
    try:
        server.wait_http(f"http://127.0.0.1:{port}/health", args.start_timeout)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def vllm_attempt(args: argparse.Namespace, kind: str, dtype: str, log_dir: Path) -> dict[str, Any]:
    """Start vLLM CPU on the checkpoint as the reference doc does; report whether it came up, and if not the
    log's last error lines. (Measuring it, if it ever loads, would go through the same Target.)"""
    from bench_vision import torchvision_overlay

    model = args.rerank_dir if kind == "rerank" else args.embed_dir
    extra = ["--runner", "pooling"] if kind == "rerank" else []
    port = free_port()
    cmd = [
        str(args.vllm_venv / "bin/python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        *extra, "--trust-remote-code", "--chat-template", RERANK_TEMPLATE if kind == "rerank" else EMBED_TEMPLATE,
        "--served-model-name", SERVED[kind], "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(args.max_model_len), "--dtype", dtype,
        "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 0}),
    ]  # fmt: skip
    overlay_args = argparse.Namespace(vllm_venv=args.vllm_venv, vllm_overlay=args.vllm_overlay)
    env = {
        **os.environ,
        "PYTHONPATH": str(torchvision_overlay(overlay_args)),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_CPU_OMP_THREADS_BIND": args.cores or "0-1",
    }
    log = log_dir / f"nemotron-vllm-{kind}-{dtype}.log"
    server = ServerProcess("vllm", pinned(cmd, args.cores), env, log)
    t0 = time.monotonic()
    try:
        server.wait_http(f"http://127.0.0.1:{port}/health", args.vllm_start_timeout)
        outcome: dict[str, Any] = {"kind": kind, "loaded": True, "start_s": round(time.monotonic() - t0, 1)}
    except (RuntimeError, TimeoutError) as exc:
        outcome = {"kind": kind, "loaded": False, "start_s": round(time.monotonic() - t0, 1), "why": str(exc)}
    finally:
        server.stop()
    lines = log.read_text(errors="replace").splitlines()
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    outcome["log"] = str(log)
    outcome["error_lines"] = errors[-6:]
    print(f"  vLLM {kind}: {json.dumps(outcome)[:1500]}", flush=True)
    return outcome


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rerank-dir", type=Path, default=BENCH / "nemotron-rerank-vl-l2")
    p.add_argument("--embed-dir", type=Path, default=BENCH / "nemotron-embed-vl-l2")
    p.add_argument("--dtypes", default="bfloat16")
    p.add_argument("--mixes", default="rerank-text,rerank-image,embed-image")
    p.add_argument("--embed-concurrency", default="1,2")
    p.add_argument("--text-requests", type=int, default=8)
    p.add_argument("--image-requests", type=int, default=2)
    p.add_argument("--embed-requests", type=int, default=4)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=240.0)
    p.add_argument("--idle-wait", type=float, default=10.0)
    p.add_argument("--cores", default="0-1")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--lateserve-args", default="")
    p.add_argument("--with-vllm", action="store_true", help="try to start vLLM CPU on both checkpoints")
    p.add_argument("--vllm-venv", type=Path, default=BENCH / "vllm-venv")
    p.add_argument("--vllm-overlay", type=Path, default=BENCH / "vllm-torchvision-overlay")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--vllm-start-timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=BENCH / "nemotron-vl.json")
    ns = p.parse_args(argv)
    ns.dtypes = [d for d in ns.dtypes.split(",") if d]
    ns.mixes = [m for m in ns.mixes.split(",") if m]
    ns.embed_concurrency = [int(c) for c in ns.embed_concurrency.split(",") if c]
    ns.lateserve_args = ns.lateserve_args.split()
    if set(ns.mixes) - set(MIXES):
        p.error(f"mixes: {', '.join(MIXES)}")
    return ns


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    BENCH.mkdir(exist_ok=True)
    if not (args.rerank_dir / "model.safetensors").exists() or not (args.embed_dir / "model.safetensors").exists():
        from make_nemotron_vl_checkpoint import write_checkpoints

        write_checkpoints(BENCH)
    from make_nemotron_vl_checkpoint import describe

    log_dir = args.out.parent / "logs"
    workload = Workload()
    report: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "model": describe(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_start": load_average(),
        "vllm": [],
        "results": [],
    }
    print(f"model: {report['model']}\nload average: {report['load_start']}", flush=True)
    kinds = sorted({MIXES[m][0] for m in args.mixes}, key=["rerank", "embed"].index)
    for dtype in args.dtypes:
        for kind in kinds:
            if args.with_vllm:
                report["vllm"].append({"dtype": dtype, **vllm_attempt(args, kind, dtype, log_dir)})
                args.out.write_text(json.dumps(report, indent=2))
            with lateserve_server(args, kind, dtype, log_dir) as base:
                target = Target("lateserve-http", 0, {kind: base})
                for mix in (m for m in args.mixes if MIXES[m][0] == kind):
                    for c in args.embed_concurrency if mix == "embed-image" else [1]:
                        result = asyncio.run(run_mix(args, target, mix, dtype, c, workload))
                        report["results"].append(asdict(result))
                        args.out.write_text(json.dumps(report, indent=2))
    report.update(load_end=load_average(), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    args.out.write_text(json.dumps(report, indent=2))
    print(f"load average at the end: {report['load_end']}; results in {args.out}")


if __name__ == "__main__":
    main()
