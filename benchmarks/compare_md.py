"""Markdown tables for the README from a `larosa compare` output folder (its cells, not hand-copied numbers).

    python benchmarks/compare_md.py benchmarks/results/compare-smollm2-135m-w40 --zeroshot-limit 100

`--pivot` prints only the compact method x target table. Otherwise: the main table (target, knob, realised parameter-weighted sparsity with its per-token spread, PPL,
zero-shot mean), the zero-shot per-task table, and the ranking at each target by PPL. Cells that are
not there yet are printed as "not run".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from larosa.compare import AUTO_FORM_METHOD, METHODS, ppl_at_realised  # noqa: E402

TASKS = ("arc_easy", "arc_challenge", "piqa", "boolq", "hellaswag", "openbookqa", "winogrande")


def _cells(folder: Path, limit: int) -> list[dict]:
    out = []
    for f in (folder / "cells").glob("*.json"):
        if f.name.startswith("zs-"):
            continue
        c = json.loads(f.read_text())
        zf = folder / "cells" / f"zs-{c['method']}-{c['target_pw']:.3f}-limit{limit}.json"
        c["zeroshot"] = json.loads(zf.read_text())["zeroshot"] if limit and zf.is_file() else None
        c["zs_file"] = zf.is_file()
        out.append(c)
    by = {(c["method"], c["target_pw"]): c for c in out}
    for c in out:  # larosa-auto built exactly the model of the form it chose: that cell's zero-shot is its own
        choice = c.get("form_choice")
        if c["method"] == "larosa-auto" and c["zeroshot"] is None and choice:
            same = by.get((AUTO_FORM_METHOD[choice["form"]], c["target_pw"]))
            if same is not None and same.get("sites") == c.get("sites") and same["zeroshot"] is not None:
                c["zeroshot"], c["zs_same_model"] = same["zeroshot"], same["method"]
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(out, key=lambda c: (order.get(c["method"], 99), c["target_pw"]))


def _fmt(v, nd=2):
    return f"{v:.{nd}f}" if isinstance(v, (int, float)) else str(v)


def tables(folder: Path, limit: int) -> str:
    cells = _cells(folder, limit)
    zcol = f"0-shot mean, limit {limit}"
    lines = ["| method | target pw | knob | realised pw (mean) | per-token p01-p99 | PPL |" + (f" {zcol} |" if limit else ""),
             "|---|---|---|---|---|---|" + ("---|" if limit else "")]
    for c in cells:
        r = c.get("realised_pw") or {}
        real = f"{r['mean']:.4f}" if r else ("0" if c["method"] == "dense" else "n/a")
        spread = f"{r['p01']:.3f}-{r['p99']:.3f}" if r else "-"
        ppl = _fmt(c["ppl"]) if c.get("ppl") is not None else "n/a"
        row = f"| {c['method']} | {c['target_pw']:g} | {c.get('knob') or ''} | {real} | {spread} | {ppl} |"
        if limit:
            zs = c["zeroshot"]
            row += f" {100 * zs['mean']:.2f} |" if zs else (" n/a |" if c["zs_file"] else " not run |")
        lines.append(row)
    out = ["\n".join(lines)]
    with_zs = [c for c in cells if c["zeroshot"]]
    if with_zs:
        t = ["| method | target pw | " + " | ".join(TASKS) + " | mean |", "|---|---|" + "---|" * (len(TASKS) + 1)]
        for c in with_zs:
            zs = c["zeroshot"]["tasks"]
            acc = [zs[k]["acc_norm"] if zs[k].get("acc_norm") is not None else zs[k]["acc"] for k in TASKS]
            items = {zs[k]["items"] for k in TASKS}
            t.append(f"| {c['method']} | {c['target_pw']:g} | " + " | ".join(f"{100 * a:.1f}" for a in acc)
                     + f" | {100 * c['zeroshot']['mean']:.2f} |" + ("" if items == {limit} else f" items {sorted(items)} |"))
        out.append("Zero-shot per task (acc_norm where the task has it, else acc):\n\n" + "\n".join(t))
    rank = []
    for tgt in sorted({c["target_pw"] for c in cells if c["target_pw"] > 0}):
        row = sorted((c["ppl"], c["method"]) for c in cells if c["target_pw"] == tgt and c.get("ppl") is not None)
        rank.append(f"- pw {tgt:g}: " + " < ".join(f"{m} {p:.2f}" for p, m in row))
    out.append("Ranking by PPL (lower is better):\n\n" + "\n".join(rank))
    eq = equal_realised(cells)
    if eq:
        out.append("At equal *realised* sparsity: TEAL's PPL interpolated (log-linear, between its measured cells, "
                   "dense as the 0 point) at each row's realised pw:\n\n" + eq)
    return "\n\n".join(out)


def pivot(cells: list[dict], limit: int = 0) -> str:
    """One row per method, one column per target: PPL (vs TEAL at the row's realised pw), then the
    zero-shot means where measured: the compact view of an ablation."""
    targets = sorted({c["target_pw"] for c in cells if c["target_pw"] > 0})
    by = {(c["method"], c["target_pw"]): c for c in cells}
    methods = list(dict.fromkeys(c["method"] for c in cells))
    head = "| method | " + " | ".join(f"PPL @ pw {t:g}" for t in targets) + " |"
    zs_any = limit and any(c["zeroshot"] for c in cells)
    if zs_any:
        head += " " + " | ".join(f"0-shot @ {t:g}" for t in targets) + " |"
    lines = [head, "|---|" + "---|" * (len(targets) * (2 if zs_any else 1))]
    for m in methods:
        if m == "dense":
            d = by[("dense", 0.0)]
            zs = f" {100 * d['zeroshot']['mean']:.2f} (all) |" + " |" * (len(targets) - 1) if zs_any and d["zeroshot"] else ""
            lines.append(f"| dense | {_fmt(d['ppl'])} (all) |" + " |" * (len(targets) - 1) + zs)
            continue
        row = f"| {m} |"
        for t in targets:
            c = by.get((m, t))
            if c is None or c.get("ppl") is None:
                row += " - |"
                continue
            ref = None if m == "teal" or not c.get("realised_pw") else ppl_at_realised(cells, c["realised_pw"]["mean"], "teal")
            rel = f" ({100 * (c['ppl'] / ref - 1):+.1f} %)" if ref else ""
            if m.startswith("teal") and c.get("realised_pw"):  # TEAL's realised pw differs from the target
                rel = f" (at {c['realised_pw']['mean']:.3f}{rel.replace(' (', '; ').rstrip(')') if rel else ''})"
            row += f" {c['ppl']:.2f}{rel} |"
        if zs_any:
            for t in targets:
                c = by.get((m, t))
                mark = "*" if c is not None and c.get("zs_same_model") else ""
                row += f" {100 * c['zeroshot']['mean']:.2f}{mark} |" if c is not None and c["zeroshot"] else " - |"
        lines.append(row)
    if any(c.get("zs_same_model") for c in cells):
        lines.append("\n\\* the zero-shot cell of the form `larosa-auto` chose (the identical model).")
    return "\n".join(lines)


def equal_realised(cells: list[dict]) -> str:
    rows = []
    for c in cells:
        if c["method"] in ("dense", "teal") or c.get("ppl") is None or not c.get("realised_pw"):
            continue
        pw = c["realised_pw"]["mean"]
        t = ppl_at_realised(cells, pw, "teal")
        if t is None and not any(x["method"] == "teal" for x in cells):
            return ""
        verdict = "-" if t is None else (f"{100 * (c['ppl'] / t - 1):+.1f} %")
        rows.append(f"| {c['method']} | {c['target_pw']:g} | {pw:.4f} | {c['ppl']:.2f} | "
                    f"{'beyond TEAL cells' if t is None else f'{t:.2f}'} | {verdict} |")
    if not rows:
        return ""
    return ("| method | target pw | realised pw | PPL | TEAL at that realised pw | vs TEAL |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--zeroshot-limit", type=int, default=0)
    ap.add_argument("--pivot", action="store_true", help="only the compact method x target table "
                    "(PPL with its difference to TEAL at equal realised sparsity, zero-shot means)")
    args = ap.parse_args()
    if not (args.folder / "cells").is_dir():
        sys.exit(f"{args.folder} has no cells/ folder (not a `larosa compare` output)")
    if args.pivot:
        print(pivot(_cells(args.folder, args.zeroshot_limit), args.zeroshot_limit))
        return
    print(tables(args.folder, args.zeroshot_limit))


if __name__ == "__main__":
    main()
