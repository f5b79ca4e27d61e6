"""Calibration: stream block inputs layer by layer through the dense model, PCA -> rotations.

For each layer l and block input (attn_in = h1, mlp_in = h3) two statistics are accumulated in float64:
  gamma: X = the norm module's output (gamma applied)  -> Q for the official form (the released code)
  free:  X = x / rms(x) (gamma-free)                     -> Q for the fused form (what it sparsifies)
H = sum X^T X (uncentred), H += 0.01 * mean(diag H) * I, Q = eigenvectors of H by descending eigenvalue,
each column's sign fixed so that its largest-magnitude entry is positive. A model-level Q (one for all
layers) comes from the sum of all layers' `free` statistics.

Layer by layer: the calibration sequences' hidden states are kept on the CPU (n * seqlen * d * 4 bytes),
and only one decoder layer plus its accumulators is on the device at a time.
Peak device memory ~ one layer's weights + 4 * d^2 * 8 B (accumulators) + one sequence's activations of
one layer; host memory ~ n * seqlen * d * 4 B (hidden states) + the rotations (2 * 2 * L * d^2 * 4 B).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ArchSpec, decoder_layers, get_submodule, norm_eps, spec_for
from .errors import LarosaError

CAL_SITES = ("attn_in", "mlp_in")
BASES = ("gamma", "free")
FORMAT_VERSION = 1


@dataclass
class CalibrationConfig:
    nsamples: int = 16
    seqlen: int = 2048
    seed: int = 0
    split: str = "validation"  # train when available; never test
    damping: float = 0.01

    def __post_init__(self) -> None:
        if self.split == "test":
            raise LarosaError("calibrating on the test split would leak into evaluation; use train or validation")
        if self.nsamples < 1 or self.seqlen < 2:
            raise LarosaError(f"need nsamples >= 1 and seqlen >= 2, got {self.nsamples}, {self.seqlen}")


def pca(h: torch.Tensor, damping: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a damped Gram matrix: (eigenvalues desc, Q with eigenvectors as columns)."""
    h = h.to(torch.float64)
    h = h + damping * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    vals, vecs = torch.linalg.eigh(h)
    vals, vecs = vals.flip(0), vecs.flip(1)
    idx = vecs.abs().argmax(dim=0)
    signs = torch.sign(vecs[idx, torch.arange(vecs.shape[1], device=vecs.device)])
    signs[signs == 0] = 1
    return vals, vecs * signs


