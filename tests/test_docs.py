"""The README's environment-variable table lists every LAROSA_* variable the package reads, and nothing else."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_lists_every_environment_variable():
    read = set()
    for path in (ROOT / "src" / "larosa").rglob("*.py"):
        read |= set(re.findall(r"LAROSA_[A-Z0-9_]+", path.read_text()))
    text = (ROOT / "README.md").read_text()
    section = text.split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(LAROSA_[A-Z0-9_]+)` \|", section, flags=re.M))
    assert len(read) >= 20  # the scan found the package's variables
    assert read == listed, {"read but not listed": sorted(read - listed), "listed but not read": sorted(listed - read)}
