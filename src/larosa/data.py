"""Text sources: WikiText-2 raw rows (same rows as the HF hub dataset), calibration batches, eval windows.

Source order for WikiText-2 (first that exists wins):
  1. an explicit ``data_dir`` argument (CLI ``--data-dir``),
  2. the ``LAROSA_DATA_DIR`` environment variable,
  3. a ``shared/data`` folder next to the project checkout (where CI and our machines keep it),
  4. the hub, through ``datasets.load_dataset('wikitext', 'wikitext-2-raw-v1')`` (needs ``datasets``
     and a network).
Local sources come first so that a run is deterministic and works offline; they hold the same rows
as the hub (checked by byte counts against the published ``num_bytes``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LarosaError

SPLITS = ("train", "validation", "test")
# Published HF `num_bytes` of wikitext-2-raw-v1 splits: sum(row bytes) + 4 * rows.
_NUM_BYTES = {"test": 1_305_088, "validation": 1_159_288, "train": 11_061_717}
_RAW_NAMES = {"test": "wiki.test.raw", "validation": "wiki.valid.raw", "train": "wiki.train.raw"}
_ARROW_NAMES = {
    s: f"wikitext_document_level-wikitext-2-raw-v1-{s}.arrow" for s in ("test", "validation", "train")
}


@dataclass(frozen=True)
class TextSource:
    """Rows of one split plus where they came from."""

    split: str
    rows: list[str]
    origin: str  # "local:<path>" or "hub:wikitext/wikitext-2-raw-v1"

    @property
    def text(self) -> str:
        return "\n\n".join(self.rows)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def describe(self) -> dict:
        return {"dataset": "wikitext-2-raw-v1", "split": self.split, "rows": len(self.rows),
                "origin": self.origin, "sha256_joined": self.sha256}


def rows_from_raw(raw: str) -> list[str]:
    """HF `wikitext` rows from a raw file: each line + "\\n", blank (whitespace-only) lines as ""."""
    return [line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1]]


def rows_num_bytes(rows: list[str]) -> int:
    return sum(len(r.encode()) for r in rows) + 4 * len(rows)


def _project_shared_data() -> Path | None:
    """`shared/data` next to the checkout that holds this package (src/larosa -> repo -> ..)."""
    here = Path(__file__).resolve()
    for parent in list(here.parents)[:5]:
        cand = parent.parent / "shared" / "data"
        if (cand / "wikitext2").is_dir():
            return cand
    return None


def _wikitext_dir(root: Path) -> Path:
    """Accept either a data root (holding `wikitext2/`) or the wikitext folder itself."""
    return root / "wikitext2" if (root / "wikitext2").is_dir() else root


def _read_local(root: Path, split: str) -> list[str] | None:
    d = _wikitext_dir(root)
    raw_file = d / _RAW_NAMES[split]
    if raw_file.is_file():
        return rows_from_raw(raw_file.read_text(encoding="utf-8"))
    arrow_file = d / _ARROW_NAMES[split]
    if arrow_file.is_file():
        import pyarrow as pa

        with pa.OSFile(str(arrow_file)) as f:
            pages = pa.ipc.open_stream(f).read_all().column("page").to_pylist()
        return rows_from_raw(" \n" + "\n".join(pages))
    return None


def candidate_dirs(data_dir: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """Local directories in priority order, as (label, path)."""
    out: list[tuple[str, Path]] = []
    if data_dir is not None:
        p = Path(data_dir)
        if not p.is_dir():
            raise LarosaError(f"--data-dir {p} is not a directory")
        out.append(("data_dir", p))
    env = os.environ.get("LAROSA_DATA_DIR")
    if env:
        out.append(("LAROSA_DATA_DIR", Path(env)))
    shared = _project_shared_data()
    if shared is not None:
        out.append(("shared", shared))
    return out


def load_wikitext(split: str = "test", data_dir: str | os.PathLike | None = None,
                  allow_hub: bool = True) -> TextSource:
    """WikiText-2 raw rows of `split`, exactly as `load_dataset('wikitext','wikitext-2-raw-v1')`."""
    if split not in SPLITS:
        raise LarosaError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    tried: list[str] = []
    for label, root in candidate_dirs(data_dir):
        rows = _read_local(root, split)
        if rows is None:
            tried.append(f"{label}={root} (no {split} split)")
            continue
        if rows_num_bytes(rows) != _NUM_BYTES[split]:
            raise LarosaError(
                f"WikiText-2 {split} in {root} has {rows_num_bytes(rows)} bytes, expected "
                f"{_NUM_BYTES[split]}: the file is not the wikitext-2-raw-v1 {split} split"
            )
        return TextSource(split, rows, f"local:{_wikitext_dir(root)}")
    if allow_hub and not os.environ.get("HF_DATASETS_OFFLINE") and not os.environ.get("HF_HUB_OFFLINE"):
        try:
            import datasets  # noqa: F401
        except ImportError:
            tried.append("hub (package `datasets` not installed: pip install datasets)")
        else:
            try:
                ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
                return TextSource(split, list(ds["text"]), "hub:wikitext/wikitext-2-raw-v1")
            except Exception as exc:  # network or hub failure: report below
                tried.append(f"hub ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
    else:
        tried.append("hub (disabled: offline)")
    raise LarosaError(
        f"no WikiText-2 {split!r} split found; tried: {'; '.join(tried) or 'nothing'}. "
        "Pass --data-dir DIR (a folder with wikitext2/wiki.test.raw) or set LAROSA_DATA_DIR."
    )


def tokenize_source(tokenizer, source: TextSource) -> torch.Tensor:
    """Tokenize the "\\n\\n"-joined text once; returns a 1-D LongTensor."""
    ids = tokenizer(source.text, return_tensors="pt", add_special_tokens=True).input_ids
    return ids[0]


def windows(ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens: (n_windows, seqlen); the tail is dropped."""
    if seqlen < 2:
        raise LarosaError(f"seqlen must be >= 2, got {seqlen}")
    n = ids.numel() // seqlen
    if n == 0:
        raise LarosaError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def calibration_batches(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`nsamples` random (seeded) windows of `seqlen` tokens from a token stream: (nsamples, seqlen)."""
    if ids.numel() <= seqlen:
        raise LarosaError(f"calibration text has {ids.numel()} tokens, need more than {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
