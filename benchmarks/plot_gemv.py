"""Plot benchmarks/results/gemv-*.json: time per call vs sparsity, one panel per shape.

    python benchmarks/plot_gemv.py benchmarks/results/gemv-h200-bf16.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = json.loads(Path(path).read_text())
    shapes = [s for s in dict.fromkeys(r["shape"] for r in rec["rows"]) if not s.startswith("adapter")]
    cols = 3
    rows_n = (len(shapes) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.6 * rows_n), squeeze=False)
    for ax, shape in zip(axes.flat, shapes):
        rs = [r for r in rec["rows"] if r["shape"] == shape]
        s = [r["sparsity"] for r in rs]
        ax.plot(s, [r["cublas_us"] for r in rs], "k--", label="cuBLAS dense")
        ax.plot(s, [r["ours_us"] for r in rs], "o-", label="ours (exact Top-K, selection incl.)")
        if rs[0]["teal_us"] is not None:
            ax.plot(s, [r["teal_us"] for r in rs], "s-", label="TEAL-style threshold (same kernel)")
        ax.plot(s, [r["ideal_us"] for r in rs], "g:", label="ideal (kept bytes / copy BW)")
        ax.set_title(shape, fontsize=9)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("us per call")
        ax.set_ylim(bottom=0)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{rec['gpu']}, {rec['dtype']}, batch 1, CUDA graphs, copy BW "
                 f"{rec['copy_bandwidth_Bps'] / 1e12:.2f} TB/s", fontsize=10)
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/gemv-h200-bf16.json")
