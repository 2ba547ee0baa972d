"""Pins the images' Python packages: the runtime closure of lateserve-server (and of torch, which the
Dockerfiles install first from the PyTorch index) as `name==version` lines, taken from the environment
the tests ran in.

    .venv/bin/python tools/deploy/lock.py > deploy/docker/requirements.txt     # rewrite the pins
    .venv/bin/python tools/deploy/lock.py --check deploy/docker/requirements.txt

--check (run by tests/deploy/test_docker.py) fails when a distribution of the closure is missing from the
file or a pin no longer satisfies what lateserve's pyproject files ask for; it does not demand the venv's
exact versions, so a dependency bumped elsewhere only needs a rewrite when its range moves past the pin.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOTS = ("lateserve-server", "torch")
LOCAL = {"lateserve-server", "lateserve-gateway", "lateserve-proto", "lateserve-client"}
NOT_PINNED = {"torch"}  # pinned by the Dockerfiles' TORCH_VERSION, from the PyTorch index for the device
NOT_PINNED_PREFIXES = ("nvidia-", "triton")  # CUDA torch's own exact pins; absent from the CPU wheel


def _applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    env = dict(default_environment())
    return any(req.marker.evaluate({**env, "extra": extra}) for extra in (extras or {""}))


def closure() -> dict[str, tuple[str, list[Requirement]]]:
    """name -> (installed version, requirements that pull it in)."""
    seen: dict[str, tuple[str, list[Requirement]]] = {}
    todo: list[tuple[str, set[str], Requirement | None]] = [(name, set(), None) for name in ROOTS]
    expanded: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras, via = todo.pop()
        key = canonicalize_name(name)
        dist = metadata.distribution(key)
        version, reqs = seen.get(key, (dist.version, []))
        if via is not None:
            reqs.append(via)
        seen[key] = (version, reqs)
        if (key, frozenset(extras)) in expanded:
            continue
        expanded.add((key, frozenset(extras)))
        for line in dist.requires or []:
            req = Requirement(line)
            if _applies(req, extras):
                todo.append((req.name, set(req.extras), req))
    return seen


def pins() -> dict[str, str]:
    return {
        name: version
        for name, (version, _) in sorted(closure().items())
        if name not in LOCAL | NOT_PINNED and not name.startswith(NOT_PINNED_PREFIXES)
    }


def read_pins(path: Path) -> dict[str, Version]:
    out: dict[str, Version] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = Version(version)
    return out


def check(path: Path) -> list[str]:
    """Problems with the pins in `path`, empty when it is complete and consistent."""
    pinned = read_pins(path)
    problems = []
    for name, (_, reqs) in sorted(closure().items()):
        if name in LOCAL | NOT_PINNED or name.startswith(NOT_PINNED_PREFIXES):
            continue
        if name not in pinned:
            problems.append(f"{name} is needed at run time and not pinned")
            continue
        for req in reqs:
            if not req.specifier.contains(pinned[name], prereleases=True):
                problems.append(f"{name}=={pinned[name]} does not satisfy {req}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", type=Path, help="verify this file instead of printing the pins")
    ns = parser.parse_args()
    if ns.check:
        problems = check(ns.check)
        for line in problems:
            print(f"{ns.check}: {line}", file=sys.stderr)
        if problems:
            print("rewrite it with: .venv/bin/python tools/deploy/lock.py > deploy/docker/requirements.txt")
        return 1 if problems else 0
    print("# Runtime Python packages of the lateserve images, pinned (tools/deploy/lock.py writes this file from the")
    print("# environment `make test` ran in). torch is pinned by the Dockerfiles' TORCH_VERSION instead.")
    for name, version in pins().items():
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
