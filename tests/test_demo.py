"""`make demo`'s script runs end to end (at the quick network size)."""

import pytest

from mgr_engine import demo

pytest.importorskip("itk")


def test_demo_quick_writes_every_output(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in printed.splitlines()[0]
    for name in ("transform.h5", "warped_moving.nii.gz", "displacement.nii.gz", "jacobian.nii.gz"):
        assert (tmp_path / name).stat().st_size > 0
    assert "Dice" in printed and "negative Jacobian" in printed
