import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

# Without a GPU the Triton kernels' tests run in Triton's interpreter; the variable must be set
# before the kernels are decorated (imported). With a GPU they run compiled, unless the
# environment asks otherwise.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
