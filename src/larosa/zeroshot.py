"""Zero-shot accuracy through lm-evaluation-harness (scoring is lm-eval's, not ours).

The paper's 7 tasks: ARC-e, ARC-c, PIQA, BoolQ, HellaSwag, OpenBookQA, WinoGrande; the paper's mean uses
acc_norm where the task has it, acc otherwise. Offline, each task is an lm-eval task config built here
that reads the local JSONL files in `shared/data` (formats in its SOURCES.md) with lm-eval's own prompt
text; HellaSwag's 6-line text file is converted to JSONL once (cached). Online, with `hub=True`, the
standard lm-eval task names are used instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .data import candidate_dirs
from .errors import LarosaError

TASKS = ("arc_easy", "arc_challenge", "piqa", "boolq", "hellaswag", "openbookqa", "winogrande")
NORM_TASKS = {"arc_easy", "arc_challenge", "piqa", "hellaswag", "openbookqa"}
_FILES = {"arc_easy": "arc_easy/arc_easy.jsonl", "arc_challenge": "arc_challenge/arc_challenge.jsonl",
          "piqa": "piqa/piqa.jsonl", "boolq": "boolq/boolq.jsonl", "openbookqa": "openbookqa/openbook_qa.jsonl",
          "winogrande": "winogrande/winogrande.jsonl"}
_TEXT = {  # lm-eval's prompt for each task, in terms of the llm-foundry JSONL fields (SOURCES.md)
    "arc_easy": "{{query}}\nAnswer:", "arc_challenge": "{{query}}\nAnswer:", "piqa": "{{query}}Answer:",
    "boolq": "{{query[9:]}}\nAnswer:", "openbookqa": "{{query}}", "hellaswag": "{{query}}",
}


def data_root(data_dir=None) -> Path:
    for _, root in candidate_dirs(data_dir):
        if (root / "piqa").is_dir():
            return root
    raise LarosaError("zero-shot task files not found: pass --data-dir (a folder with piqa/, arc_easy/, ...) "
                      "or set LAROSA_DATA_DIR")


def hellaswag_jsonl(root: Path, cache: Path) -> Path:
    """Convert llama.cpp's 6-line HellaSwag text (context, gold, 4 endings) to JSONL once."""
    out = cache / "hellaswag_val.jsonl"
    if out.is_file():
        return out
    lines = (root / "hellaswag" / "hellaswag_val_full.txt").read_text(encoding="utf-8").split("\n")
    n = len(lines) // 6
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(n):
            ctx, gold, *endings = lines[6 * i: 6 * i + 6]
            f.write(json.dumps({"query": ctx, "choices": [" " + e.strip() if not e.startswith(" ") else e
                                                           for e in endings], "gold": int(gold)}) + "\n")
    os.replace(tmp, out)
    return out


def task_config(name: str, path: Path) -> dict:
    base = {"task": f"larosa_{name}", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test", "output_type": "multiple_choice",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    if name in NORM_TASKS:
        base["metric_list"].append({"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True})
    if name == "winogrande":  # lm-eval's partial scoring: score the continuation after each filled context
        base.update({"doc_to_text": "gold", "doc_to_choice": "context_options", "doc_to_target": "{{continuation}}"})
    else:
        base.update({"doc_to_text": _TEXT[name], "doc_to_choice": "choices", "doc_to_target": "gold"})
        if name == "hellaswag":
            base["target_delimiter"] = ""  # endings carry their leading space
    return base


def local_tasks(names=TASKS, data_dir=None) -> list[dict]:
    from .models import cache_dir

    root = data_root(data_dir)
    out = []
    for name in names:
        if name not in TASKS:
            raise LarosaError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
        path = hellaswag_jsonl(root, cache_dir() / "tasks") if name == "hellaswag" else root / _FILES[name]
        out.append(task_config(name, path))
    return out


def paper_mean(per_task: dict[str, dict]) -> float:
    vals = [r.get("acc_norm") if t in NORM_TASKS and r.get("acc_norm") is not None else r["acc"]
            for t, r in per_task.items()]
    return sum(vals) / len(vals)


def evaluate_zeroshot(model, tokenizer, tasks=TASKS, limit: int | None = None, batch_size: int = 8,
                      data_dir=None, hub: bool = False, task_configs: list[dict] | None = None) -> dict:
    """lm-eval accuracy of an in-memory model; returns per-task acc/acc_norm, items scored and the mean."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise LarosaError("zero-shot evaluation needs lm-eval: pip install 'larosa[eval]'") from exc
    configs = task_configs if task_configs is not None else (list(tasks) if hub else local_tasks(tasks, data_dir))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    res = lm_eval.simple_evaluate(model=lm, tasks=configs, limit=limit, log_samples=False,
                                  bootstrap_iters=0, verbosity="ERROR")
    per_task = {}
    for key, r in res["results"].items():
        name = key.removeprefix("larosa_")
        per_task[name] = {"acc": r.get("acc,none"), "acc_norm": r.get("acc_norm,none"),
                          "items": res.get("n-samples", {}).get(key, {}).get("effective")}
    return {"tasks": per_task, "mean": paper_mean(per_task), "limit": limit,
            "lm_eval_version": getattr(lm_eval, "__version__", None)}
