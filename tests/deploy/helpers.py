"""Shared pieces of tests/deploy: the pinned tools of tools/deploy/.venv, replicas started through the images'
entrypoint script (outside a container), and Prometheus/Envoy stats readers."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ENTRYPOINT = DEPLOY / "docker" / "entrypoint.sh"
TOOLS_BIN = ROOT / "tools" / "deploy" / ".venv" / "bin"
INSTALL_HINT = "run `make deploy-tools` (pinned wheels of tools/deploy/requirements.txt)"


def tool(name: str) -> Path | None:
    """A deploy tool: tools/deploy/.venv/bin/NAME, else NAME on PATH; None when neither exists."""
    local = TOOLS_BIN / name
    if local.exists():
        return local
    found = shutil.which(name)
    return Path(found) if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serving(target: str, service: str = "", timeout_s: float = 1.0) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def scrape(url: str, timeout_s: float = 5.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text at `url` as {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def metric_sum(samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and all((k, v) in sample_labels for k, v in labels.items())
    )


class Replica:
    """`deploy/docker/entrypoint.sh serve` on 127.0.0.1: gRPC only (--no-gateway) plus the metrics port,
    in a process group of its own so the whole replica (server and workers) can be killed at once."""

    def __init__(self, model: Path, *, env: Mapping[str, str] | None = None, log: Path | None = None) -> None:
        self.grpc_port = free_port()
        self.metrics_port = free_port()
        self.env = {
            **os.environ,
            "LATESERVE_PYTHON": sys.executable,
            "LATESERVE_MODEL": str(model),
            "LATESERVE_HOST": "127.0.0.1",
            "LATESERVE_GRPC_PORT": str(self.grpc_port),
            "LATESERVE_METRICS_PORT": str(self.metrics_port),
            "LATESERVE_GATEWAY": "0",
            "LATESERVE_WORKERS": "1",
            "LATESERVE_DTYPE": "float32",
            "LATESERVE_SHUTDOWN_GRACE_SECONDS": "5",
            "LATESERVE_EXTRA_ARGS": "--threads-per-worker 1 --prepare-threads 1 --log-level WARNING",
            **(env or {}),
        }
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> Replica:
        out = open(self.log, "wb") if self.log else subprocess.DEVNULL  # noqa: SIM115 (lives as long as the process)
        self.proc = subprocess.Popen(
            ["sh", str(ENTRYPOINT), "serve"], env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    def wait_serving(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                tail = self.log.read_text()[-3000:] if self.log else ""
                raise AssertionError(f"replica exited with {self.proc.returncode}:\n{tail}")
            if serving(self.target):
                return
            time.sleep(0.25)
        raise AssertionError(f"replica {self.target} not SERVING after {timeout_s} s")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return scrape(self.metrics_url)

    def kill(self) -> None:
        """SIGKILL the replica's process group (server and worker processes): a crash, no drain."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, timeout_s: float = 30) -> int | None:
        """SIGTERM (a drain), SIGKILL after `timeout_s`; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # workers left behind by a killed server
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode
