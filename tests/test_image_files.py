"""Image and transform files (mgr_engine.itk_io): outputs are written atomically, detached
headers included, with the mode the umask gives."""

import os

import numpy as np
import pytest

from helpers import oblique_image, smooth_volume
from mgr_engine import itk_io
from mgr_engine.errors import OutputWriteError

itk = pytest.importorskip("itk")

DETACHED_HEADER = [".mhd", ".nhdr"]  # the voxels go to a .raw file beside the header


def image_of(dtype):
    volume = smooth_volume((7, 9, 6), seed=3) * 200 - 50
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    array = np.clip(volume, info.min, info.max) if info else volume
    return oblique_image(array.astype(dtype), (1.2, 0.9, 2.5), (-10.0, 4.5, 7.25), (0.1, -0.2, 0.3))


# ------------------------------------------------------------------ atomic output


@pytest.mark.parametrize("suffix", DETACHED_HEADER)
def test_a_detached_header_names_the_data_file_beside_it(tmp_path, suffix):
    image = image_of(np.int16)
    itk_io.write_image(image, tmp_path / f"out{suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"out{suffix}", "out.raw"])
    assert b"out.raw" in (tmp_path / f"out{suffix}").read_bytes()
    np.testing.assert_array_equal(itk.array_from_image(itk.imread(str(tmp_path / f"out{suffix}"))),
                                  itk.array_view_from_image(image))


def test_outputs_get_the_mode_the_umask_gives(tmp_path):
    umask = os.umask(0o027)
    try:
        itk_io.write_image(image_of(np.float32), tmp_path / "image.nii.gz")
        itk_io.write_image(image_of(np.float32), tmp_path / "image.mhd")
        itk_io.write_transform(itk.IdentityTransform[itk.D, 3].New(), tmp_path / "transform.h5")
    finally:
        os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"image.nii.gz": 0o640, "image.mhd": 0o640, "image.raw": 0o640, "transform.h5": 0o640}


def test_an_output_replaces_the_old_file(tmp_path):
    target = tmp_path / "image.nrrd"
    itk_io.write_image(image_of(np.uint8), target)
    itk_io.write_image(image_of(np.float32), target)
    assert type(itk.imread(str(target))) is itk.Image[itk.F, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["image.nrrd"]


def test_a_writer_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(OutputWriteError, match="nothing was written"):
        with itk_io.atomic_output(tmp_path / "image.nii.gz"):
            pass
    assert list(tmp_path.iterdir()) == []
