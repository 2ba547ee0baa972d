"""In-process forward variants on one /rerank 1x20 request (query + 20 documents, one batch sorted by
length): what the CPU fast path (server/src/lateserve/server/families/acceleration.py) buys, and what
each bf16 policy costs in accuracy. The variants take turns (round robin), so a slow spell of the
shared machine hits all of them alike; reports the median and best request time of each.

    .venv/bin/python bench/bench_forward.py --rounds 20 --out .bench/forward.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench_serving import BENCH, FIRST_QUERY, Workload, _vocabulary, maxsim  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=BENCH / "colbert-minilm")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=BENCH / "forward.json")
    p.add_argument(
        "--sweep",
        default="",
        help="instead: --max-num-batched-tokens values to compare (e.g. 1024,2048,4096,8192,16384) on 8 cold "
        "requests cut by the server's BatchQueue, with the server's runner in --sweep-dtype",
    )
    p.add_argument("--sweep-dtype", default="float32")
    p.add_argument("--sensitivity", action="store_true", help="also one matmul at a time in bf16 (accuracy)")
    ns = p.parse_args()
    if ns.sweep:
        sweep(ns)
        return

    import numpy as np
    import torch
    from transformers import BertConfig, BertModel

    from lateserve.server.domain import EncodeOptions, Task, TextItem, WorkItem
    from lateserve.server.families import acceleration
    from lateserve.server.families.registry import family_for, load_source

    torch.set_num_threads(ns.threads)
    if not (ns.model_dir / "model.safetensors").exists():
        from make_colbert_minilm import write_colbert_minilm

        write_colbert_minilm(ns.model_dir)
    source = load_source(str(ns.model_dir), hf_overrides={}, trust_remote_code=False, max_model_len=512)
    family = family_for(source)
    processor = family.processor()
    workload = Workload()
    texts = [FIRST_QUERY, *workload.documents]
    items = [
        WorkItem(processor.encode(TextItem(t), EncodeOptions(), "input"), frozenset({Task.TOKEN_EMBED})) for t in texts
    ]
    order = sorted(range(len(items)), key=lambda i: items[i].sequence.num_tokens)
    batch = [items[i] for i in order]
    # A longer set for the accuracy tail: 120 texts of 5-250 model-card words and 40 queries, by 20.
    rng = random.Random(7)
    words = _vocabulary()
    longer = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 250))) for _ in range(120)]
    longer += workload.queries[1:41]
    long_items = [
        WorkItem(processor.encode(TextItem(t), EncodeOptions(truncate_prompt_tokens=512), "input"), batch[0].tasks)
        for t in longer
    ]
    long_batches = [long_items[i : i + 20] for i in range(0, len(long_items), 20)]

    def runner_with(backbone: Any) -> Any:
        """The family's runner (strict loading, float32 head) with the backbone replaced."""
        original = acceleration.optimize_for_cpu
        acceleration.optimize_for_cpu = lambda module, dtype: backbone(module)
        try:
            return family.runner("cpu", "float32")
        finally:
            acceleration.optimize_for_cpu = original

    def transformers_as(dtype: torch.dtype) -> Any:
        def build(module: Any) -> Any:
            return module.to(dtype)  # the code before the fast path: transformers BertModel, sdpa, padded

        return build

    def fast(dtype: torch.dtype, bf16: frozenset[str] = acceleration.BF16_MATMULS) -> Any:
        return lambda module: acceleration.FastBertModel(module.float().eval(), dtype, bf16_matmuls=bf16)

    variants = {
        "transformers float32 (padded batch, MKL)": runner_with(transformers_as(torch.float32)),
        "transformers whole model cast to bfloat16": runner_with(transformers_as(torch.bfloat16)),
        "fast float32 (unpadded, oneDNN)": runner_with(fast(torch.float32)),
        "fast bfloat16, feed-forward only in bf16 (the earlier policy)": runner_with(
            fast(torch.bfloat16, frozenset({"ffn"}))
        ),
        "fast bfloat16, all but the key projection (default)": runner_with(fast(torch.bfloat16)),
        "fast bfloat16, all matmuls bf16": runner_with(
            fast(torch.bfloat16, frozenset({"query", "key", "value", "output", "ffn"}))
        ),
    }
    if ns.sensitivity:  # one matmul at a time in bf16: which one costs accuracy
        for one in ("query", "key", "value", "output", "ffn"):
            variants[f"fast bfloat16, only {one} in bf16"] = runner_with(fast(torch.bfloat16, frozenset({one})))
    del BertConfig, BertModel
    ref_runner = variants["transformers float32 (padded batch, MKL)"]
    reference = [out[Task.TOKEN_EMBED] for out in ref_runner.forward(batch)]
    long_reference = [[out[Task.TOKEN_EMBED] for out in ref_runner.forward(b)] for b in long_batches]
    ref_scores = [maxsim(reference[order.index(0)], reference[order.index(j)]) for j in range(1, len(texts))]
    times: dict[str, list[float]] = {name: [] for name in variants}
    for runner in variants.values():
        runner.forward(batch)
    load_before = os.getloadavg()
    for _ in range(ns.rounds):
        for name, runner in variants.items():
            t0 = time.perf_counter()
            runner.forward(batch)
            times[name].append(time.perf_counter() - t0)
    rows = []
    for name, runner in variants.items():
        got = [out[Task.TOKEN_EMBED] for out in runner.forward(batch)]
        cos = np.concatenate([(a * b).sum(-1) for a, b in zip(got, reference, strict=True)])
        scores = [maxsim(got[order.index(0)], got[order.index(j)]) for j in range(1, len(texts))]
        rel = max(abs(s / r - 1) for s, r in zip(scores, ref_scores, strict=True))
        long_cos = np.concatenate(
            [
                (a * b).sum(-1)
                for batch_items, refs in zip(long_batches, long_reference, strict=True)
                for a, b in zip([o[Task.TOKEN_EMBED] for o in runner.forward(batch_items)], refs, strict=True)
            ]
        )
        median, best = statistics.median(times[name]), min(times[name])
        rows.append(
            {
                "variant": name,
                "median_ms": round(median * 1e3, 1),
                "best_ms": round(best * 1e3, 1),
                "req_s_median": round(1 / median, 2),
                "min_token_cosine": round(float(cos.min()), 7),
                "maxsim_max_rel_err": float(f"{rel:.3g}"),
                "longer_set_min_token_cosine": round(float(long_cos.min()), 7),
                "longer_set_mean_1_minus_cosine": float(f"{float((1 - long_cos).mean()):.3g}"),
            }
        )
    tokens = sum(item.sequence.num_tokens for item in batch)
    report = {
        "command": " ".join(["python", *sys.argv]),
        "tokens": tokens,
        "padded_tokens": max(item.sequence.num_tokens for item in batch) * len(batch),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "rows": rows,
    }
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(report, indent=2))
    print(f"1 query + 20 documents = {tokens} tokens ({report['padded_tokens']} padded); load {report['load_before']}")
    print(
        "| variant | median ms | best ms | req/s (median) | min token cosine | MaxSim max rel err "
        "| longer set: min token cosine | longer set: mean 1 - cosine |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['median_ms']} | {r['best_ms']} | {r['req_s_median']} | {r['min_token_cosine']} | "
            f"{r['maxsim_max_rel_err']} | {r['longer_set_min_token_cosine']} | {r['longer_set_mean_1_minus_cosine']} |"
        )
    print(f"load average after: {report['load_after']}")


