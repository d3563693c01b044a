"""Image and transform files (mgr_engine.itk_io): reading and writing NIfTI, NRRD and MetaImage
through their own ImageIO class gives what itk.imread/itk.imwrite give (a .nii.gz compressed by
our own gzip_file, the same bytes once decompressed); outputs are written atomically, detached
headers included, with the mode the umask gives."""

import gzip
import importlib.util
import locale
import logging
import os
import struct
import sys
import zlib

import numpy as np
import pytest

from helpers import oblique_image, smooth_volume
from mgr_engine import itk_io
from mgr_engine.errors import ImageReadError, OutputWriteError

itk = pytest.importorskip("itk")

SINGLE_FILE = [".nii", ".nii.gz", ".nrrd", ".mha"]
DETACHED_HEADER = [".mhd", ".nhdr"]  # the voxels go to a .raw file beside the header
DTYPES = [np.uint8, np.int16, np.uint16, np.float32, np.float64]


def image_of(dtype):
    volume = smooth_volume((7, 9, 6), seed=3) * 200 - 50
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    array = np.clip(volume, info.min, info.max) if info else volume
    return oblique_image(array.astype(dtype), (1.2, 0.9, 2.5), (-10.0, 4.5, 7.25), (0.1, -0.2, 0.3))


def file_content(path):
    """A file's bytes, decompressed where it is gzipped: the same image compressed by ITK and by
    gzip_file differs in the compressed bytes only."""
    return gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()


def not_called(*args, **kwargs):
    raise AssertionError("ITK's own reader or writer was called")


def assert_same_image(a, b):
    assert type(a) is type(b)
    np.testing.assert_array_equal(itk.array_view_from_image(a), itk.array_view_from_image(b))
    np.testing.assert_array_equal(np.asarray(a.GetSpacing()), np.asarray(b.GetSpacing()))
    np.testing.assert_array_equal(np.asarray(a.GetOrigin()), np.asarray(b.GetOrigin()))
    np.testing.assert_array_equal(itk.array_from_matrix(a.GetDirection()), itk.array_from_matrix(b.GetDirection()))


@pytest.mark.parametrize("suffix", SINGLE_FILE + DETACHED_HEADER)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
def test_read_image_gives_what_imread_gives(tmp_path, suffix, dtype, monkeypatch):
    path = tmp_path / f"image{suffix}"
    itk.imwrite(image_of(dtype), str(path))
    expected = itk.imread(str(path))
    with monkeypatch.context() as patch:
        patch.setattr(itk, "imread", not_called)  # read by the format's own ImageIO
        read = itk_io.read_image(path)
        header = itk_io.read_image(path, header_only=True)
        grid = itk_io.load_image(path, grid_only=True)
    assert_same_image(read, expected)
    assert np.std(itk.array_view_from_image(read)) > 1  # not a blank image
    # a reference grid (mgr-engine warp's and jacobian's fixed image): the same grid, no voxels read
    assert type(header) is type(expected) and header.GetBufferedRegion().GetNumberOfPixels() == 0
    expected_grid = itk_io.ImageGrid.of(expected)
    assert isinstance(grid, itk_io.ImageGrid) and grid.size == expected_grid.size
    for field in ("spacing", "origin", "direction"):
        np.testing.assert_array_equal(getattr(grid, field), getattr(expected_grid, field))
    # an output on that grid has the image's geometry
    output, _ = itk_io.new_image(tuple(reversed(grid.size)), np.float32, grid)
    for get in ("GetSpacing", "GetOrigin"):
        np.testing.assert_array_equal(np.asarray(getattr(output, get)()), np.asarray(getattr(expected, get)()))
    np.testing.assert_array_equal(itk.array_from_matrix(output.GetDirection()), itk.array_from_matrix(expected.GetDirection()))


@pytest.mark.parametrize("suffix", SINGLE_FILE)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
def test_write_image_writes_what_imwrite_writes(tmp_path, suffix, dtype, monkeypatch):
    image = image_of(dtype)
    ours, theirs = tmp_path / f"ours{suffix}", tmp_path / f"theirs{suffix}"
    itk.imwrite(image, str(theirs))
    with monkeypatch.context() as patch:
        patch.setattr(itk, "imwrite", not_called)  # written by the format's own ImageIO
        itk_io.write_image(image, ours)
    assert file_content(ours) == file_content(theirs)


