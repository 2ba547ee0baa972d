"""The short soak (issue 12, item 5): bench/soak.py for 60 s against a real `lateserve serve` on the
bundled default model, mixed routes and lengths from 64 clients, one worker killed and one stopped past
the heartbeat. Every request is answered and no 5xx but the 503s of those workers' windows."""

from __future__ import annotations

from pathlib import Path

from bench import soak


def test_short_soak(tmp_path: Path) -> None:
    summary = soak.main(
        [
            "--duration", "60", "--sample-every", "20", "--chaos-every", "20", "--heartbeat", "2",
            "--log", str(tmp_path / "server.log"),
            "--", "--worker-batch-timeout", "20",
        ]
    )  # fmt: skip
    assert summary["checks"] == {
        "every request answered": True,
        "no 5xx but 503s of killed/stopped workers": True,
        "chaos happened": True,
        "requests served": True,
    }, summary
    kinds = [kind for kind, _, _ in summary["chaos"]]
    assert kinds[:2] == ["kill", "stop"], summary["chaos"]
    assert summary["by_class"]["2xx"] > 100
