"""Soak test: a real `lateserve serve` under a mixed, varied load for a long time, with workers killed
(SIGKILL) and frozen (SIGSTOP past the heartbeat) on a schedule. Prints a table and checks that nothing
was lost.

Load: `--clients` concurrent HTTP clients (64), each sending one request after another, picked at random
among /rerank, /score, /pooling, /tokenize and /v1/embeddings, with random lengths (1-300 words per text,
1-20 documents). Chaos: every `--chaos-every` seconds (default: a third of the run, at most 150 s) one worker
is killed with SIGKILL, the next time one is stopped with SIGSTOP for 3 heartbeats (the pool finds it frozen
and replaces it), alternating. RSS of the server process and of each worker is sampled every `--sample-every`
seconds (60).

Checks: every request got an HTTP answer (no client timeout, no connection error); no 5xx but 503s, and
those only in the window of a killed or stopped worker (from the signal until the pool is whole again, plus
a few seconds). Exit status 0 when every check holds.

    .venv/bin/python bench/soak.py                       # 10 minutes
    .venv/bin/python bench/soak.py --duration 60         # the short soak `make test` runs
    .venv/bin/python bench/soak.py --no-chaos --routes rerank --duration 60   # memory under one route only
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parents[1]
ROUTES = ("rerank", "score", "pooling", "tokenize", "embeddings")
WORDS = [
    "machine",
    "learning",
    "retrieval",
    "model",
    "vector",
    "index",
    "query",
    "document",
    "token",
    "late",
    "interaction",
    "score",
    "rank",
    "search",
    "engine",
    "neural",
    "network",
    "dense",
    "sparse",
    "embedding",
    "colbert",
    "passage",
    "answer",
    "question",
    "context",
    "language",
    "data",
    "weather",
    "sunny",
    "river",
    "mountain",
    "city",
    "music",
    "history",
    "science",
    "art",
    "paris",
    "berlin",
    "tokyo",
    "quantum",
    "energy",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def text(rng: random.Random, lo: int = 1, hi: int = 300) -> str:
    # Lengths spread log-uniformly so short and long shapes are both common (varied batch shapes).
    n = round(lo * (hi / lo) ** rng.random())
    return " ".join(rng.choice(WORDS) for _ in range(max(lo, n)))


def make_request(route: str, rng: random.Random) -> tuple[str, dict[str, Any]]:
    if route == "rerank":
        return "/rerank", {"query": text(rng, 2, 20), "documents": [text(rng) for _ in range(rng.randint(1, 20))]}
    if route == "score":
        return "/score", {"text_1": text(rng, 2, 20), "text_2": [text(rng) for _ in range(rng.randint(1, 10))]}
    if route == "pooling":
        inputs = [text(rng) for _ in range(rng.randint(1, 4))]
        return "/pooling", {"input": inputs, "task": "token_embed"}
    if route == "tokenize":
        return "/tokenize", {"prompt": text(rng, 1, 2000)}
    return "/v1/embeddings", {"input": [text(rng) for _ in range(rng.randint(1, 8))]}


@dataclass
class Result:
    route: str
    start: float
    end: float
    status: int  # 0: no answer (timeout, connection error)
    error: str = ""


@dataclass
class Chaos:
    kind: str  # "kill" | "stop"
    pid: int
    start: float
    end: float = float("inf")  # the pool is whole again (plus slack)


@dataclass
class Run:
    results: list[Result] = field(default_factory=list)
    chaos: list[Chaos] = field(default_factory=list)
    rss: list[tuple[float, int, list[int]]] = field(default_factory=list)  # (t, server MB, workers MB)
    t0: float = 0.0


class Server:
    """`lateserve serve` as a subprocess in its own session, so its workers stop with it."""

    def __init__(self, args: argparse.Namespace, log_path: Path) -> None:
        self.http_port, self.grpc_port = free_port(), free_port()
        cmd = [
            str(ROOT / ".venv/bin/lateserve"), "serve", *([args.model] if args.model else []),
            "--host", "127.0.0.1", "--port", str(self.http_port),
            "--grpc-host", "127.0.0.1", "--grpc-port", str(self.grpc_port),
            "--worker-heartbeat", str(args.heartbeat), *args.server_args,
        ]  # fmt: skip
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        self.ps = psutil.Process(self.proc.pid)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def workers(self) -> list[psutil.Process]:
        """The worker processes (the spawn helper, resource_tracker, is not one)."""
        out = []
        for child in self.ps.children():
            with contextlib.suppress(psutil.Error):
                if "resource_tracker" not in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                    out.append(child)
        return out

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log.name}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(self.url + "/health") as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.5)
        raise TimeoutError(f"the server was not healthy within {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


def mb(process: psutil.Process) -> int:
    try:
        return int(process.memory_info().rss / 2**20)
    except psutil.Error:
        return -1


async def client(
    session: aiohttp.ClientSession,
    server: Server,
    run: Run,
    routes: list[str],
    seed: int,
    stop: float,
    timeout: float,
    limit: float = float("inf"),
) -> None:
    rng = random.Random(seed)
    sent = 0
    while time.monotonic() < stop and sent < limit:
        sent += 1
        route = rng.choice(routes)
        path, body = make_request(route, rng)
        start = time.monotonic()
        try:
            async with session.post(
                server.url + path, json=body, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                await response.read()
                run.results.append(Result(route, start, time.monotonic(), response.status))
                if response.status == 429:
                    retry = float(response.headers.get("Retry-After", "1") or 1)
                    await asyncio.sleep(min(retry, 2.0) * rng.random())
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            run.results.append(Result(route, start, time.monotonic(), 0, f"{type(exc).__name__}: {exc}"))


async def sampler(server: Server, run: Run, every: float, done: asyncio.Event) -> None:
    while True:
        run.rss.append((time.monotonic() - run.t0, mb(server.ps), [mb(w) for w in server.workers()]))
        if done.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), every)


async def chaos(server: Server, run: Run, args: argparse.Namespace, stop: float) -> None:
    every = args.chaos_every or min(150.0, args.duration / 3)
    kinds = ["kill", "stop"]
    n = 0
    while time.monotonic() + every < stop - 5:
        await asyncio.sleep(every - (time.monotonic() - run.t0) % every)
        workers = server.workers()
        if not workers:
            continue
        victim = random.Random(n).choice(workers)
        before = {w.pid for w in workers}
        event = Chaos(kinds[n % 2], victim.pid, time.monotonic())
        run.chaos.append(event)
        n += 1
        with contextlib.suppress(psutil.Error):
            if event.kind == "kill":
                victim.send_signal(signal.SIGKILL)
            else:
                victim.send_signal(signal.SIGSTOP)
        # Whole again: as many workers as before, the victim among them no more.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            now = {w.pid for w in server.workers()}
            if victim.pid not in now and len(now) >= len(before):
                break
        if event.kind == "stop":
            with contextlib.suppress(psutil.Error):
                victim.send_signal(signal.SIGCONT)  # in case the pool let it live (it should have killed it)
        # A replacement is ready once it answers; allow a few seconds for its load and warmup.
        event.end = time.monotonic() + args.window_slack


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(run: Run, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    lines = []
    by_route: dict[str, Counter[str]] = defaultdict(Counter)
    for r in run.results:
        klass = "lost" if r.status == 0 else f"{r.status // 100}xx"
        by_route[r.route][klass] += 1
        by_route[r.route][str(r.status)] += r.status in (429, 503)
    total: Counter[str] = Counter()
    for counts in by_route.values():
        total.update(counts)
    ok = [r.end - r.start for r in run.results if 200 <= r.status < 300]
    cols = ["2xx", "4xx", "429", "5xx", "503", "lost"]
    lines.append("| route | requests | " + " | ".join(cols) + " | p50 ms (2xx) | p99 ms (2xx) |")
    lines.append("|---" * (len(cols) + 4) + "|")
    for route in sorted(by_route):
        latencies = [r.end - r.start for r in run.results if r.route == route and 200 <= r.status < 300]
        counts = by_route[route]
        n = sum(counts[k] for k in ("2xx", "4xx", "5xx", "lost"))
        lines.append(
            f"| {route} | {n} | " + " | ".join(str(counts[c]) for c in cols)
            + f" | {percentile(latencies, 0.5) * 1e3:.0f} | {percentile(latencies, 0.99) * 1e3:.0f} |"
        )  # fmt: skip
    n = sum(total[k] for k in ("2xx", "4xx", "5xx", "lost"))
    lines.append(
        f"| all | {n} | " + " | ".join(str(total[c]) for c in cols)
        + f" | {percentile(ok, 0.5) * 1e3:.0f} | {percentile(ok, 0.99) * 1e3:.0f} |"
    )  # fmt: skip
    lines.append("")
    lines.append("| t (s) | server RSS MB | worker RSS MB |")
    lines.append("|---|---|---|")
    for t, server_mb, workers_mb in run.rss:
        lines.append(f"| {t:.0f} | {server_mb} | {', '.join(map(str, workers_mb))} |")
    lines.append("")
    for event in run.chaos:
        lines.append(
            f"- {event.kind} pid {event.pid} at {event.start - run.t0:.0f} s; pool whole again "
            f"(+{args.window_slack:g} s) at {event.end - run.t0:.0f} s"
        )  # fmt: skip

    def in_window(r: Result) -> bool:
        return any(r.start <= e.end and r.end >= e.start for e in run.chaos)

    lost = [r for r in run.results if r.status == 0]
    bad_5xx = [r for r in run.results if r.status >= 500 and not (r.status == 503 and in_window(r))]
    checks = {
        "every request answered": not lost,
        "no 5xx but 503s of killed/stopped workers": not bad_5xx,
        "chaos happened": bool(run.chaos) or args.no_chaos,
        "requests served": bool(ok),
    }
    lines.append("")
    for name, passed in checks.items():
        lines.append(f"- check: {name}: {'ok' if passed else 'FAILED'}")
    for r in (lost + bad_5xx)[:10]:
        lines.append(f"  - {r.route} at {r.start - run.t0:.1f} s: status {r.status} {r.error}")
    summary = {
        "checks": checks,
        "requests": n,
        "by_class": {k: total[k] for k in cols},
        "p50_ms": percentile(ok, 0.5) * 1e3,
        "p99_ms": percentile(ok, 0.99) * 1e3,
        "rss": run.rss,
        "chaos": [(e.kind, e.start - run.t0, e.end - run.t0) for e in run.chaos],
        "lost": len(lost),
        "bad_5xx": len(bad_5xx),
    }
    return "\n".join(lines), summary


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    server = Server(args, Path(args.log))
    try:
        await server.wait_ready(args.start_timeout)
        run = Run(t0=time.monotonic())
        stop = run.t0 + args.duration
        routes = args.routes.split(",")
        connector = aiohttp.TCPConnector(limit=args.clients)
        async with aiohttp.ClientSession(connector=connector) as session:
            clients = [
                asyncio.create_task(
                    client(
                        session,
                        server,
                        run,
                        routes,
                        args.seed + i,
                        stop,
                        args.request_timeout,
                        args.requests_per_client,
                    )
                )
                for i in range(args.clients)
            ]
            done = asyncio.Event()
            others = [asyncio.create_task(sampler(server, run, args.sample_every, done))]
            if not args.no_chaos:
                others.append(asyncio.create_task(chaos(server, run, args, stop)))
            await asyncio.gather(*clients)
            await asyncio.sleep(min(args.sample_every, 5.0))  # memory once the load is gone
            done.set()
            await asyncio.gather(*others)
        table, summary = report(run, args)
        print(table, flush=True)
        return summary
    finally:
        server.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--routes", default=",".join(ROUTES), help="comma-separated subset of " + ",".join(ROUTES))
    parser.add_argument("--model", default="", help="model to serve (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--chaos-every", type=float, default=0.0, help="seconds between chaos events (default auto)")
    parser.add_argument("--no-chaos", action="store_true")
    parser.add_argument("--heartbeat", type=float, default=2.0, help="the server's --worker-heartbeat")
    parser.add_argument("--window-slack", type=float, default=5.0, help="seconds a chaos window lasts past recovery")
    parser.add_argument("--sample-every", type=float, default=60.0, help="seconds between RSS samples")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="client timeout: past it, lost")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--requests-per-client", type=float, default=float("inf"), help="stop a client after this many (fixed work)"
    )
    parser.add_argument("--log", default=str(ROOT / ".bench/soak-server.log"))
    parser.add_argument("--json", default="", help="write the summary here")
    parser.add_argument("server_args", nargs=argparse.REMAINDER, help="after --: flags for lateserve serve")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.server_args[:1] == ["--"]:
        args.server_args = args.server_args[1:]
    summary = asyncio.run(soak(args))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    result = main()
    sys.exit(0 if all(result["checks"].values()) else 1)
