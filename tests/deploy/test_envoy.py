"""deploy/envoy/envoy.yaml read back: HTTP/2 upstreams, grpc.health.v1 active checks, retries on UNAVAILABLE on
another host, and the consistent hash on x-lateserve-affinity; localize.py keeps all of that and only moves
the endpoints (what tests/deploy/test_load_balancer.py runs)."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.envoy.localize import localize
from tests.deploy.helpers import DEPLOY, INSTALL_HINT, tool


def _config() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())


def test_routes_clusters_and_retries() -> None:
    config = _config()
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    vhost = hcm["route_config"]["virtual_hosts"][0]
    affinity, rest = vhost["routes"]
    assert affinity["match"]["headers"] == [{"name": "x-lateserve-affinity", "present_match": True}]
    assert affinity["route"]["hash_policy"] == [{"header": {"header_name": "x-lateserve-affinity"}}]
    assert affinity["route"]["cluster"] == "lateserve_affinity" and rest["route"]["cluster"] == "lateserve"
    retry = vhost["retry_policy"]
    assert "unavailable" in retry["retry_on"].split(",") and "reset" in retry["retry_on"].split(",")
    assert retry["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert clusters["lateserve"]["lb_policy"] == "ROUND_ROBIN"
    assert clusters["lateserve_affinity"]["lb_policy"] in ("RING_HASH", "MAGLEV")
    for cluster in clusters.values():
        options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        assert "http2_protocol_options" in options["explicit_http_config"]
        (check,) = cluster["health_checks"]
        assert check["grpc_health_check"] == {"service_name": ""}


def test_localize_moves_only_the_endpoints(tmp_path: Path) -> None:
    original = _config()
    local = localize(copy.deepcopy(original), ["127.0.0.1:1", "127.0.0.1:2"], "127.0.0.1:3", "127.0.0.1:4", 0.5)
    for before, after in zip(
        original["static_resources"]["clusters"], local["static_resources"]["clusters"], strict=True
    ):
        assert after["type"] == "STATIC" and after["lb_policy"] == before["lb_policy"]
        hosts = [
            e["endpoint"]["address"]["socket_address"] for e in after["load_assignment"]["endpoints"][0]["lb_endpoints"]
        ]
        assert hosts == [{"address": "127.0.0.1", "port_value": 1}, {"address": "127.0.0.1", "port_value": 2}]
        assert after["health_checks"][0]["interval"] == "0.5s"
    assert (
        local["static_resources"]["listeners"][0]["filter_chains"]
        == original["static_resources"]["listeners"][0]["filter_chains"]
    )
    envoy = tool("envoy")
    if envoy is None:
        pytest.skip(f"the Envoy binary is not installed: {INSTALL_HINT}")
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(local))
    proc = subprocess.run(
        [str(envoy), "--mode", "validate", "-c", str(tmp_path / "local.yaml")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
