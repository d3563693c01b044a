"""Every Triton kernel specialization compiles for a real GPU (sm_90: H100/H200), on a machine
without one: the other kernel tests run in Triton's interpreter here, which accepts programs
that the compiler rejects (see mgr_engine.kernels.compile_check)."""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend (ptxas)")


@pytest.mark.parametrize("arch", [90])
def test_every_kernel_compiles_for_the_gpu(arch, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # interpreted kernels do not compile
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    run = subprocess.run([sys.executable, "-m", "mgr_engine.kernels.compile_check", "--arch", str(arch)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    print(run.stdout)
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and "_kernel |" in line]
    # three kernels in float32 and float64, each row with its count of specializations
    assert len(rows) == 6, run.stdout
    assert all(int(row.split("|")[3]) > 0 for row in rows)


def test_interpreter_is_refused(monkeypatch):
    from mgr_engine.kernels import compile_check

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        compile_check.compile_all()
