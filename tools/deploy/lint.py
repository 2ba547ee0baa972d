"""`make deploy-lint`: offline checks of deploy/ with the pinned tools of tools/deploy/.venv.

- hadolint 2.15 on both Dockerfiles (any finding fails), shellcheck on the entrypoint;
- kubectl kustomize (kustomize v5.8) renders the base and both overlays; kubernetes-validate checks every
  rendered object against the Kubernetes JSON schemas (strict: unknown fields fail) of the oldest supported
  (1.30) and the newest shipped (1.37) release;
- envoy --mode validate on deploy/envoy/envoy.yaml and on its one-machine rewrite (localize.py).

Run with the tools venv's python: tools/deploy/.venv/bin/python tools/deploy/lint.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
KUSTOMIZATIONS = ("base", "overlays/cpu", "overlays/gpu")


def run(label: str, argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
    print(f"deploy-lint: {label}: {status} ({time.monotonic() - start:.1f}s)")
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
    return proc


def main() -> int:
    failed = 0
    dockerfiles = sorted(str(p) for p in (DEPLOY / "docker").glob("*.Dockerfile"))
    failed |= run(
        "hadolint " + " ".join(Path(d).name for d in dockerfiles),
        [str(BIN / "hadolint"), "--no-color", "--failure-threshold", "style", *dockerfiles],
    ).returncode
    failed |= run(
        "shellcheck entrypoint.sh", [str(BIN / "shellcheck"), "-s", "sh", str(DEPLOY / "docker" / "entrypoint.sh")]
    ).returncode
    with tempfile.TemporaryDirectory(prefix="deploy-lint-") as tmp:
        for name in KUSTOMIZATIONS:
            rendered = run(f"kustomize {name}", [str(BIN / "kubectl"), "kustomize", str(DEPLOY / "k8s" / name)])
            failed |= rendered.returncode
            if rendered.returncode:
                continue
            out = Path(tmp) / (name.replace("/", "-") + ".yaml")
            out.write_text(rendered.stdout)
            for version in KUBERNETES_VERSIONS:
                failed |= run(
                    f"kubernetes-validate --strict {name} (Kubernetes {version})",
                    [str(BIN / "kubernetes-validate"), "--strict", "--quiet", "-k", version, str(out)],
                ).returncode
        failed |= run(
            "envoy --mode validate envoy.yaml",
            [str(BIN / "envoy"), "--mode", "validate", "-l", "error", "-c", str(DEPLOY / "envoy" / "envoy.yaml")],
        ).returncode
        local = Path(tmp) / "envoy-local.json"
        made = run(
            "localize.py",
            [sys.executable, str(DEPLOY / "envoy" / "localize.py"), "--backends", "127.0.0.1:50051,127.0.0.1:50052"],
        )
        failed |= made.returncode
        if not made.returncode:
            local.write_text(made.stdout)
            failed |= run(
                "envoy --mode validate (one-machine rewrite)",
                [str(BIN / "envoy"), "--mode", "validate", "-l", "error", "-c", str(local)],
            ).returncode
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
