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


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise LarosaError(f"{what} must be numbers separated by commas, got {text!r}") from None


def _held_out(text: str) -> tuple[int, int]:
    try:
        n, t = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise LarosaError(f"--held-out must look like 4x512 (sequences x tokens), got {text!r}") from None
    return n, t


def _sites(text: Optional[str]) -> Optional[dict]:
    if not text:
        return None
    out = {}
    for part in text.split(","):
        name, _, val = part.partition("=")
        if not val:
            raise LarosaError(f"--sites must look like attn_in=0.3,attn_out=0.5,...; got {part!r}")
        out[name.strip()] = float(val)
    return out


FormsOpt = typer.Option("dense", "--form", help="comma list of: dense, official, fused, topk")
SparsityOpt = typer.Option("0.4", "--sparsity", "-p", help="nominal sparsity p (comma list for a sweep)")
RotationOpt = typer.Option("layer", help="fused form rotation level: layer | block | model")
SplitOpt = typer.Option("0.8,1.2", "--split", help="sparsity split (h1/h3, h2/h4) as multiples of p")
RotFileOpt = typer.Option(None, "--rotations", help="rotations file from `larosa calibrate` "
                          "(default: cached calibration, computed on first use)")
CalSamplesOpt = typer.Option(16, help="calibration sequences")
CalSeqlenOpt = typer.Option(2048, help="calibration sequence length")
DensePrefillOpt = typer.Option(False, help="leave multi-token (prefill) calls dense")
SelectionOpt = typer.Option("magnitude", help="magnitude (paper) | weighted (|x_i| x consumer column norm)")
QBasisOpt = typer.Option("free", help="fused form: Q from the gamma-free (free) or gamma-scaled (gamma) input")


@eval_app.command("ppl")
def eval_ppl(
    model: str = ModelOpt,
    windows: Optional[int] = typer.Option(None, help="evaluate only the first N windows"),
    seqlen: int = typer.Option(2048, help="window length (capped at the model's context)"),
    batch_size: int = typer.Option(1, help="windows per forward pass"),
    split: str = typer.Option("test", help="WikiText-2 split"),
    form: str = FormsOpt,
    sparsity: str = SparsityOpt,
    rotation: str = RotationOpt,
    split_coef: str = SplitOpt,
    rotations: Optional[Path] = RotFileOpt,
    cal_samples: int = CalSamplesOpt,
    cal_seqlen: int = CalSeqlenOpt,
    dense_prefill: bool = DensePrefillOpt,
    selection: str = SelectionOpt,
    q_basis: str = QBasisOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    data_dir: Optional[Path] = DataDirOpt,
    out: Optional[Path] = typer.Option(None, help="result JSON (default runs/ppl-<model>-<time>.json)"),
) -> None:
    """WikiText-2 perplexity, paper protocol; dense and/or LaRoSA forms at one or more sparsities."""
    try:
        from .api import evaluate_ppl

        forms = tuple(f.strip() for f in form.split(",") if f.strip())
        for f in forms:
            if f not in ("dense", "official", "fused", "topk"):
                raise LarosaError(f"unknown form {f!r}; use dense, official, fused or topk")
        coef = _floats(split_coef, "--split")
        if len(coef) != 2:
            raise LarosaError("--split takes two numbers, e.g. 0.8,1.2")
        res = evaluate_ppl(model=model, windows=windows, seqlen=seqlen, batch_size=batch_size,
                           split=split, device=device, dtype=dtype, data_dir=data_dir,
                           out=out or _default_out("ppl", model), forms=forms,
                           sparsities=_floats(sparsity, "--sparsity"), rotation=rotation,
                           split_coef=coef, rotations_path=rotations, cal_samples=cal_samples,
                           cal_seqlen=cal_seqlen, dense_prefill=dense_prefill, selection=selection,
                           q_basis=q_basis)
    except LarosaError as exc:
        _fail(exc)
        return
    typer.echo(res["table"])
    typer.echo(f"wrote {res['path']}")


