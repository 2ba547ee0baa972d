"""Runs `lateserve` in this process and, first, a Prometheus endpoint for the process's lateserve_* metrics.

`lateserve serve --no-gateway` exposes its metrics nowhere: /metrics lives in the HTTP gateway, and a
`lateserve gateway` sidecar only knows its own HTTP metrics. The queue-depth autoscaler (deploy/k8s) and the
per-replica counts of tests/deploy need lateserve_queue_size, lateserve_grpc_requests_total and the document
cache counters of each replica, so this launcher serves the default registry on --metrics-port (0: off)
and then hands the rest of the command line to lateserve's own CLI, unchanged.

    python launch.py --metrics-port 9400 -- serve MODEL --no-gateway ...
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    own, rest = (args[: args.index("--")], args[args.index("--") + 1 :]) if "--" in args else ([], args)
    parser = argparse.ArgumentParser(prog="launch.py", description=__doc__.splitlines()[0])
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0: none)")
    parser.add_argument("--metrics-host", default="0.0.0.0")
    ns = parser.parse_args(own)
    if ns.metrics_port:
        from prometheus_client import start_http_server

        # Imported first so every lateserve_* series exists (at zero) before the first scrape.
        import lateserve.server.metrics  # noqa: F401

        start_http_server(ns.metrics_port, addr=ns.metrics_host)
    from lateserve.server.cli import main as lateserve_main

    lateserve_main(rest)


if __name__ == "__main__":
    main()
