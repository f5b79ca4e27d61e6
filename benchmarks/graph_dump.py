"""The captured decode step's CUDA graph, by variant: kernel nodes, edges and the edge kinds CUDA's debug dump
names (H200). v27 asks why the head in `dense_linear` cancels all of PDL's gain for LaRoSA with the overlapped
adapters (benchmarks/NOTES.md v27): are the programmatic edges of the step still there with it?

    PYTHONPATH=src python3 benchmarks/graph_dump.py --out /tmp/graphs   # writes VARIANT.dot and summary.json

Random weights at the LLaMA2-7B shape, bf16, batch 1, LaRoSA at p = 0.5 (paper split) unless --method says else.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from larosa.engine import DecodeEngine  # noqa: E402
from larosa.shapes import get_shape, random_base, sparse_variant  # noqa: E402

EDGE = re.compile(r'^\s*"?([\w]+)"?\s*->\s*"?([\w]+)"?(.*)$')


def summarize(dot: str) -> dict:
    """Counts from a CUDA graph debug dump: nodes per kernel name, edges, and the attributes edges carry (CUDA
    12.3+ writes the dependency type of non-default edges, e.g. programmatic ones)."""
    edges, attrs = 0, collections.Counter()
    for line in dot.splitlines():
        m = EDGE.match(line)
        if m:
            edges += 1
            attrs[m.group(3).strip().rstrip(";") or "(plain)"] += 1
    kernels = collections.Counter(re.findall(r"\b([A-Za-z_]\w*_kernel\w*|nvjet\w*|splitKreduce\w*)", dot))
    low = dot.lower()
    return {"edges": edges, "edge_attributes": attrs.most_common(12),
            "mentions": {w: low.count(w) for w in ("programmatic", "launch_completion", "port", "pdl")},
            "kernel_names_top": kernels.most_common(12), "bytes": len(dot)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--method", default="larosa")
    ap.add_argument("--sparsity", type=float, default=0.5)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = random_base(get_shape(args.shape), torch.bfloat16, "cuda", 0)
    w = base if args.method == "dense" else sparse_variant(base, args.method, args.sparsity)
    prompt = torch.randint(0, 1000, (1, 128), device="cuda")
    res = {"shape": args.shape, "method": args.method, "sparsity": args.sparsity, "gpu": torch.cuda.get_device_name(),
           "torch": torch.__version__, "variants": {}}
    for label, kw in (("cublas-head", {"dense_head": False}), ("dense-head", {"dense_head": True})):
        eng = DecodeEngine(w, max_len=256, **kw)
        eng.generate(prompt, 4)  # compile, capture, warm up
        path = eng.dump_graph(str(args.out / f"{label}.dot"))
        res["variants"][label] = summarize(Path(path).read_text(errors="replace"))
        print(label, json.dumps(res["variants"][label], indent=1))
        del eng
        torch.cuda.empty_cache()
    (args.out / "summary.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
