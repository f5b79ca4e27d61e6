"""Save / load transformed models as HF-style folders.

A folder holds `model.safetensors` (every weight, adapters and rotations included), `config.json` (the
dense model's HF config plus a `larosa` block: form, rotation level, sparsity plan, provenance) and the
tokenizer files. Loading rebuilds the dense architecture from the config, applies the same module swaps
with placeholder tensors, then fills every tensor from safetensors with a strict key check. Nothing is
unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import LarosaError
from .transform import LarosaConfig, build_structure

WEIGHTS = "model.safetensors"


def save(model: nn.Module, tokenizer, out_dir: str | os.PathLike, cfg: LarosaConfig) -> Path:
    """Write a transformed model folder atomically (tmp folder + rename)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not (out / "config.json").is_file():
            raise LarosaError(f"{out} exists, is not empty and is not a model folder; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    try:
        state, seen = {}, set()
        for k, v in model.state_dict().items():
            v = v.detach().contiguous().cpu()
            ptr = v.data_ptr()
            state[k] = v.clone() if ptr in seen else v  # tied weights are stored twice, loaded tied
            seen.add(ptr)
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "larosa": "1"})
        config = model.config.to_dict()
        config["larosa"] = cfg.to_dict()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_config(path: str | os.PathLike) -> tuple[dict, LarosaConfig]:
    path = Path(path)
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise LarosaError(f"{path}/config.json is missing or not JSON ({exc})") from exc
    if "larosa" not in raw:
        raise LarosaError(f"{path} is a plain HF model folder, not a larosa-transformed one")
    return raw, LarosaConfig.from_dict(raw.pop("larosa"))


def load(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None):
    """Load a folder written by `save`; returns a `LoadedModel` (model, tokenizer, source, info)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .models import LoadedModel, ModelSource

    path = Path(path)
    raw, cfg = read_config(path)
    hf_config = AutoConfig.for_model(**raw)
    saved_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(saved_dtype, str):
        saved_dtype = getattr(torch, saved_dtype)
    dtype = dtype or saved_dtype or torch.float32
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    build_structure(model, cfg)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise LarosaError(f"{weights} is missing")
    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise LarosaError(f"{weights} is truncated or corrupted ({exc})") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise LarosaError(f"{weights} does not match its config: {str(exc).splitlines()[0]}") from exc
    model.to(device).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    info = {"device": device, "dtype": str(dtype).removeprefix("torch."), "larosa": cfg.to_dict()}
    return LoadedModel(model, tok, ModelSource(str(path), "larosa_dir", path), info)
