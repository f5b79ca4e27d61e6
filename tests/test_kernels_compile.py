"""The Triton kernels compile for Hopper (sm_90) on this CPU-only machine: the interpreter that runs them
in the other tests does not type-check (tests/hopper_compile.py says more)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from larosa.kernels import HAVE_TRITON

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")


def test_kernels_compile_for_hopper(tmp_path):
    script = Path(__file__).with_name("hopper_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "src"), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900,
                         check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    sys.path.insert(0, str(script.parent))
    try:
        from hopper_compile import CASES
    finally:
        sys.path.pop(0)
    assert run.stdout.count(": ok") == len(CASES) and f"compiled {len(CASES)}" in run.stdout
