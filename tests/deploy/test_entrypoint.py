"""deploy/docker/entrypoint.sh outside a container: the flags it builds from LATESERVE_* (dry run), the
errors it refuses to start with, and a real run: `serve` (gRPC only + lateserve's --metrics-port), the
grpc.health.v1 probe the images' HEALTHCHECK runs, `gateway` as an HTTP sidecar in front of it, and a clean
SIGTERM drain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lateserve.server.cli import build_parser, config_from_args
from tests.deploy.helpers import ENTRYPOINT, Replica, free_port, metric_sum, serving
from tests.fixtures.checkpoints import write_hf_colbert


def _entry(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("LATESERVE_")}
    full.update({"LATESERVE_PYTHON": sys.executable, **env})
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env=full, capture_output=True, text=True, timeout=60)


def _dry(*args: str, **env: str) -> list[str]:
    proc = _entry(*args, LATESERVE_DRY_RUN="1", **env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_serve_defaults() -> None:
    argv = _dry()
    assert argv[:4] == [sys.executable, "-m", "lateserve.server", "serve"]  # lateserve itself, no wrapper
    flags = argv[4:]
    assert flags[:6] == ["--grpc-host", "0.0.0.0", "--grpc-port", "50051", "--shutdown-grace-seconds", "30"]
    # The in-process gateway and, beside it, lateserve's own metrics port; bundled model.
    assert flags[6:] == ["--host", "0.0.0.0", "--port", "8000", "--metrics-port", "9400"]


def test_metrics_port_and_host() -> None:
    """--metrics-port binds to --host: gRPC-only, LATESERVE_METRICS_HOST picks it; with the gateway it is HTTP's."""
    flags = _dry(LATESERVE_GATEWAY="0", LATESERVE_HOST="127.0.0.1", LATESERVE_METRICS_PORT="9500")[4:]
    assert flags[6:] == ["--no-gateway", "--host", "127.0.0.1", "--metrics-port", "9500"]
    flags = _dry(LATESERVE_GATEWAY="0", LATESERVE_HOST="127.0.0.1", LATESERVE_METRICS_HOST="0.0.0.0")[4:]
    assert flags[:2] == ["--grpc-host", "127.0.0.1"]  # gRPC on loopback, metrics scraped on every address
    assert flags[6:] == ["--no-gateway", "--host", "0.0.0.0", "--metrics-port", "9400"]
    assert _dry(LATESERVE_METRICS_PORT="0")[-2:] == ["--metrics-port", "0"]  # off
    # The flags are lateserve's own: they parse, and a metrics port on the HTTP port is refused by lateserve.
    config = config_from_args(build_parser().parse_args(_dry(LATESERVE_GATEWAY="0")[3:]))
    assert (config.metrics_port, config.host, config.gateway) == (9400, "0.0.0.0", False)
    clash = _entry(LATESERVE_HTTP_PORT="9400")
    assert clash.returncode == 1 and "--metrics-port 9400 is also the HTTP --port" in clash.stderr, clash.stderr


def test_serve_flags_from_environment(tmp_path: Path) -> None:
    model = write_hf_colbert(tmp_path / "m")
    argv = _dry(
        "serve",
        "--max-num-seqs",
        "8",
        LATESERVE_MODEL=str(model),
        LATESERVE_GATEWAY="0",
        LATESERVE_GRPC_PORT="6000",
        LATESERVE_WORKERS="2",
        LATESERVE_DEVICE="cuda",
        LATESERVE_DOC_CACHE_MB="64",
        LATESERVE_SHUTDOWN_GRACE_SECONDS="12",
        LATESERVE_EXTRA_ARGS="--max-queued-requests 9 --log-level debug",
    )
    serve = argv[argv.index("serve") + 1 :]
    assert serve[0] == str(model)
    assert "--no-gateway" in serve and "--port" not in serve
    text = " ".join(serve)
    for part in ("--grpc-port 6000", "--shutdown-grace-seconds 12", "--workers 2", "--device cuda",
                 "--doc-cache-mb 64", "--max-num-seqs 8", "--max-queued-requests 9 --log-level debug"):  # fmt: skip
        assert part in text, (part, text)
    # Flags alone (`docker run IMAGE --workers 2`) mean serve.
    assert "serve" in _dry("--workers", "2")