def test_a_displacement_field_is_written_and_read_as_itk_does(tmp_path, monkeypatch):
    field = itk_io.image_like(np.random.default_rng(0).standard_normal((5, 6, 7, 3)).astype(np.float32),
                              image_of(np.float32), is_vector=True)
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        itk.imwrite(field, str(tmp_path / f"theirs{suffix}"))
        expected = itk.imread(str(tmp_path / f"theirs{suffix}"))
        with monkeypatch.context() as patch:
            patch.setattr(itk, "imwrite", not_called)
            patch.setattr(itk, "imread", not_called)
            itk_io.write_image(field, tmp_path / f"field{suffix}")
            read = itk_io.read_image(tmp_path / f"field{suffix}")
        assert file_content(tmp_path / f"field{suffix}") == file_content(tmp_path / f"theirs{suffix}")
        assert_same_image(read, expected)
        assert type(read) is itk.Image[itk.Vector[itk.F, 3], 3]


NIFTI_SHAPES = [(7, 9, 6), (1, 5, 4), (3, 1, 1), (40, 33, 17)]  # (z, y, x): axes of one voxel too


def itk_nifti_bytes(image, tmp_path):
    """The .nii ITK's writer makes of ``image``."""
    itk.imwrite(image, str(tmp_path / "itk.nii"))
    return (tmp_path / "itk.nii").read_bytes()


