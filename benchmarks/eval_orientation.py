#!/usr/bin/env python
"""What a moving image stored in another voxel order costs a registration, and what
``match_orientation`` gives back: `make demo`'s pair, its moving image and labels stored as
shipped, with x and y reversed (LPS <-> RAS) and with y and z swapped (axial <-> coronal), each
registered by the bundled compact model without IO, with and without ``match_orientation``.
Prints Dice per tissue after registration (and the unregistered pair's).

    python benchmarks/eval_orientation.py
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STORAGE_ORDERS = [  # (what, axes, flips) as mgr_engine.itk_io.reordered_image takes them
    ("as shipped", (0, 1, 2), (False, False, False)),
    ("x and y reversed", (0, 1, 2), (True, True, False)),
    ("y and z swapped, one reversed", (0, 2, 1), (False, False, True)),
]


def main() -> None:
    import mgr_engine
    from mgr_engine import itk_io
    from mgr_engine.demo import SAMPLE_DIR

    logging.getLogger("mgr_engine").setLevel(logging.ERROR)  # the warning this measures, once per order
    fixed, moving, fixed_labels, moving_labels = (itk_io.load_image(SAMPLE_DIR / f"{name}.nii.gz") for name in
                                                  ("fixed_t1", "moving_t2", "fixed_labels", "moving_labels"))
    engine = mgr_engine.Engine(model="compact", device="cpu")
    print("| the moving image stored | axes | match_orientation | Dice CSF / GM / WM after | unregistered |")
    print("|---|---|---|--:|--:|")
    for what, axes, flips in STORAGE_ORDERS:
        stored = itk_io.reordered_image(moving, axes, flips)
        labels = itk_io.reordered_image(moving_labels, axes, flips)
        codes = itk_io.axis_codes(itk_io.ImageGrid.of(stored).direction)
        for match in (False, True):
            result = engine.register(fixed, stored, io_iterations=None, match_orientation=match)
            before, after = result.dice(fixed_labels, labels)
            print(f"| {what} | {codes} | {match} | {' / '.join(f'{after[k]:.3f}' for k in sorted(after))} | "
                  f"{' / '.join(f'{before[k]:.3f}' for k in sorted(before))} |")


if __name__ == "__main__":
    main()
