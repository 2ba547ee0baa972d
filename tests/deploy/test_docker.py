"""The Dockerfiles, read as text (no image can be built here: base images come from container registries this
environment cannot reach): what they copy exists, versions are pinned, torch matches the Makefile's pin, the
user is not root, the healthcheck is the grpc.health.v1 probe; and the image's Python pins cover lateserve's
runtime closure (tools/deploy/lock.py --check). hadolint runs in `make deploy-lint`."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.deploy.helpers import DEPLOY, ROOT

DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_both_images_exist() -> None:
    assert [p.name for p in DOCKERFILES] == ["cpu.Dockerfile", "cuda.Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile(dockerfile) -> None:  # type: ignore[no-untyped-def]
    text = dockerfile.read_text()
    steps = _instructions(text)
    args = dict(rest.split("=", 1) for word, rest in steps if word == "ARG" and "=" in rest)
    # Pinned: base image tag, torch equal to the Makefile's / constraints.txt's pin, every pip install pinned.
    base = args["PYTHON_IMAGE" if "PYTHON_IMAGE" in args else "CUDA_IMAGE"]
    assert re.search(r":\d+\.\d+\.\d+-", base), base
    makefile_torch = re.search(r"torch==([\d.]+)", (ROOT / "Makefile").read_text())
    assert makefile_torch and args["TORCH_VERSION"] == makefile_torch.group(1)
    assert f"torch=={args['TORCH_VERSION']}" in (ROOT / "constraints.txt").read_text()
    for word, rest in steps:
        if word == "RUN" and "pip install" in rest:
            for command in rest.split("&&"):
                if "pip install" in command:
                    assert "-r requirements.txt" in command or "==" in command or "./server" in command, command
    # Every COPY source from the build context exists.
    for word, rest in steps:
        if word == "COPY" and "--from=" not in rest:
            sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), source
    # Non-root numeric user, the health probe, the entrypoint under tini.
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1] == "${LATESERVE_UID}:${LATESERVE_UID}" and args["LATESERVE_UID"] != "0"
    (health,) = [rest for word, rest in steps if word == "HEALTHCHECK"]
    assert health.endswith('CMD ["/app/entrypoint.sh", "health"]')
    assert ("ENTRYPOINT", '["/usr/bin/tini", "--", "/app/entrypoint.sh"]') in steps
    assert (DEPLOY / "docker" / f"{dockerfile.name}.dockerignore").exists()


def test_python_pins_cover_the_runtime_closure() -> None:
    lock, pins = ROOT / "tools" / "deploy" / "lock.py", DEPLOY / "docker" / "requirements.txt"
    proc = subprocess.run([sys.executable, str(lock), "--check", str(pins)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
