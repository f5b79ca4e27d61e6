"""Markdown table from the ppl_table.sh JSON files: python benchmarks/ppl_table_md.py smollm2-135m 40"""

import json
import sys
from pathlib import Path

model, win = sys.argv[1], sys.argv[2]
rows = []
for part in ("dense-fused", "official"):
    rows += json.loads(Path(f"benchmarks/results/ppl-{model}-w{win}-{part}.json").read_text())["rows"]
dense = next(r["ppl"] for r in rows if r["form"] == "dense")
order = {"dense": 0, "official": 1}
rows.sort(key=lambda r: (order.get(r["form"], 2), r["p"]))
print("| form | nominal p | unweighted | parameter-weighted | windows | PPL | vs dense |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['form']} | {r['p']:.2f} | {r['unweighted']:.3f} | {r['param_weighted']:.3f} | {r['windows']} | "
          f"{r['ppl']:.3f} | {r['ppl'] / dense - 1:+.1%} |")
