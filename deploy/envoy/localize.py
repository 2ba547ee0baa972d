"""Rewrites deploy/envoy/envoy.yaml for replicas on one machine: static endpoints instead of the headless
Service's DNS name, and the listener and admin addresses you name. Prints JSON (Envoy reads it as YAML).

    python deploy/envoy/localize.py --backends 127.0.0.1:50051,127.0.0.1:50052,127.0.0.1:50053 \\
        --listen 127.0.0.1:8080 --admin 127.0.0.1:9901 > /tmp/envoy-local.json
    envoy -c /tmp/envoy-local.json

Everything else (routes, hash policy, retries, health checks, HTTP/2) stays as in envoy.yaml, so what runs
here is what runs in front of a cluster. --health-interval shortens the health-check period.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent


def _address(text: str) -> dict[str, Any]:
    host, _, port = text.rpartition(":")
    return {"socket_address": {"address": host, "port_value": int(port)}}


def localize(
    config: dict[str, Any],
    backends: list[str],
    listen: str,
    admin: str,
    health_interval_s: float | None = None,
) -> dict[str, Any]:
    """`config` (envoy.yaml, parsed) with its clusters pointing at `backends` (HOST:PORT each)."""
    config["admin"]["address"] = _address(admin)
    for listener in config["static_resources"]["listeners"]:
        listener["address"] = _address(listen)
    for cluster in config["static_resources"]["clusters"]:
        cluster["type"] = "STATIC"
        for key in ("dns_lookup_family", "dns_refresh_rate"):
            cluster.pop(key, None)
        cluster["load_assignment"]["endpoints"] = [
            {"lb_endpoints": [{"endpoint": {"address": _address(backend)}} for backend in backends]}
        ]
        if health_interval_s is not None:
            for check in cluster.get("health_checks", []):
                check["interval"] = f"{health_interval_s}s"
                check["no_traffic_interval"] = f"{health_interval_s}s"
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=HERE / "envoy.yaml")
    parser.add_argument("--backends", required=True, help="HOST:PORT,HOST:PORT,... of the replicas' gRPC ports")
    parser.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT clients call")
    parser.add_argument("--admin", default="127.0.0.1:9901", help="HOST:PORT of Envoy's admin interface")
    parser.add_argument("--health-interval", type=float, default=None, help="seconds between health checks")
    ns = parser.parse_args(argv)
    config = yaml.safe_load(ns.config.read_text())
    backends = [b.strip() for b in ns.backends.split(",") if b.strip()]
    json.dump(localize(config, backends, ns.listen, ns.admin, ns.health_interval), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
