import locale
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

# Without a GPU the Triton kernels' tests run in Triton's interpreter; the variable must be set
# before the kernels are decorated (imported). With a GPU they run compiled, unless the
# environment asks otherwise.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def locale_kept():
    """Fail the test that leaves the process's locale changed (ITK's VTK reader and GDCM's series
    writer set it to "C"), instead of a later test that reads a file as ASCII (inductor's
    templates: UnicodeDecodeError), and put it back for the tests after it."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    now = locale.setlocale(locale.LC_ALL)
    if now != saved:
        locale.setlocale(locale.LC_ALL, saved)
        pytest.fail(f"the test left the process's locale at {now!r} (it was {saved!r})")
