"""The server process never imports torch or transformers, even after serving every HTTP route.

Import-linter checks the static imports (pyproject.toml); this checks the running process: a fresh
interpreter builds `Server(ServerConfig(...))` on a tiny checkpoint, sends a request to every route
the gateway serves (chat messages included, so the chat template path runs too), and reports
`sys.modules`. Worker processes are separate processes and do import torch; that is fine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys, urllib.error, urllib.request

    from lateserve.server.app import Server
    from lateserve.server.config import ServerConfig

    TEMPLATE = (
        "{% for m in messages %}{{ m['role'] }}: "
        "{% for p in m['content'] %}{{ p['text'] }}{% endfor %}\\n{% endfor %}"
    )
    ROUTES = [
        ("/rerank", {"query": "What is machine learning?", "documents": ["Machine learning is AI.", "Sunny."]}),
        ("/score", {"text_1": "What is machine learning?", "text_2": ["Machine learning is AI.", "Sunny."]}),
        ("/pooling", {"input": ["What is machine learning?"], "task": "token_embed"}),
        ("/v1/embeddings", {"input": ["What is machine learning?"]}),
        ("/tokenize", {"prompt": "What is machine learning?", "return_token_strs": True}),
        ("/tokenize", {"messages": [{"role": "user", "content": "What is machine learning?"}]}),
        ("/detokenize", {"tokens": [4, 10, 20, 5]}),
        ("/v1/models", None),
        ("/health", None),
        ("/metrics", None),
    ]

    def call(base, path, body):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(base + path, data=data, method="POST" if data else "GET")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    async def main():
        config = ServerConfig(
            model=sys.argv[1], host="127.0.0.1", port=0, grpc_host="127.0.0.1", grpc_port=0,
            workers=1, threads_per_worker=1, dtype="float32", max_model_len=64, chat_template=TEMPLATE,
        )
        server = Server(config)
        await server.start()
        try:
            base = f"http://127.0.0.1:{server.http_port}"
            loop = asyncio.get_running_loop()
            statuses = {}
            for path, body in ROUTES:
                key = path + (" messages" if body and "messages" in body else "")
                statuses[key] = await loop.run_in_executor(None, call, base, path, body)
        finally:
            await server.stop(1.0)
        print("RESULT " + json.dumps({
            "statuses": statuses,
            "torch": "torch" in sys.modules,
            "transformers": "transformers" in sys.modules,
        }))

    asyncio.run(main())
    """
)


def test_server_process_never_imports_torch(colbert_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(colbert_dir)], capture_output=True, text=True, timeout=280, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    statuses = result["statuses"]
    assert statuses.pop("/v1/embeddings") in (200, 400)  # a late-interaction model has no `embed` task
    assert statuses == dict.fromkeys(statuses, 200), statuses
    assert len(statuses) == 9
    assert result["torch"] is False
    assert result["transformers"] is False