def sweep(ns: argparse.Namespace) -> None:
    """Token budgets of the scheduler's batches, 8 concurrent cold 1x20 requests, same runner."""
    import torch

    from lateserve.server.domain import EncodeOptions, Task, TextItem, WorkItem
    from lateserve.server.families.registry import family_for, load_source
    from lateserve.server.scheduler.queue import BatchQueue, Entry

    torch.set_num_threads(ns.threads)
    source = load_source(str(ns.model_dir), hf_overrides={}, trust_remote_code=False, max_model_len=512)
    family = family_for(source)
    processor = family.processor()
    runner = family.runner("cpu", ns.sweep_dtype)
    workload = Workload()
    items = [
        WorkItem(processor.encode(TextItem(t), EncodeOptions(), "input"), frozenset({Task.TOKEN_EMBED}))
        for n in range(8)
        for t in [workload.query(n), *workload.cold_documents()]
    ]
    plans: dict[int, list[list[WorkItem]]] = {}
    for budget in (int(b) for b in ns.sweep.split(",")):
        queue: BatchQueue[WorkItem] = BatchQueue(max(budget, 512), 256)  # the server's defaults otherwise
        for item in items:
            queue.push(Entry(item, item.sequence.num_tokens))
        plans[budget] = []
        while len(queue):
            plans[budget].append([e.payload for e in queue.cut()])
    times: dict[int, list[float]] = {b: [] for b in plans}
    runner.forward(items[:21])
    load_before = [round(x, 2) for x in os.getloadavg()]
    for _ in range(ns.rounds):
        for budget, batches in plans.items():
            t0 = time.perf_counter()
            for b in batches:
                runner.forward(b)
            times[budget].append(time.perf_counter() - t0)
    print(f"8 cold requests (168 sequences), {ns.sweep_dtype}, load {load_before}")
    print("| --max-num-batched-tokens | batches | req/s (median) | req/s (best) |")
    print("|---|---|---|---|")
    rows = []
    for budget, batches in plans.items():
        median, best = statistics.median(times[budget]), min(times[budget])
        rows.append({"budget": budget, "batches": len(batches), "req_s_median": 8 / median, "req_s_best": 8 / best})
        print(f"| {budget} | {len(batches)} | {8 / median:.2f} | {8 / best:.2f} |")
    print(f"load average after: {[round(x, 2) for x in os.getloadavg()]}")
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
