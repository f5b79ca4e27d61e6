"""Per-window perplexity of LaRoSA fused cells, and the same windows with the first position (the
attention-sink token) left dense: the diagnostic behind the README's Qwen2.5-0.5B pw 0.47 note.

    python benchmarks/sink_check.py --model qwen2.5-0.5b --targets 0.47,0.5 --windows 4 \
        --out benchmarks/results/sink-check-qwen2.5-0.5b.json

Same protocol as `larosa compare` (WikiText-2 test, non-overlapping 2048-token windows, fused form at
the paper's 0.8/1.2 split solved for the parameter-weighted target, rotations from the calibration
cache). The dense-first-position variant is a forward hook on every Top-K module (diagnostic only).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from larosa.api import cached_rotations  # noqa: E402
from larosa.compare import larosa_plan_for  # noqa: E402
from larosa.data import load_wikitext, tokenize_source  # noqa: E402
from larosa.models import load_model  # noqa: E402
from larosa.modules import TopK  # noqa: E402
from larosa.record import run_record, write_json  # noqa: E402
from larosa.transform import LarosaConfig, apply  # noqa: E402


def _dense_first(mod, inp, out):
    out = out.clone()
    out[..., 0, :] = inp[0][..., 0, :]
    return out


@torch.no_grad()
def window_ppl(net, ids: torch.Tensor, w: int, seqlen: int) -> float:
    x = ids[w * seqlen:(w + 1) * seqlen][None]
    logits = net(x).logits[0, :-1].float()
    return math.exp(torch.nn.functional.cross_entropy(logits, x[0, 1:]).item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--targets", default="0.47,0.5")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lm = load_model(args.model)
    ids = tokenize_source(lm.tokenizer, load_wikitext("test", None))
    rot = cached_rotations(lm, 16, 2048, 0, None, None, None, True)
    rows = []
    dense = [window_ppl(lm.model, ids, w, args.seqlen) for w in tqdm(range(args.windows), desc="dense")]
    rows.append({"variant": "dense", "target_pw": 0.0, "window_ppl": dense})
    for t in (float(v) for v in args.targets.split(",")):
        plan = larosa_plan_for(lm.model, t)
        net = apply(copy.deepcopy(lm.model), LarosaConfig("fused", "layer", plan), rot)
        ppl = [window_ppl(net, ids, w, args.seqlen) for w in tqdm(range(args.windows), desc=f"fused {t}")]
        rows.append({"variant": "larosa-fused", "target_pw": t, "nominal_p": plan.nominal, "window_ppl": ppl})
        hooks = [m.register_forward_hook(_dense_first) for m in net.modules() if isinstance(m, TopK)]
        ppl = [window_ppl(net, ids, w, args.seqlen) for w in tqdm(range(args.windows), desc=f"fused {t} sink dense")]
        rows.append({"variant": "larosa-fused, position 0 dense", "target_pw": t, "nominal_p": plan.nominal,
                     "window_ppl": ppl})
        for h in hooks:
            h.remove()
        del net
    print("| variant | target pw | " + " | ".join(f"window {w}" for w in range(args.windows)) + " | PPL (all) |")
    print("|---|---|" + "---|" * (args.windows + 1))
    for r in rows:
        # the windows are equally long, so the joint PPL is the geometric mean of the per-window PPLs
        joint = math.exp(sum(math.log(p) for p in r["window_ppl"]) / len(r["window_ppl"]))
        r["ppl_all"] = joint
        print(f"| {r['variant']} | {r['target_pw']:g} | " + " | ".join(f"{p:.2f}" for p in r["window_ppl"])
              + f" | {joint:.2f} |")
    if args.out:
        write_json(Path(args.out), run_record("sink-check", {"model": args.model, "windows": args.windows,
                                                               "seqlen": args.seqlen}, rows=rows))


if __name__ == "__main__":
    main()
