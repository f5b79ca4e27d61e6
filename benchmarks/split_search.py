"""Algorithm 1 on a real model: the held-out perplexity of every split tried, per target.

    python benchmarks/split_search.py --model smollm2-135m --targets 0.25,0.375,0.47 \
        --out benchmarks/results/split-search-smollm2-135m.json

Fused form, layer-level Q (and optionally weighted selection); held-out = calibration-split tokens
(4 x 512, seed 1), never the test split. Prints one table per target and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from larosa.api import cached_rotations, calibration_source  # noqa: E402
from larosa.baselines import larosa_plan_for  # noqa: E402
from larosa.data import calibration_batches, tokenize_source  # noqa: E402
from larosa.models import load_model  # noqa: E402
from larosa.record import run_record, write_json  # noqa: E402
from larosa.report import markdown_table  # noqa: E402
from larosa.search import search_split  # noqa: E402
from larosa.transform import LarosaConfig, apply  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--targets", default="0.25,0.375,0.47")
    ap.add_argument("--selection", default="magnitude")
    ap.add_argument("--per-block", action="store_true")
    ap.add_argument("--held-out", default="4x512")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    n, t = (int(v) for v in args.held_out.split("x"))
    lm = load_model(args.model, device="cpu", dtype="float32")
    rot = cached_rotations(lm, 16, 2048, 0)
    ids = tokenize_source(lm.tokenizer, calibration_source(None))
    held = calibration_batches(ids, n, t, 1)
    results = []
    for target in (float(v) for v in args.targets.split(",")):
        t0 = time.perf_counter()
        net = apply(copy.deepcopy(lm.model), LarosaConfig("fused", "layer", larosa_plan_for(lm.model, target),
                                                          selection=args.selection), rot)
        res = search_split(net, target, held, per_block=args.per_block)
        rows = [{"a_attn": r["a_attn"], "a_mlp": r["a_mlp"], "p": round(r["p"], 4),
                 "pw": round(r["param_weighted"], 4), "held-out ppl": round(r["objective"], 3)}
                for r in sorted(res.table, key=lambda r: (r["a_attn"], r["a_mlp"]))]
        print(f"\n## target {target}: best a = {res.best}, held-out ppl {res.objective:.3f} "
              f"({time.perf_counter() - t0:.0f} s)")
        print(markdown_table(rows))
        results.append({"target": target, **res.to_dict(), "seconds": time.perf_counter() - t0})
        del net
    write_json(args.out, run_record("split-search", {"model": args.model, "held_out": [n, t], "seed": 1,
                                                     "selection": args.selection, "per_block": args.per_block,
                                                     "form": "fused", "rotation": "layer"}, results=results))


if __name__ == "__main__":
    main()
