"""`larosa` command line: each subcommand is a thin layer over the Python API."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from .errors import LarosaError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="LaRoSA: layerwise rotated sparse activation for faster LLM decoding.")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate models (perplexity).")
app.add_typer(eval_app, name="eval")

ModelOpt = typer.Option("smollm2-135m", "--model", "-m",
                        help="named offline model, .gguf file, HF folder or hub id")
DeviceOpt = typer.Option("auto", help="auto | cpu | cuda[:N]")
DtypeOpt = typer.Option("auto", help="auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16 | float16")
DataDirOpt = typer.Option(None, "--data-dir", help="folder holding wikitext2/ (else $LAROSA_DATA_DIR, "
                          "../shared/data next to the checkout, then the hub)")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(text).name or text)[:60]


def _default_out(kind: str, model: str) -> Path:
    return Path("runs") / f"{kind}-{_slug(model)}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def _fail(exc: LarosaError) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command("models")
def models_cmd() -> None:
    """List the named offline models and whether they are installed."""
    from .models import model_table
    from .report import markdown_table

    typer.echo(markdown_table(model_table(), ["name", "installed", "notes", "install"]))


@eval_app.command("ppl")
def eval_ppl(
    model: str = ModelOpt,
    windows: Optional[int] = typer.Option(None, help="evaluate only the first N windows"),
    seqlen: int = typer.Option(2048, help="window length (capped at the model's context)"),
    batch_size: int = typer.Option(1, help="windows per forward pass"),
    split: str = typer.Option("test", help="WikiText-2 split"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    data_dir: Optional[Path] = DataDirOpt,
    out: Optional[Path] = typer.Option(None, help="result JSON (default runs/ppl-<model>-<time>.json)"),
) -> None:
    """WikiText-2 perplexity, paper protocol: non-overlapping windows, mean NLL over all tokens."""
    try:
        from .api import evaluate_ppl

        res = evaluate_ppl(model=model, windows=windows, seqlen=seqlen, batch_size=batch_size,
                           split=split, device=device, dtype=dtype, data_dir=data_dir,
                           out=out or _default_out("ppl", model))
    except LarosaError as exc:
        _fail(exc)
        return
    typer.echo(res["table"])
    typer.echo(f"wrote {res['path']}")


@app.command("demo")
def demo(
    model: str = ModelOpt,
    windows: int = typer.Option(2, help="evaluation windows of 2048 tokens"),
    data_dir: Optional[Path] = DataDirOpt,
) -> None:
    """The main job on the embedded default model (dense perplexity for now)."""
    eval_ppl(model=model, windows=windows, seqlen=2048, batch_size=1, split="test", device="auto",
             dtype="auto", data_dir=data_dir, out=None)


def main() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except LarosaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