def model_fingerprint(model: nn.Module, spec: ArchSpec) -> dict:
    """Identity of a (dense) model: class, dims, and a hash of its first layer's norm scales."""
    cfg = model.config
    layer0 = decoder_layers(model, spec)[0]
    w = get_submodule(layer0, spec.attn_norm).weight.detach().float().cpu()
    digest = hashlib.sha256(torch.round(w * 1000).to(torch.int64).numpy().tobytes()).hexdigest()[:16]
    return {"class": type(model).__name__, "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size, "norm_hash": digest}


@dataclass
class Rotations:
    """Q matrices keyed '{layer}.{site}.{basis}' (plus 'model.free'), eigenvalues alike, and metadata."""

    q: dict[str, torch.Tensor]
    eigvals: dict[str, torch.Tensor]
    meta: dict

    def get(self, layer: int | None, site: str, basis: str = "free") -> torch.Tensor:
        key = "model.free" if layer is None else f"{layer}.{site}.{basis}"
        if key not in self.q:
            raise LarosaError(f"rotations file has no {key!r} (was it calibrated with this option?)")
        return self.q[key]

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"q.{k}": v.contiguous() for k, v in self.q.items()}
        tensors.update({f"eig.{k}": v.contiguous() for k, v in self.eigvals.items()})
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"larosa_rotations": json.dumps(self.meta)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> "Rotations":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise LarosaError(f"rotations file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta_s = (f.metadata() or {}).get("larosa_rotations")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for bad headers/lengths
            raise LarosaError(f"rotations file {path} is truncated or corrupted ({exc})") from exc
        if meta_s is None:
            raise LarosaError(f"{path} is a safetensors file but not a larosa rotations file")
        meta = json.loads(meta_s)
        rot = cls({k[2:]: v for k, v in tensors.items() if k.startswith("q.")},
                  {k[4:]: v for k, v in tensors.items() if k.startswith("eig.")}, meta)
        rot.check_orthogonal(path)
        if model is not None:
            rot.check_model(model)
        return rot

    def check_orthogonal(self, where: object = "rotations", tol: float = 1e-3) -> None:
        for key, q in self.q.items():
            q64 = q.to(torch.float64)
            err = (q64.T @ q64 - torch.eye(q.shape[1], dtype=torch.float64)).abs().max().item()
            if not err < tol:  # also catches NaN
                raise LarosaError(f"{where}: Q[{key}] is not orthogonal (max |Q^T Q - I| = {err:.3g}); "
                                  "the file is corrupted")

    def check_model(self, model: nn.Module) -> None:
        want = self.meta.get("model", {})
        have = model_fingerprint(model, spec_for(model))
        diff = {k: (want.get(k), v) for k, v in have.items() if want.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: file {a} vs model {b}" for k, (a, b) in diff.items())
            raise LarosaError(f"rotations were calibrated on a different model ({detail}); "
                              "re-run `larosa calibrate` for this model")


class _Recorder(nn.Module):
    """Stands in for a decoder layer for one pass: records its inputs and returns them unchanged."""

    def __init__(self, inner: nn.Module, store: list, keep_all: bool):
        super().__init__()
        self.inner, self.store, self.keep_all = inner, store, keep_all
        if hasattr(inner, "attention_type"):
            self.attention_type = inner.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        if self.keep_all or not self.store:
            self.store.append((hidden_states.detach(), args, kwargs))
        return hidden_states


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _layer_inputs(model: nn.Module, spec: ArchSpec, batches: torch.Tensor, device) -> tuple[list, list]:
    """Hidden inputs of layer 0 for every sequence, and each layer's call arguments (from sequence 0)."""
    layers = decoder_layers(model, spec)
    stores = [[] for _ in layers]
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _Recorder(layer, stores[i], keep_all=(i == 0))
    try:
        with torch.no_grad():
            for row in batches:
                model(input_ids=row[None].to(device), use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    hidden0 = [s[0].cpu() for s in stores[0]]
    call_args = [(s[0][1], s[0][2]) for s in stores]
    return hidden0, call_args


def stream_layers(model: nn.Module, batches: torch.Tensor, attach, finish, progress: bool = True,
                  desc: str = "layers") -> None:
    """Run calibration sequences through the dense model one decoder layer at a time.

    For layer i, `attach(i, layer)` registers measuring hooks and returns their handles; every sequence
    goes through the layer (its output becomes the next layer's input); the hooks are removed and
    `finish(i)` turns what they gathered into results.
    """
    spec = spec_for(model)
    device = next(model.parameters()).device
    hidden, call_args = _layer_inputs(model, spec, batches, device)
    layers = decoder_layers(model, spec)
    for i in tqdm(range(len(layers)), desc=desc, unit="layer", disable=not progress):
        layer = layers[i]
        hooks = attach(i, layer)
        args, kwargs = call_args[i]
        try:
            with torch.no_grad():
                for s, h in enumerate(hidden):
                    hidden[s] = _first(layer(h.to(device), *args, **kwargs)).cpu()
        finally:
            for hk in hooks:
                hk.remove()
        finish(i)


class _Accumulator:
    def __init__(self, d: int, device):
        self.h = {b: torch.zeros(d, d, dtype=torch.float64, device=device) for b in BASES}
        self.tokens = 0

    def add(self, gamma_out: torch.Tensor, free: torch.Tensor) -> None:
        for basis, x in (("gamma", gamma_out), ("free", free)):
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            self.h[basis].addmm_(x.T, x)
        self.tokens += gamma_out.numel() // gamma_out.shape[-1]


def _free_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@torch.no_grad()
def calibrate(model: nn.Module, batches: torch.Tensor, config: CalibrationConfig | None = None,
              progress: bool = True, data: dict | None = None) -> Rotations:
    """PCA rotations of every layer's block inputs, computed layer by layer on the dense model."""
    config = config or CalibrationConfig(nsamples=batches.shape[0], seqlen=batches.shape[1])
    spec = spec_for(model)
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    d = model.config.hidden_size
    q: dict[str, torch.Tensor] = {}
    eig: dict[str, torch.Tensor] = {}
    model_h = torch.zeros(d, d, dtype=torch.float64)
    accs: dict[str, _Accumulator] = {}

    def attach(i: int, layer: nn.Module) -> list:
        accs.clear()
        hooks = []
        for site in CAL_SITES:
            accs[site] = _Accumulator(d, device)
            norm = get_submodule(layer, spec.site_norm(site))
            eps = norm_eps(norm, spec)

            def hook(mod, inputs, output, acc=accs[site], eps=eps):
                acc.add(output, _free_norm(inputs[0], eps))

            hooks.append(norm.register_forward_hook(hook))
        return hooks

    def finish(i: int) -> None:
        nonlocal model_h
        for site in CAL_SITES:
            for basis in BASES:
                vals, vecs = pca(accs[site].h[basis], config.damping)
                key = f"{i}.{site}.{basis}"
                q[key], eig[key] = vecs.float().cpu(), vals.float().cpu()
            model_h += accs[site].h["free"].cpu()

    stream_layers(model, batches, attach, finish, progress, "calibrate")
    tokens = batches.numel()
    vals, vecs = pca(model_h, config.damping)
    q["model.free"], eig["model.free"] = vecs.float(), vals.float()
    meta = {"format_version": FORMAT_VERSION, "config": asdict(config), "model": model_fingerprint(model, spec),
            "arch": spec.name, "tokens_per_layer": tokens, "data": data or {},
            "seconds": round(time.perf_counter() - t0, 2)}
    return Rotations(q, eig, meta)