@pytest.mark.parametrize("shape", NIFTI_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pixel", ["vector", *DTYPES, np.int32, np.uint32], ids=lambda t: getattr(t, "__name__", t))
def test_nifti_outputs_are_laid_out_here_as_itks_writer_lays_them_out(tmp_path, monkeypatch, pixel, shape):
    """A .nii(.gz) of the types the engine writes gets ITK's header (ITK writes it for an image of
    at most 2 voxels an axis) and the voxels straight from the image, byte for byte ITK's file:
    a displacement field's components one after another. Small write and gzip chunks make the
    reads cross the header's end and the components' boundaries at odd offsets."""
    rng = np.random.default_rng(sum(shape))
    grid = (1.2, 0.9, 2.5), (-10.0, 4.5, 7.25), (0.1, -0.2, 0.3)
    if pixel == "vector":
        image = itk_io.image_like(rng.standard_normal((*shape, 3)).astype(np.float32),
                                  oblique_image(np.zeros((1, 1, 1), np.float32), *grid), is_vector=True)
    else:
        image = oblique_image((rng.standard_normal(shape) * 100).astype(pixel), *grid)
    expected = itk_nifti_bytes(image, tmp_path)
    itk_writes = []
    write_with_itk = itk_io._write_with_itk
    monkeypatch.setattr(itk_io, "_write_with_itk", lambda im, path: itk_writes.append(im) or write_with_itk(im, path))
    monkeypatch.setattr(itk_io, "_NIFTI_WRITE_BYTES", 1000)
    monkeypatch.setattr(itk_io, "_GZIP_CHUNK_BYTES", 1001)
    for suffix in (".nii", ".nii.gz"):
        itk_io.write_image(image, tmp_path / f"ours{suffix}")
        assert file_content(tmp_path / f"ours{suffix}") == expected
    assert itk_writes and all(max(im.GetLargestPossibleRegion().GetSize()) <= 2 for im in itk_writes)


def test_nifti_bytes_read_any_range_of_the_file(tmp_path):
    image = itk_io.image_like(np.random.default_rng(1).standard_normal((5, 6, 7, 3)).astype(np.float32),
                              image_of(np.float32), is_vector=True)
    expected = itk_nifti_bytes(image, tmp_path)
    nifti = itk_io._NiftiBytes.of(image)
    assert nifti.size == len(expected)
    rng = np.random.default_rng(2)
    for start, length in [(0, 352), (351, 2), (352, 4), (353, 3), (0, 10**6), (len(expected) - 5, 100),
                          *rng.integers(0, len(expected), (200, 2))]:
        assert nifti.read(int(start), int(length)) == expected[start:start + length]


def test_other_nifti_outputs_are_written_by_itk(tmp_path):
    """An image _NiftiBytes does not lay out (here RGB) is written by ITK's writer, as before."""
    image = itk.Image[itk.RGBPixel[itk.UC], 3].New()
    image.SetRegions([6, 5, 4])
    image.Allocate()
    itk.array_view_from_image(image)[...] = np.random.default_rng(3).integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    assert itk_io._NiftiBytes.of(image) is None
    expected = itk_nifti_bytes(image, tmp_path)
    for suffix in (".nii", ".nii.gz"):
        itk_io.write_image(image, tmp_path / f"ours{suffix}")
        assert file_content(tmp_path / f"ours{suffix}") == expected


def test_an_axis_longer_than_nifti_1_holds_is_refused_as_itk_refuses_it(tmp_path):
    image = itk.image_from_array(np.zeros((1, 1, 32768), np.uint8))
    assert itk_io._NiftiBytes.of(image) is None
    for suffix in (".nii", ".nii.gz"):
        with pytest.raises(OutputWriteError, match="32768"):
            itk_io.write_image(image, tmp_path / f"ours{suffix}")
    assert list(tmp_path.iterdir()) == []


def test_other_formats_go_through_itk(tmp_path):
    """A format without its own entry (here VTK) is read and written by ITK's IO factories."""
    image = image_of(np.int16)
    itk_io.write_image(image, tmp_path / "image.vtk")
    encoding = locale.getpreferredencoding(False)
    read = itk_io.read_image(tmp_path / "image.vtk")
    # ITK's VTK reader sets the process's locale to "C"; read_image puts it back
    assert locale.getpreferredencoding(False) == encoding
    with itk_io._process_locale_kept():
        assert_same_image(read, itk.imread(str(tmp_path / "image.vtk")))


def write_dicom_series(folder, image, prefix="slice", number=None, description=None):
    """``image`` (int16) as a DICOM series, one file per slice, each with its position and the
    orientation (what a reader derives the geometry from), and the series' ``number`` and
    ``description`` where given; a new series UID each call."""
    from itk.ITKCommonBasePython import vectoritkMetaDataDictionary

    direction = itk.array_from_matrix(image.GetDirection())
    orientation = "\\".join(f"{v:.6f}" for v in [*direction[:, 0], *direction[:, 1]])
    slices = image.GetLargestPossibleRegion().GetSize()[2]
    dictionaries, kept = vectoritkMetaDataDictionary(), []
    for k in range(slices):
        dictionary = itk.MetaDataDictionary()
        dictionary["0020|0032"] = "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint([0, 0, k]))
        dictionary["0020|0037"] = orientation
        dictionary["0020|0013"] = str(k + 1)  # instance number
        dictionary["0008|0060"] = "CT"
        for tag, value in (("0020|0011", number), ("0008|103e", description)):
            if value is not None:
                dictionary[tag] = str(value)
        kept.append(dictionary)  # the vector holds pointers
        dictionaries.push_back(dictionary)
    writer = itk.ImageSeriesWriter[type(image), itk.Image[itk.SS, 2]].New()
    writer.SetInput(image)
    writer.SetFileNames([str(folder / f"{prefix}{i:03d}.dcm") for i in range(slices)])
    writer.SetImageIO(itk.GDCMImageIO.New())
    writer.SetMetaDataDictionaryArray(dictionaries)
    with itk_io._process_locale_kept():  # GDCM writing these leaves the process's locale at "C" (ASCII)
        writer.Update()


def test_a_dicom_series_folder_is_read_as_itk_reads_it(tmp_path, monkeypatch):
    """A folder of DICOM files (the reference's itk.imread reads its first series) loads as
    itk.imread loads it, through ITK's GDCM classes alone, oblique geometry included; with two
    series in the folder, the same one. ITK's locale is put back after GDCM."""
    first = image_of(np.int16)  # oblique
    write_dicom_series(tmp_path, first)
    second = itk.image_from_array(np.ascontiguousarray(itk.array_view_from_image(first)[::-1] + 7))
    second.SetSpacing((0.7, 0.8, 1.5))
    write_dicom_series(tmp_path, second, prefix="other")
    encoding = locale.getpreferredencoding(False)
    with monkeypatch.context() as patch:
        patch.setattr(itk, "imread", not_called)
        loaded = itk_io.load_image(tmp_path, "fixed")
        grid = itk_io.load_image(tmp_path, "fixed", grid_only=True)
    assert locale.getpreferredencoding(False) == encoding
    with itk_io._process_locale_kept():
        expected = itk.imread(str(tmp_path))
    assert_same_image(loaded, expected)
    assert grid.size == tuple(expected.GetLargestPossibleRegion().GetSize())
    np.testing.assert_array_equal(grid.direction, itk.array_from_matrix(expected.GetDirection()))
    written = next(image for image in (first, second)
                   if np.array_equal(itk.array_view_from_image(image), itk.array_view_from_image(loaded)))
    for get in ("GetSpacing", "GetOrigin"):  # the geometry written, as DICOM's decimal strings keep it
        np.testing.assert_allclose(np.asarray(getattr(loaded, get)()), np.asarray(getattr(written, get)()), atol=1e-5)
    np.testing.assert_allclose(itk.array_from_matrix(loaded.GetDirection()),
                               itk.array_from_matrix(written.GetDirection()), atol=1e-5)


def test_a_dicom_folder_of_several_series_says_which_it_reads(tmp_path, caplog):
    """itk.imread takes the first series of a folder without a word; a study's export often holds
    a localizer or a derived series beside the one meant, so the choice is logged with the others."""
    write_dicom_series(tmp_path, image_of(np.int16), number=3, description="T1 MPRAGE")
    with caplog.at_level(logging.WARNING, logger="mgr_engine"):
        itk_io.load_image(tmp_path, "fixed")
    assert not caplog.records  # one series: nothing to say
    localizer = itk.image_from_array(np.zeros((3, 9, 6), np.int16))
    write_dicom_series(tmp_path, localizer, prefix="scout", number=1, description="Localizer")
    with caplog.at_level(logging.WARNING, logger="mgr_engine"):
        read = itk_io.load_image(tmp_path, "fixed")
    [warning] = [record.getMessage() for record in caplog.records]
    taken = "series 1 'Localizer' (3 files)" if itk.size(read)[2] == 3 else "series 3 'T1 MPRAGE' (7 files)"
    assert "holds 2 DICOM series; reading the first, as itk.imread does: " + taken in warning
    assert "series 1 'Localizer' (3 files)" in warning and "series 3 'T1 MPRAGE' (7 files)" in warning


def test_a_dicom_file_gives_the_series_it_belongs_to(tmp_path, caplog):
    """A folder of several series: one file names its series (the way to choose one); that
    series is read whole, as from a folder holding it alone. A file alone in its series (a
    single slice, a multi-frame volume) is read as itk.imread reads it."""
    study, alone = tmp_path / "study", tmp_path / "t1_alone"
    study.mkdir()
    alone.mkdir()
    t1 = image_of(np.int16)  # oblique, 7 slices
    write_dicom_series(study, t1, number=3, description="T1 MPRAGE")
    write_dicom_series(alone, t1, number=3, description="T1 MPRAGE")
    localizer = itk.image_from_array((np.arange(3 * 9 * 6) % 50).astype(np.int16).reshape(3, 9, 6))
    write_dicom_series(study, localizer, prefix="scout", number=1, description="Localizer")
    expected = itk_io.load_image(alone, "fixed")
    with caplog.at_level(logging.INFO, logger="mgr_engine"):
        read = itk_io.load_image(study / "slice004.dcm", "fixed")
    assert_same_image(read, expected)
    assert "slice004.dcm is one file of a DICOM series: reading the series, series 3 'T1 MPRAGE' (7 files)" in (
        caplog.text)
    assert "holds 2 DICOM series" not in caplog.text  # chosen, not guessed
    grid = itk_io.load_image(study / "slice000.dcm", "fixed", grid_only=True)
    assert grid.size == tuple(itk.size(expected))
    np.testing.assert_array_equal(grid.origin, np.asarray(expected.GetOrigin()))
    scout = itk_io.load_image(study / "scout001.dcm", "moving")
    assert tuple(itk.size(scout)) == (6, 9, 3)
    np.testing.assert_array_equal(itk.array_view_from_image(scout), itk.array_view_from_image(localizer))
    # a file alone in its series: the file, as before
    single = tmp_path / "single"
    single.mkdir()
    (single / "only.dcm").write_bytes((alone / "slice002.dcm").read_bytes())
    with itk_io._process_locale_kept():
        assert_same_image(itk_io.load_image(single / "only.dcm", "fixed"), itk.imread(str(single / "only.dcm")))
    # what keys a kept fixed image: a slice's folder, whose other files can be rewritten alone
    assert itk_io.is_dicom_file(study / "slice004.dcm") and not itk_io.is_dicom_file(study)
    assert (study / "scout000.dcm") in itk_io.companion_files(study / "slice004.dcm")


def test_a_dicom_folder_falls_back_to_imread_without_the_wrapped_classes(tmp_path, monkeypatch):
    """Where this ITK has no such wrapped class, itk.imread reads the folder as before."""
    write_dicom_series(tmp_path, image_of(np.int16))
    expected = itk_io.read_image(tmp_path)
    monkeypatch.setattr(itk_io, "wrapped_class", lambda module, name: None)
    assert_same_image(itk_io.read_image(tmp_path), expected)


def test_a_2d_file_is_read_as_itk_reads_it(tmp_path):
    """Anything but a 3-D scalar file is left to itk.imread (load_image then refuses it)."""
    path = tmp_path / "slice.nii.gz"
    itk.imwrite(itk.image_from_array(np.arange(12, dtype=np.float32).reshape(3, 4)), str(path))
    assert itk_io.read_image(path).GetImageDimension() == 2


def test_itk_cannot_read_back_a_registration_transform_written_as_mat(tmp_path):
    """Why check_output_path refuses a transform's .mat: ITK writes a registration's transform (a
    composite with a displacement field) there, then cannot read it. If a later ITK reads it
    back, this test fails and the refusal can go."""
    fixed, moving = image_of(np.float32), image_of(np.int16)
    phi = np.stack(np.meshgrid(*[np.linspace(0, 1, n) for n in (5, 6, 4)], indexing="ij")).astype(np.float32)
    transform = itk_io.map_to_transform(phi + 0.02, moving, fixed)
    itk_io.write_transform(transform, tmp_path / "t.mat")  # no complaint
    with pytest.raises(ImageReadError, match="cannot read transform"):
        itk_io.read_transform(tmp_path / "t.mat")
    with pytest.raises(OutputWriteError, match="Matlab transform files cannot hold"):
        itk_io.check_output_path(tmp_path / "t.mat", "transform")
    itk_io.write_transform(transform, tmp_path / "t.tfm")  # the text format reads back
    point = fixed.TransformIndexToPhysicalPoint([1, 2, 3])
    assert np.allclose(itk_io.read_transform(tmp_path / "t.tfm").TransformPoint(point), transform.TransformPoint(point))


# ------------------------------------------------------------------ truncated NIfTI files


def nifti_file(tmp_path, suffix, writer="itk"):
    """An image written as NIfTI by ITK or by write_image (our gzip), with its path."""
    path = tmp_path / f"image{suffix}"
    image = image_of(np.float32)
    if writer == "itk":
        itk.imwrite(image, str(path))
    else:
        itk_io.write_image(image, path)
    return path, image


@pytest.mark.parametrize("suffix,writer", [(".nii", "itk"), (".nii.gz", "itk"), (".nii.gz", "ours")])
def test_a_truncated_nifti_file_is_refused_where_itk_reads_it(tmp_path, suffix, writer):
    """ITK's NIfTI reader fills what is missing with zeros without a word (NRRD and MetaImage
    readers refuse); load_image refuses it, cut anywhere after the header (a .nii one byte short
    too). A .nii.gz that lacks only its gzip trailer (8 bytes), every voxel there, loads."""
    path, _ = nifti_file(tmp_path, suffix, writer)
    data, whole = path.read_bytes(), itk_io.read_image(path)  # as NIfTI stores it (float32 spacing)
    for keep in (len(data) // 2, len(data) * 9 // 10) + ((len(data) - 1,) if suffix == ".nii" else ()):
        path.write_bytes(data[:keep])
        itk.imread(str(path))  # what the check is for: ITK reads it
        with pytest.raises(ImageReadError, match=r"moving image .* is truncated: it ends after \d+ of the"):
            itk_io.load_image(path, "moving")
    if suffix == ".nii.gz":
        path.write_bytes(data[:-8])
        assert_same_image(itk_io.load_image(path, "moving"), whole)
    path.write_bytes(data)
    assert_same_image(itk_io.load_image(path, "moving"), whole)


@pytest.mark.parametrize("suffix,writer", [(".nii", "itk"), (".nii.gz", "itk"), (".nii.gz", "ours")])
def test_a_complete_nifti_file_is_checked_by_its_header_and_gzip_trailer(tmp_path, suffix, writer, monkeypatch):
    """The check reads a few bytes: a complete .nii.gz is not decompressed for it."""
    path, _ = nifti_file(tmp_path, suffix, writer)
    monkeypatch.setattr(itk_io, "_gzip_bytes_before_its_end", not_called)
    itk_io.check_nifti_complete(path)
    field = itk_io.image_like(np.ones((7, 9, 6, 3), np.float32), image_of(np.float32), is_vector=True)
    itk_io.write_image(field, tmp_path / f"field{suffix}")  # a vector image: a fifth dimension of 3
    itk_io.check_nifti_complete(tmp_path / f"field{suffix}")


def test_a_header_and_voxel_file_pair_with_its_voxels_cut_short_is_refused(tmp_path):
    """A .hdr/.img pair (NIfTI "ni1", or Analyze): the .img is checked, whichever of the two is named."""
    itk.imwrite(image_of(np.int16), str(tmp_path / "pair.hdr"))
    whole = itk_io.read_image(tmp_path / "pair.hdr")
    for named in ("pair.hdr", "pair.img"):
        assert_same_image(itk_io.load_image(tmp_path / named), whole)
    voxels = (tmp_path / "pair.img").read_bytes()
    (tmp_path / "pair.img").write_bytes(voxels[:-2])  # one int16 voxel short
    itk.imread(str(tmp_path / "pair.hdr"))  # ITK reads it
    for named in ("pair.hdr", "pair.img"):
        with pytest.raises(ImageReadError, match=rf"its voxel file .*pair.img' ends after {len(voxels) - 2} of the "
                                                 rf"{len(voxels)} bytes"):
            itk_io.load_image(tmp_path / named)


def test_a_nifti_file_of_several_gzip_members_is_counted_whole(tmp_path):
    """bgzip and concatenated files have one gzip trailer per member, the last one's size not the
    file's: such a file is decompressed to count its bytes; complete it loads, short it is refused."""
    path, _ = nifti_file(tmp_path, ".nii.gz")
    content = gzip.decompress(path.read_bytes())
    members = gzip.compress(content[:1000]) + gzip.compress(content[1000:]) + bytes(16)  # zero padding after
    path.write_bytes(members)
    assert_same_image(itk_io.load_image(path), itk_io.read_image(path))
    path.write_bytes(gzip.compress(content[:1000]) + gzip.compress(content[1000:-5]))
    with pytest.raises(ImageReadError, match=rf"ends after {len(content) - 5} of the {len(content)} bytes"):
        itk_io.load_image(path)


def nifti1_header(order="<", dims=(3, 6, 9, 7, 1, 1, 1, 1), bitpix=32, offset=352.0, magic=b"n+1\0"):
    header = bytearray(348)
    struct.pack_into(order + "i", header, 0, 348)
    struct.pack_into(order + "8h", header, 40, *dims)
    struct.pack_into(order + "h", header, 72, bitpix)
    struct.pack_into(order + "f", header, 108, offset)
    header[344:348] = magic
    return bytes(header)


def nifti2_header(order="<", dims=(3, 6, 9, 7, 1, 1, 1, 1), bitpix=16, offset=544):
    header = bytearray(540)
    struct.pack_into(order + "i", header, 0, 540)
    header[4:12] = b"n+2\0\r\n\x1a\n"
    struct.pack_into(order + "h", header, 14, bitpix)
    struct.pack_into(order + "8q", header, 16, *dims)
    struct.pack_into(order + "q", header, 168, offset)
    return bytes(header)


def test_the_expected_size_comes_from_either_nifti_header_in_either_byte_order():
    for order in "<>":
        assert itk_io._nifti_file_bytes(nifti1_header(order)) == 352 + 6 * 9 * 7 * 4
        assert itk_io._nifti_file_bytes(nifti2_header(order)) == 544 + 6 * 9 * 7 * 2
    assert itk_io._nifti_file_bytes(nifti1_header(dims=(5, 6, 9, 7, 1, 3, 1, 1))) == 352 + 6 * 9 * 7 * 3 * 4
    # a pair's header: its voxel file holds the voxels from the offset on (Analyze 7.5 has no magic)
    for magic in (b"ni1\0", bytes(4)):
        assert itk_io._nifti_file_bytes(nifti1_header(offset=0.0, magic=magic), single_file=False) == 6 * 9 * 7 * 4
    assert itk_io._nifti_file_bytes(nifti1_header(), single_file=False) is None
    # what the check leaves to ITK's reader: a pair's header, nonsense, too few bytes
    for header in (nifti1_header(magic=b"ni1\0"), nifti1_header(dims=(0, 6, 9, 7, 1, 1, 1, 1)),
                   nifti1_header(dims=(3, 6, 0, 7, 1, 1, 1, 1)), nifti1_header(bitpix=12),
                   nifti1_header(offset=float("nan")), nifti1_header()[:300], b"", b"garbage" * 100):
        assert itk_io._nifti_file_bytes(header) is None


def test_a_header_only_read_does_not_check_the_voxels(tmp_path):
    """warp's and jacobian's fixed image gives its grid only (see read_image's header_only)."""
    path, image = nifti_file(tmp_path, ".nii.gz")
    path.write_bytes(path.read_bytes()[:-100])
    grid, expected = itk_io.load_image(path, "fixed", grid_only=True), itk_io.ImageGrid.of(image)
    assert grid.size == expected.size
    for name in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(getattr(grid, name), getattr(expected, name), rtol=1e-6, atol=1e-6)


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
        itk_io.write_transform(itk_io.identity_transform(), tmp_path / "transform.h5")
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
        with itk_io.staged_outputs() as stage:
            stage(tmp_path / "image.nii.gz")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ .nii.gz compression

DEFLATE = [pytest.param((zlib, 1), id="zlib"),
           pytest.param("isal", id="isal", marks=pytest.mark.skipif(
               importlib.util.find_spec("isal") is None, reason="isal is not installed"))]


def deflate_pair(name_or_pair):
    if name_or_pair == "isal":
        from isal import isal_zlib

        return isal_zlib, 2
    return name_or_pair


def repetitive_bytes(size, seed=0):
    """Random 10,000-byte blocks repeated: a chunk compresses only through back-references
    into the chunks before it."""
    block = np.random.default_rng(seed).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    return (block * (size // len(block) + 1))[:size]


@pytest.mark.parametrize("deflate", DEFLATE)
@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 5 * 4096 + 123, 70_000])
def test_gzip_file_writes_one_gzip_member_whatever_the_threads(tmp_path, monkeypatch, deflate, size):
    monkeypatch.setattr(itk_io, "_GZIP_CHUNK_BYTES", 4096)  # many chunks at small sizes
    data = repetitive_bytes(size)
    (tmp_path / "source").write_bytes(data)
    written = []
    for threads in (1, 3):
        itk_io.gzip_file(tmp_path / "source", tmp_path / f"out{threads}.gz", threads=threads,
                         deflate=deflate_pair(deflate))
        written.append((tmp_path / f"out{threads}.gz").read_bytes())
    assert written[0] == written[1]
    reader = zlib.decompressobj(16 + zlib.MAX_WBITS)  # a gzip member
    assert reader.decompress(written[0]) == data
    assert reader.eof and reader.unused_data == b""  # one member, nothing after it
    assert gzip.decompress(written[0]) == data


def test_gzip_threads_stay_within_omp_num_threads(monkeypatch):
    """A job limited by OMP_NUM_THREADS (torch and the C++ kernels follow it) compresses its
    outputs on no more threads either."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = itk_io.default_gzip_threads()
    assert 1 <= cores <= 16
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert itk_io.default_gzip_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1000")
    assert itk_io.default_gzip_threads() == cores
    for ignored in ("", "0", "two", "-3"):
        monkeypatch.setenv("OMP_NUM_THREADS", ignored)
        assert itk_io.default_gzip_threads() == cores


@pytest.mark.parametrize("deflate", DEFLATE)
def test_gzip_file_chunks_refer_back_into_the_chunks_before_them(tmp_path, monkeypatch, deflate):
    """Each chunk is primed with the 32 KiB before it, so the file is as small as one stream's:
    70 KB of a repeated 10 KB random block compress to about 10 KB, not to 70 KB."""
    monkeypatch.setattr(itk_io, "_GZIP_CHUNK_BYTES", 4096)
    (tmp_path / "source").write_bytes(repetitive_bytes(70_000))
    itk_io.gzip_file(tmp_path / "source", tmp_path / "out.gz", threads=2, deflate=deflate_pair(deflate))
    assert (tmp_path / "out.gz").stat().st_size < 15_000


@pytest.mark.parametrize("deflate", DEFLATE)
def test_gzip_file_shrinks_a_label_map_about_as_much_as_zlib_level_6(tmp_path, monkeypatch, deflate):
    """Chunks the fast deflate shrinks 8-fold are deflated again at zlib's level 6 (ITK's files
    are that small): runs of four labels, 8.7 KB by zlib level 6, 13-15 KB by the fast ones."""
    monkeypatch.setattr(itk_io, "_GZIP_CHUNK_BYTES", 4096)
    rng = np.random.default_rng(0)
    labels = np.repeat(rng.integers(0, 4, 20_000).astype(np.uint8), rng.integers(1, 60, 20_000)).tobytes()[:200_000]
    (tmp_path / "source").write_bytes(labels)
    itk_io.gzip_file(tmp_path / "source", tmp_path / "out.gz", threads=2, deflate=deflate_pair(deflate))
    assert gzip.decompress((tmp_path / "out.gz").read_bytes()) == labels
    assert (tmp_path / "out.gz").stat().st_size < 1.25 * len(zlib.compress(labels, 6))


def test_a_nii_gz_output_is_gzipped_by_gzip_file_with_nothing_left_beside_it(tmp_path, monkeypatch):
    calls = []
    gzip_file = itk_io.gzip_file
    monkeypatch.setattr(itk_io, "gzip_file", lambda *args, **kwargs: calls.append(args) or gzip_file(*args, **kwargs))
    itk_io.write_image(image_of(np.int16), tmp_path / "image.nii.gz")
    assert len(calls) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["image.nii.gz"]
    np.testing.assert_array_equal(itk.array_from_image(itk_io.read_image(tmp_path / "image.nii.gz")),
                                  itk.array_view_from_image(image_of(np.int16)))


def test_without_isal_the_standard_librarys_zlib_compresses(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "isal", None)  # import isal raises ImportError
    assert itk_io._fast_deflate() == (zlib, 1)
    itk_io.write_image(image_of(np.int16), tmp_path / "image.nii.gz")
    itk.imwrite(image_of(np.int16), str(tmp_path / "theirs.nii.gz"))
    assert file_content(tmp_path / "image.nii.gz") == file_content(tmp_path / "theirs.nii.gz")


def test_write_image_is_public(tmp_path):
    import mgr_engine

    mgr_engine.write_image(image_of(np.float32), tmp_path / "image.nii.gz")
    np.testing.assert_array_equal(itk.array_from_image(itk.imread(str(tmp_path / "image.nii.gz"))),
                                  itk.array_view_from_image(image_of(np.float32)))


def test_a_failed_compression_leaves_no_file(tmp_path, monkeypatch):
    def no_space(source, target, **kwargs):
        open(target, "wb").write(b"\x1f\x8b")  # half a file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(itk_io, "gzip_file", no_space)
    with pytest.raises(OutputWriteError, match="No space left on device"):
        itk_io.write_image(image_of(np.int16), tmp_path / "image.nii.gz")
    assert list(tmp_path.iterdir()) == []
