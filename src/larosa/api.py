"""Python API: the functions the CLI calls, usable directly."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .data import load_wikitext, tokenize_source
from .evaluate import perplexity_from_ids
from .models import load_model
from .record import run_record, write_json
from .report import markdown_table


def evaluate_ppl(model: str = "smollm2-135m", windows: int | None = None, seqlen: int = 2048,
                 batch_size: int = 1, split: str = "test", device: str = "auto", dtype: str = "auto",
                 data_dir: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
                 progress: bool = True, loaded=None) -> dict:
    """Dense (or saved sparsified) model perplexity; writes a JSON run record when `out` is given."""
    t0 = time.perf_counter()
    source = load_wikitext(split, data_dir)
    lm = loaded or load_model(model, device=device, dtype=dtype)
    load_s = time.perf_counter() - t0
    ids = tokenize_source(lm.tokenizer, source)
    res = perplexity_from_ids(lm.model, ids, seqlen=seqlen, n_windows=windows,
                              batch_size=batch_size, progress=progress)
    row = {"model": model, "windows": f"{res.windows_used} of {res.windows_total}",
           "seqlen": res.seqlen, "tokens": res.tokens_scored, "dtype": lm.info.get("dtype"),
           "device": lm.info.get("device"), "ppl": round(res.ppl, 4), "eval_s": round(res.seconds, 1)}
    record = run_record(
        "eval ppl",
        {"model": model, "windows": windows, "seqlen": seqlen, "batch_size": batch_size, "split": split,
         "device": lm.info.get("device"), "dtype": lm.info.get("dtype")},
        protocol="wikitext2 raw, rows joined with '\\n\\n', non-overlapping windows, mean NLL over all "
                 "predicted tokens",
        model=lm.describe(), data=source.describe(), result=res.to_dict(),
        load_seconds=load_s, wall_seconds=time.perf_counter() - t0,
    )
    path = write_json(out, record) if out is not None else None
    return {"result": res, "record": record, "table": markdown_table([row]), "path": path}
