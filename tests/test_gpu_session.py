"""benchmarks/gpu_session.sh, checked where a CPU can: the tests its first stage names must
collect without itk, which the GPU machine lacks. One module that imports itk fails the
collection, and then not one test of the stage runs, in a GPU session that comes rarely."""

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


def test_the_gpu_sessions_tests_collect_without_itk(tmp_path):
    (tmp_path / "itk").mkdir()
    (tmp_path / "itk" / "__init__.py").write_text(
        'raise ModuleNotFoundError("no itk, as on the GPU machine", name="itk")\n')
    tests = gpu_stage_tests()
    assert "tests/test_kernels_warp.py" in tests and any("::" in test for test in tests), tests
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", *tests],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    # an import error, or a named test that does not exist, gives a nonzero exit
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