def test_gateway_and_health_commands() -> None:
    gateway = _dry("gateway", LATESERVE_GRPC_TARGET="lateserve:7000", LATESERVE_HTTP_PORT="8100")
    assert gateway[1:] == ["-m", "lateserve.server", "gateway", "--grpc-target", "lateserve:7000", "--host", "0.0.0.0",
                           "--port", "8100"]  # fmt: skip
    health = _dry("health", LATESERVE_GRPC_PORT="6001")
    assert health[1].endswith("deploy/docker/healthcheck.py") and health[2:] == ["--target", "127.0.0.1:6001"]
    assert _dry("echo", "hi") == ["echo", "hi"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LATESERVE_MODEL": "/nonexistent/model"}, "no such directory"),
        ({"LATESERVE_MODEL": "/"}, "no config.json"),
        ({"LATESERVE_GRPC_PORT": "5o051"}, "ports must be numbers"),
        ({"LATESERVE_METRICS_PORT": "94OO"}, "ports must be numbers"),
        ({"LATESERVE_METRICS_HOST": "10.0.0.1"}, "LATESERVE_METRICS_HOST needs LATESERVE_GATEWAY=0"),
        ({"LATESERVE_MODEL": "org/model", "HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent"}, "holds no hub cache"),
    ],
)
def test_refuses_to_start(env: dict[str, str], message: str) -> None:
    proc = _entry(**env)
    assert proc.returncode == 64 and message in proc.stderr, (proc.returncode, proc.stderr)


def test_serve_probe_sidecar_and_drain(tmp_path: Path) -> None:
    model = write_hf_colbert(tmp_path / "model")
    replica = Replica(model, log=tmp_path / "serve.log").start()
    sidecar: subprocess.Popen[bytes] | None = None
    try:
        replica.wait_serving()
        probe = _entry("health", LATESERVE_GRPC_PORT=str(replica.grpc_port))
        assert probe.returncode == 0 and "SERVING" in probe.stdout, probe
        # HF_ColBERT has no embed task: that service is NOT_SERVING and the probe says so.
        embed = _entry("health", "--service", "lateserve.v1.EmbedService", LATESERVE_GRPC_PORT=str(replica.grpc_port))
        assert embed.returncode == 1 and "NOT_SERVING" in embed.stdout, embed
        assert metric_sum(replica.metrics(), "lateserve_queue_size") == 0
        assert metric_sum(replica.metrics(), "lateserve_workers_ready") == 1

        http_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LATESERVE_")}
        env.update(LATESERVE_PYTHON=sys.executable, LATESERVE_HOST="127.0.0.1", LATESERVE_HTTP_PORT=str(http_port),
                   LATESERVE_GRPC_TARGET=replica.target)  # fmt: skip
        with open(tmp_path / "gateway.log", "wb") as log:
            sidecar = subprocess.Popen(["sh", str(ENTRYPOINT), "gateway"], env=env, stdout=log, stderr=log)
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    assert response.status == 200
                    break
            except (urllib.error.URLError, ConnectionError):
                assert sidecar.poll() is None, (tmp_path / "gateway.log").read_text()
                assert time.monotonic() < deadline, "the gateway sidecar did not answer /health"
                time.sleep(0.25)
        body = json.dumps({"query": "What is machine learning?", "documents": ["Machine learning is fun.", "Rain."]})
        request = urllib.request.Request(
            f"{url}/rerank", data=body.encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert len(json.loads(response.read())["results"]) == 2
        assert metric_sum(replica.metrics(), "lateserve_grpc_requests_total", method="Rerank", code="OK") == 1

        assert replica.stop() == 0  # SIGTERM: drained and exited cleanly
        assert not serving(replica.target)
        assert _entry("health", LATESERVE_GRPC_PORT=str(replica.grpc_port)).returncode == 1
    finally:
        if sidecar is not None:
            sidecar.terminate()
            sidecar.wait(timeout=30)
        replica.stop()