@app.command("calibrate")
def calibrate_cmd(
    model: str = ModelOpt,
    out: Path = typer.Option(..., "--out", "-o", help="rotations file to write (.safetensors)"),
    nsamples: int = CalSamplesOpt,
    seqlen: int = CalSeqlenOpt,
    seed: int = typer.Option(0, help="seed for picking calibration windows"),
    split: Optional[str] = typer.Option(None, help="train (default when available) or validation; never test"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    data_dir: Optional[Path] = DataDirOpt,
) -> None:
    """Compute the PCA rotations of every layer (float64 X^T X, 1 % damping, eigh) and save them."""
    try:
        from .api import calibrate
        from .models import load_model
        from .record import run_record, write_json

        lm = load_model(model, device=device, dtype=dtype)
        rot = calibrate(lm, nsamples, seqlen, seed, split, data_dir)
        path = rot.save(out)
        rec = write_json(Path(str(out) + ".json"), run_record("calibrate", {"model": model, "device": lm.info["device"],
                         "dtype": lm.info["dtype"]}, model=lm.describe(), rotations=rot.meta))
    except LarosaError as exc:
        _fail(exc)
        return
    typer.echo(f"wrote {path} ({len(rot.q)} rotations, {rot.meta['tokens_per_layer']} tokens/layer, "
               f"{rot.meta['seconds']} s) and {rec}")


@app.command("sparsify")
def sparsify_cmd(
    model: str = ModelOpt,
    out: Path = typer.Option(..., "--out", "-o", help="output model folder"),
    sparsity: float = typer.Option(0.4, "--sparsity", "-p", help="nominal sparsity p"),
    form: str = typer.Option("auto", help="auto (default: fused or topk, whichever has the lower perplexity on "
                             "held-out calibration tokens; README: ablation) | fused (the paper's deployable form) | "
                             "official (simulation) | topk (no rotation)"),
    rotation: str = RotationOpt,
    split_coef: str = SplitOpt,
    sites: Optional[str] = typer.Option(None, help="explicit per-site sparsities, e.g. "
                                        "attn_in=0.3,attn_out=0.5,mlp_in=0.3,mlp_out=0.5 (overrides -p)"),
    rotations: Optional[Path] = RotFileOpt,
    cal_samples: int = CalSamplesOpt,
    cal_seqlen: int = CalSeqlenOpt,
    dense_prefill: bool = DensePrefillOpt,
    selection: str = SelectionOpt,
    q_basis: str = QBasisOpt,
    target_pw: Optional[float] = typer.Option(None, "--target-pw", help="solve the plan for this "
                                              "parameter-weighted sparsity instead of -p"),
    search_split: bool = typer.Option(False, "--search-split", help="Algorithm 1: search the split for "
                                      "--target-pw on held-out calibration tokens"),
    per_block: bool = typer.Option(False, "--per-block", help="with --search-split: attention and MLP "
                                   "get their own split"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    data_dir: Optional[Path] = DataDirOpt,
) -> None:
    """Calibrate, transform and save a LaRoSA model as an HF-style folder (safetensors + config)."""
    try:
        from .api import sparsify

        coef = _floats(split_coef, "--split")
        res = sparsify(model, out, sparsity, form, rotation, coef, _sites(sites), rotations, cal_samples,
                       cal_seqlen, dense_prefill=dense_prefill, device=device, dtype=dtype, data_dir=data_dir,
                       selection=selection, q_basis=q_basis, target_pw=target_pw, search=search_split,
                       per_block=per_block)
    except LarosaError as exc:
        _fail(exc)
        return
    rep = res["sparsity"]
    if res.get("form_choice") is not None:
        ch = res["form_choice"]
        typer.echo("held-out ppl: " + ", ".join(f"{f} {v:.3f}" for f, v in ch.objective.items())
                   + f" -> form {ch.form}")
        form = ch.form
    if res.get("search") is not None:
        from .report import markdown_table

        typer.echo(markdown_table([{"a_attn": r["a_attn"], "a_mlp": r["a_mlp"], "p": round(r["p"], 4),
                                    "param_weighted": round(r["param_weighted"], 4),
                                    "held-out ppl": round(r["objective"], 3)} for r in res["search"].table]))
        typer.echo(f"best split a = {res['search'].best} (paper: 0.8)")
    typer.echo(f"wrote {res['path']}: form={form} rotation={rotation} sites={rep['sites']} "
               f"unweighted={rep['unweighted']} parameter-weighted={rep['param_weighted']}")


@app.command("compare")
def compare_cmd(
    model: str = ModelOpt,
    methods: str = typer.Option("dense,larosa-official,larosa-fused,topk,teal,cats", help="comma list of: "
                                "dense, larosa-official, larosa-fused, topk, teal, cats, larosa-searched, "
                                "larosa-searched-weighted, larosa-searched-weighted-block, larosa-greedy, teal-greedy, "
                                "larosa-fused-gammaq, larosa-fused-weighted, topk-weighted, larosa-auto"),
    targets: str = typer.Option("0.25,0.4,0.5", help="parameter-weighted sparsities"),
    windows: Optional[int] = typer.Option(40, help="evaluation windows (first N)"),
    seqlen: int = typer.Option(2048, help="window length"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (cells/, results.json, table.md, ppl.png)"),
    zeroshot_limit: int = typer.Option(0, help="also score the 7 zero-shot tasks through lm-eval on the first "
                                       "N items of each (0: skip)"),
    cal_samples: int = CalSamplesOpt,
    cal_seqlen: int = CalSeqlenOpt,
    held_out: str = typer.Option("4x512", help="calibration tokens (sequences x length) for the split search "
                                 "and the greedy allocations"),
    render_only: bool = typer.Option(False, "--render-only", help="rebuild results.json, table.md and ppl.png "
                                     "from the finished cells; compute nothing"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    data_dir: Optional[Path] = DataDirOpt,
) -> None:
    """Dense, LaRoSA, un-rotated Top-K, TEAL and CATS at equal parameter-weighted sparsity (resumable)."""
    try:
        from .compare import run_compare

        res = run_compare(model, tuple(m.strip() for m in methods.split(",") if m.strip()),
                          _floats(targets, "--targets"), out, windows, seqlen, cal_samples, cal_seqlen,
                          data_dir=data_dir, device=device, dtype=dtype, zeroshot_limit=zeroshot_limit,
                          held_out=_held_out(held_out), render_only=render_only)
    except LarosaError as exc:
        _fail(exc)
        return
    typer.echo(res["table"])
    typer.echo(f"wrote {res['out']}/results.json, table.md, ppl.png")


@app.command("demo")
def demo(
    model: str = ModelOpt,
    windows: int = typer.Option(2, help="evaluation windows of 2048 tokens"),
    sparsity: float = typer.Option(0.4, "--sparsity", "-p", help="nominal sparsity p"),
    cal_samples: int = CalSamplesOpt,
    prompt: str = typer.Option("The history of the Roman Empire", help="prompt for the generated sample"),
    data_dir: Optional[Path] = DataDirOpt,
) -> None:
    """The LaRoSA demo: calibrate, sparsify, dense vs sparse perplexity, a generated sample."""
    try:
        from .api import evaluate_ppl
        from .demo import generate_side_by_side

        res = evaluate_ppl(model=model, windows=windows, data_dir=data_dir, forms=("dense", "official", "fused"),
                           sparsities=(sparsity,), cal_samples=cal_samples,
                           out=_default_out("demo", model))
        typer.echo(res["table"])
        typer.echo(f"wrote {res['path']}")
        typer.echo(generate_side_by_side(res["loaded"], res["rotations"], sparsity, prompt))
    except LarosaError as exc:
        _fail(exc)


@app.command("generate")
def generate_cmd(
    model: str = ModelOpt,
    prompt: str = typer.Option(..., "--prompt", help="text to continue"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="tokens to generate"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_k: int = typer.Option(0, help="sample from the k most likely tokens (0 = all)"),
    seed: int = typer.Option(0, help="sampling seed"),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", "-p", help="sparsify on the fly: LaRoSA fused "
                                             "at nominal p (cached rotations); a saved model needs none"),
    cal_samples: int = typer.Option(4, help="calibration sequences when --sparsity calibrates"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
) -> None:
    """Stream a continuation of --prompt from the decode engine (dense, a saved LaRoSA/TEAL model, or -p)."""
    try:
        from .generate import stream_generate

        stats = stream_generate(model, prompt, max_new_tokens, temperature, top_k, seed, sparsity, cal_samples,
                                device, dtype, write=lambda t: (sys.stdout.write(t), sys.stdout.flush()))
    except LarosaError as exc:
        _fail(exc)
        return
    typer.secho(f"\n[{stats['tokens']} tokens, {stats['tok_s']:.1f} tok/s decode, prefill {stats['prefill_ms']:.0f} ms, "
                f"{stats['what']}]", fg=typer.colors.BRIGHT_BLACK, err=True)


bench_app = typer.Typer(no_args_is_help=True, help="Speed benchmarks.")
app.add_typer(bench_app, name="bench")


@bench_app.command("decode")
def bench_decode_cmd(
    shape: Optional[str] = typer.Option(None, help="random weights at a real shape: llama2-7b | llama3-8b | "
                                        "mistral-7b | qwen2.5-7b"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="or a real (small) model by name/path"),
    methods: str = typer.Option("dense,larosa,teal", help="comma list of dense, larosa, topk, teal"),
    sparsities: str = typer.Option("0.25,0.4,0.5,0.75", help="nominal LaRoSA sparsities (TEAL at the same "
                                   "parameter-weighted sparsity)"),
    prompt_len: int = typer.Option(128, help="prompt tokens (random ids)"),
    gen_lens: str = typer.Option("128", help="generation lengths, comma list"),
    batch: int = typer.Option(1, help="batch size"),
    dtype: str = typer.Option("bfloat16", help="bfloat16 | float16 | float32"),
    device: str = DeviceOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="folder for results.json, table.md, decode.png"),
    fuse: str = typer.Option("auto", help="engine fusions for Top-K sites: auto (both on CUDA, none on the "
                             "CPU), none, or a comma list of norm (RMSNorm and select in one kernel), residual "
                             "(residual add in the GEMV epilogue)"),
) -> None:
    """Decode tokens/s, p50/p99 latency, GB/s vs copy bandwidth: dense vs LaRoSA vs TEAL."""
    try:
        from .bench import bench_decode, parse_fuse

        res = bench_decode(shape, model, tuple(m.strip() for m in methods.split(",") if m.strip()),
                           _floats(sparsities, "--sparsities"), prompt_len,
                           tuple(int(x) for x in _floats(gen_lens, "--gen-lens")), batch, dtype, device, out,
                           fuse=parse_fuse(fuse))
    except LarosaError as exc:
        _fail(exc)
        return
    from .bench import _header

    typer.echo(_header(res["setup"]))
    typer.echo(res["table"])
    if out is not None:
        typer.echo(f"wrote {out}/results.json, table.md, decode.png")


def main() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except LarosaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
