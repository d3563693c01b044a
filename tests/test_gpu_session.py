"""benchmarks/gpu_session.sh, checked where a CPU can. The GPU machine has no itk: the tests
its first stage names must collect without it (one module that imports itk fails the
collection, and then not one test of the stage runs, in a GPU session that comes rarely), and
the engine's tensor path, which its benchmarks time, must run without it, and so must
``mgr-engine info``, which it records."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def gpu_stage_tests() -> list:
    """The files and test ids of gpu_session.sh's ``stage tests`` command (with its continuation lines)."""
    script = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    command = re.search(r"^stage tests (?:.*\\\n)*.*", script, re.M).group(0)
    return [word for word in command.split() if word.startswith("tests/")]


def without_itk(folder: Path) -> dict:
    """The environment of a child process in which ``import itk`` fails, as on the GPU machine."""
    (folder / "itk").mkdir()
    (folder / "itk" / "__init__.py").write_text('raise ModuleNotFoundError("no itk, as on the GPU machine", name="itk")\n')
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))


def test_the_gpu_sessions_tests_collect_without_itk(tmp_path):
    tests = gpu_stage_tests()
    assert "tests/test_kernels_warp.py" in tests and any("::" in test for test in tests), tests
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", *tests],
                         cwd=ROOT, env=without_itk(tmp_path), capture_output=True, text=True, timeout=300)
    # an import error, or a named test that does not exist, gives a nonzero exit
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


TENSOR_PATH = """
import sys
import torch
sys.path.insert(0, "tests")
from helpers import random_network, smooth_volume
from mgr_engine import Engine
from mgr_engine.model import official_state_dict
import mgr_engine.export

net = random_network((72, 72, 72), narrow=True, seed=1, displacement_scale=0.3)
engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu")
moving, fixed = (torch.from_numpy(smooth_volume((72, 72, 72), seed))[None, None] for seed in (1, 2))
engine.predict_map(moving, fixed)
engine.instance_optimize(moving, fixed, iterations=1, similarity="mind", progress=False)
from mgr_engine import cli
cli.main(["info"])  # what the session records in device.txt
print("ran without itk")
"""


def test_the_tensor_path_runs_without_itk(tmp_path):
    run = subprocess.run([sys.executable, "-c", TENSOR_PATH], cwd=ROOT, env=without_itk(tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ran without itk" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
