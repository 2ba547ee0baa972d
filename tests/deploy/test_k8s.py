"""deploy/k8s rendered by kustomize (kubectl 1.37 of tools/deploy) and read back: what the issue asks of the
Deployment, the sidecar, the probes, the Services, the HPA, the PDB and the overlays. Schema validation itself
runs in `make deploy-lint`; one case here shows the strict validator rejects an unknown field."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.helpers import DEPLOY, INSTALL_HINT, tool

MARGIN_S = 5  # time left to stop the workers and exit after the drain


def render(overlay: str) -> dict[str, dict[str, Any]]:
    kubectl = tool("kubectl")
    if kubectl is None:
        pytest.skip(f"kubectl (kustomize) is not installed: {INSTALL_HINT}")
    out = subprocess.run(
        [str(kubectl), "kustomize", str(DEPLOY / "k8s" / overlay)], check=True, capture_output=True, text=True
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    return {f"{d['kind']}/{d['metadata']['name'].split('-config-')[0]}": d for d in docs}


def pod(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return objects["Deployment/lateserve"]["spec"]["template"]["spec"]


def config(objects: dict[str, dict[str, Any]]) -> dict[str, str]:
    cm = next(v for k, v in objects.items() if k.startswith("ConfigMap/lateserve"))
    return dict(cm["data"])


@pytest.mark.parametrize("overlay", ["overlays/cpu", "overlays/gpu"])
def test_deployment_shape(overlay: str) -> None:
    objects = render(overlay)
    spec = pod(objects)
    cfg = config(objects)
    (server,) = spec["containers"]
    (gateway,) = spec["initContainers"]
    # The gRPC container without its in-process gateway; the gateway as a native sidecar in front of it.
    assert server["args"] == ["serve"] and cfg["LATESERVE_GATEWAY"] == "0"
    assert gateway["args"] == ["gateway"] and gateway["restartPolicy"] == "Always"
    assert {e["name"]: e["value"] for e in gateway["env"]}[
        "LATESERVE_GRPC_TARGET"
    ] == f"127.0.0.1:{cfg['LATESERVE_GRPC_PORT']}"
    cm_name = next(v for k, v in objects.items() if k.startswith("ConfigMap/"))["metadata"]["name"]
    for container in (server, gateway):
        assert container["envFrom"] == [{"configMapRef": {"name": cm_name}}]
    # Native gRPC probes on grpc.health.v1.
    grpc_port = int(cfg["LATESERVE_GRPC_PORT"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == grpc_port, probe
    assert server["readinessProbe"]["grpc"]["service"] == ""
    assert server["livenessProbe"]["grpc"]["service"] == "lateserve.v1.InfoService"
    # Termination: the pod may take preStop + the drain + a margin, and is not kept much longer.
    grace = float(cfg["LATESERVE_SHUTDOWN_GRACE_SECONDS"])
    pre_stop = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    budget = spec["terminationGracePeriodSeconds"]
    assert pre_stop + grace + MARGIN_S <= budget <= pre_stop + grace + 30, (pre_stop, grace, budget)
    assert spec["securityContext"]["runAsNonRoot"] is True
    ports = {p["name"]: p["containerPort"] for p in server["ports"] + gateway["ports"]}
    assert ports == {"grpc": grpc_port, "metrics": int(cfg["LATESERVE_METRICS_PORT"]),
                     "http": int(cfg["LATESERVE_HTTP_PORT"])}  # fmt: skip


def test_services_hpa_pdb() -> None:
    objects = render("overlays/cpu")
    labels = objects["Deployment/lateserve"]["spec"]["template"]["metadata"]["labels"]
    grpc_svc = objects["Service/lateserve-grpc"]["spec"]
    assert grpc_svc["ports"] == [{"name": "grpc", "port": 50051, "targetPort": "grpc", "protocol": "TCP",
                                  "appProtocol": "grpc"}]  # fmt: skip
    assert objects["Service/lateserve-http"]["spec"]["ports"][0]["name"] == "http"
    assert objects["Service/lateserve-headless"]["spec"]["clusterIP"] == "None"
    for name in ("lateserve-grpc", "lateserve-http", "lateserve-headless"):
        selector = objects[f"Service/{name}"]["spec"]["selector"]
        assert selector and selector.items() <= labels.items(), name
    pdb = objects["PodDisruptionBudget/lateserve"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items() and pdb["maxUnavailable"] == 1
    hpa = objects["HorizontalPodAutoscaler/lateserve"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "lateserve"}
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "lateserve_queue_size"
    rules = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter" / "values.yaml").read_text())
    assert any(r["name"]["as"] == "lateserve_queue_size" for r in rules["rules"]["custom"])


def test_overlays_differ_where_they_should() -> None:
    cpu, gpu = render("overlays/cpu"), render("overlays/gpu")
    cpu_res, gpu_res = (pod(o)["containers"][0]["resources"] for o in (cpu, gpu))
    assert "nvidia.com/gpu" not in cpu_res["limits"] and gpu_res["limits"]["nvidia.com/gpu"] == "1"
    assert config(cpu)["LATESERVE_DEVICE"] == "cpu" and config(gpu)["LATESERVE_DEVICE"] == "cuda"
    assert config(gpu)["LATESERVE_WORKERS"] == "1"
    assert pod(cpu)["containers"][0]["image"].endswith("-cpu") and pod(gpu)["containers"][0]["image"].endswith("-cuda")
    assert pod(gpu)["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_strict_schema_validation_rejects_unknown_fields(tmp_path: Path) -> None:
    validate = tool("kubernetes-validate")
    if validate is None:
        pytest.skip(f"kubernetes-validate is not installed: {INSTALL_HINT}")
    deployment = render("overlays/cpu")["Deployment/lateserve"]
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump(deployment))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["servcie"] = ""
    bad.write_text(yaml.safe_dump(deployment))
    run = [str(validate), "--strict", "--quiet"]
    assert subprocess.run([*run, str(good)], capture_output=True, text=True).returncode == 0
    proc = subprocess.run([*run, str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "servcie" in proc.stdout + proc.stderr
