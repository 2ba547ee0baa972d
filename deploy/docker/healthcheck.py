"""grpc.health.v1 probe for the images' HEALTHCHECK: exit 0 when the service is SERVING, 1 otherwise.

    python healthcheck.py [--target 127.0.0.1:50051] [--service lateserve.v1.RerankService] [--timeout 3]

The empty service name (the default) is the whole server: SERVING once a worker is ready, NOT_SERVING while
it drains. Needs grpcio and grpcio-health-checking only (both are lateserve dependencies).
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str = "", timeout_s: float = 3.0) -> tuple[bool, str]:
    """(serving, what was seen) for one Check call."""
    with grpc.insecure_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="healthcheck.py", description="grpc.health.v1 Check")
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--service", default="", help="a lateserve.v1 service name; empty: the whole server")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    ns = parser.parse_args(argv)
    ok, seen = check(ns.target, ns.service, ns.timeout)
    print(f"{ns.target} {ns.service or '(server)'}: {seen}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
