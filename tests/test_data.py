from pathlib import Path

import pytest
import torch

from larosa.data import (calibration_batches, candidate_dirs, load_wikitext, rows_from_raw,
                         rows_num_bytes, windows)
from larosa.errors import LarosaError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "wikitext2").is_dir(), reason="shared/data not present")


def test_rows_from_raw_matches_hf_convention():
    raw = " \n = Title = \n \n text line \n"
    assert rows_from_raw(raw) == ["", " = Title = \n", "", " text line \n"]


@needs_shared
@pytest.mark.parametrize("split,rows,nbytes,title", [
    ("test", 4358, 1_305_088, " = Robert Boulter = \n"),
    ("validation", 3760, 1_159_288, " = Homarus gammarus = \n"),
])
def test_local_wikitext_matches_published_counts(split, rows, nbytes, title):
    src = load_wikitext(split, SHARED)
    assert len(src.rows) == rows
    assert rows_num_bytes(src.rows) == nbytes
    # Each split opens with an empty row and then its first article's title (HF row order).
    assert src.rows[:2] == ["", title]


@needs_shared
def test_arrow_and_raw_give_same_rows(tmp_path):
    d = tmp_path / "wikitext2"
    d.mkdir()
    arrow = "wikitext_document_level-wikitext-2-raw-v1-test.arrow"
    (d / arrow).write_bytes((SHARED / "wikitext2" / arrow).read_bytes())
    assert load_wikitext("test", tmp_path).rows == load_wikitext("test", SHARED).rows


def _fake_dir(root: Path, text: str) -> Path:
    (root / "wikitext2").mkdir(parents=True)
    (root / "wikitext2" / "wiki.test.raw").write_text(text)
    return root


def test_fallback_order_explicit_then_env_then_shared(tmp_path, monkeypatch):
    a = _fake_dir(tmp_path / "a", "x\n")
    b = _fake_dir(tmp_path / "b", "y\n")
    monkeypatch.setenv("LAROSA_DATA_DIR", str(b))
    labels = [label for label, _ in candidate_dirs(a)]
    assert labels[:2] == ["data_dir", "LAROSA_DATA_DIR"]
    monkeypatch.delenv("LAROSA_DATA_DIR")
    labels = [label for label, _ in candidate_dirs(None)]
    assert "LAROSA_DATA_DIR" not in labels and "data_dir" not in labels


def test_wrong_file_is_rejected_not_silently_used(tmp_path):
    d = _fake_dir(tmp_path, "not wikitext\n")
    with pytest.raises(LarosaError, match="not the wikitext-2-raw-v1 test split"):
        load_wikitext("test", d)


def test_missing_split_and_bad_inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr("larosa.data._project_shared_data", lambda: None)
    monkeypatch.delenv("LAROSA_DATA_DIR", raising=False)
    with pytest.raises(LarosaError, match="no WikiText-2 'train' split found"):
        load_wikitext("train", tmp_path)
    with pytest.raises(LarosaError, match="unknown split"):
        load_wikitext("dev")
    with pytest.raises(LarosaError, match="not a directory"):
        load_wikitext("test", tmp_path / "nope")


def test_env_var_source_is_used(tmp_path, monkeypatch):
    monkeypatch.setattr("larosa.data._NUM_BYTES", {"test": 6, "validation": 0, "train": 0})
    d = _fake_dir(tmp_path, "x\n")
    monkeypatch.setenv("LAROSA_DATA_DIR", str(d))
    src = load_wikitext("test")
    assert src.rows == ["x\n"] and src.origin.startswith("local:")


def test_windows_drop_tail_and_validate():
    ids = torch.arange(10)
    w = windows(ids, 3)
    assert w.shape == (3, 3) and w[-1].tolist() == [6, 7, 8]
    with pytest.raises(LarosaError):
        windows(ids, 11)
    with pytest.raises(LarosaError):
        windows(ids, 1)


def test_calibration_batches_seeded():
    ids = torch.arange(1000)
    a, b = calibration_batches(ids, 4, 16, seed=3), calibration_batches(ids, 4, 16, seed=3)
    assert torch.equal(a, b) and a.shape == (4, 16)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 15, dtype=torch.long))
