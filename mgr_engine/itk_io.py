"""ITK side of the engine: reading images, spatial metadata, transforms, atomic writes.

``itk`` is imported inside the functions only, so the tensor compute path (and
machines without itk, such as the GPU runner) never needs it.

Axis convention: a numpy array from ITK is indexed (z, y, x); the network's
tensors keep that order, and a displacement's channels (i, j, k) are reversed to
ITK's (x, y, z) when a transform is built.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import itertools
import logging
import os
import re
import shutil
import struct
import sys
import tempfile
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import (ImageReadError, InvalidImageError, MaskMismatchError, MissingDependencyError, OutputWriteError,
                     tilde_hint)

log = logging.getLogger(__name__)


def companion_files(path: Path) -> list:
    """The files besides ``path`` that an image read from it takes voxels from: an Analyze
    ``.hdr``'s ``.img`` (gzipped or not), a MetaImage ``.mhd``'s ``ElementDataFile`` (none where
    its voxels follow the header, ``LOCAL``, or are a list of slices), a DICOM file's folder (the
    other files of its series are among them, see :func:`load_image`); [] for other files."""
    suffix = path.suffix.lower()
    if suffix == ".hdr":
        return [path.with_suffix(".img"), path.with_suffix(".img.gz")]
    if suffix == ".mhd":
        with contextlib.suppress(OSError), open(path, encoding="latin-1") as f:  # latin-1: any byte decodes
            for line in itertools.islice(f, 64):  # ElementDataFile is the header's last field
                name, _, value = line.partition("=")
                if name.strip() == "ElementDataFile":
                    value = value.strip()
                    return [] if value.upper() in ("LOCAL", "LIST") or "%" in value else [path.parent / value]
        return []
    if is_dicom_file(path):
        with contextlib.suppress(OSError), os.scandir(path.parent) as entries:
            return sorted(Path(entry.path) for entry in entries if entry.is_file() and entry.name != path.name)
    return []


def image_files(path) -> list:
    """The files an image read from ``path`` takes its voxels from: a folder's files (a DICOM
    series), by name; else the file with those of its :func:`companion_files` that exist."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file())
    return [path, *(p for p in companion_files(path) if p.is_file())]


def is_dicom_file(path) -> bool:
    """Whether ``path`` is a file in DICOM's file format (a 128-byte preamble, then "DICM")."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def load_image(image, name: str = "input", grid_only: bool = False, on_grid_of=None):
    """An ``itk.Image`` from a path (a file ITK reads, or a folder of DICOM files: its first
    series, as ``itk.imread`` reads a folder), an ``itk.Image``, a ``SimpleITK.Image``, a nibabel
    image (``nibabel.load``'s NIfTI, MGH, ...), a numpy array or a torch tensor.

    A DICOM file that is one slice of a series in its folder gives the whole series (the way to
    choose one of a folder's several series); ``itk.imread`` would read the one slice, which no
    3-D registration can take. A DICOM file holding a volume (multi-frame) or alone in its
    series is read as ``itk.imread`` reads it.

    A SimpleITK or nibabel image keeps its voxels' type (or the nearest ITK wraps: int8 -> int16,
    ...) and its grid: a nibabel image's ``affine`` (RAS) turned into ITK's spacing, origin and
    direction (LPS), its array axes (i, j, k) ITK's (x, y, z), voxel scaling applied, trailing
    axes of one voxel dropped, as ITK reads the same NIfTI file, but for one case: a file whose
    sform and qform differ, both set, the sform's code not "scanner" (1), is placed by its qform
    by ITK and by its sform by nibabel's ``affine``, which mgr_engine follows. A FreeSurfer
    ``.mgz``/``.mgh`` file, which ITK does not read, is read by nibabel (installed with
    ``mgr_engine[freesurfer]``) as such an image. A numpy array is read like
    ``itk.image_from_array``: axes (z, y, x), 1 mm spacing, zero origin, identity direction, its
    type kept (a bool mask as uint8, float16 as float32, int8 and int64 as above); a torch tensor
    as the numpy array of its values (copied to the host).

    ``grid_only``: its :class:`ImageGrid` instead, for an image that gives only its grid (an
    output's reference); a NIfTI, NRRD, MetaImage or MGH file is then read up to its header,
    without its voxels (see :func:`read_image`).

    ``on_grid_of``: the image (``itk.Image`` or :class:`ImageGrid`) an array or tensor belongs to
    (a mask of the fixed image, a label map of the moving one): an array of its shape takes its
    spacing, origin and direction, which an array does not carry. An array of another shape is
    refused where that image's grid is not an array's (1 mm, zero origin, identity).
    """
    if _library_of(image) == "torch" and hasattr(image, "detach"):  # read as the numpy array of its values
        image = image.detach().cpu()
        image = (image.float() if str(image.dtype) == "torch.bfloat16" else image).numpy()
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.exists():
            raise ImageReadError(f"{name} image {str(path)!r} does not exist{tilde_hint(path)}; check the path.")
        if path.is_file() and path.stat().st_size == 0:
            raise ImageReadError(f"{name} image {str(path)!r} is empty (0 bytes); re-export or copy it again.")
        if _suffix(path).lower() in _MGH_SUFFIXES:
            return _read_mgh(path, name, grid_only)
        if not grid_only:  # the grid is read from the header alone
            check_nifti_complete(path, name)
        try:
            image = None
            if path.is_file() and is_dicom_file(path):  # one slice of a series: the series
                with _process_locale_kept():
                    image = _read_dicom_series(str(path.parent), grid_only, member=str(path))
            if image is None:
                image = read_image(path, header_only=grid_only)
        except Exception as exc:  # ITK raises RuntimeError/KeyError depending on the format
            if path.is_dir():
                images = sorted(f.name for f in path.iterdir() if _suffix(f).lower() in _IMAGE_FILE_SUFFIXES)
                raise ImageReadError(
                    f"{name} image folder {str(path)!r} holds no DICOM series ITK can read "
                    f"({exc.__class__.__name__}); give the folder of one DICOM series, or an image file "
                    + (f"such as {str(path / images[0])!r} ({len(images)} there)." if images
                       else "(NIfTI, NRRD, MHA).")) from exc
            reason = itk_reason(exc)
            advice = ("its header's axes are sheared (a NIfTI sform without a qform, say), which an ITK image's grid "
                      "cannot hold; resample it onto an unsheared grid first" if "orthonormal" in reason
                      else "use NIfTI, NRRD, MHA or another format ITK reads")
            raise ImageReadError(
                f"ITK cannot read the {name} image {str(path)!r} ({exc.__class__.__name__}: {reason}); {advice}."
            ) from exc
    elif isinstance(image, np.ndarray):
        if image.ndim > 3 and all(n == 1 for n in image.shape[:-3]):  # a torch-style (1, 1, D, H, W) batch
            raise InvalidImageError(f"{name} array has shape {image.shape}; pass its volume, "
                                    f"array[{', '.join('0' * (image.ndim - 3))}] (z, y, x).")
        if image.ndim != 3:
            raise not_a_volume(f"{name} array has {image.ndim} dimensions", image.ndim, " (z, y, x)")
        if np.iscomplexobj(image):  # numpy would keep the real part, with a ComplexWarning
            raise InvalidImageError(f"{name} array holds complex numbers; pass its magnitude, np.abs(array).")
        if image.dtype.kind not in "biuf":
            raise InvalidImageError(f"{name} array holds {image.dtype} values, not numbers; pass a numeric array.")
        # Its type kept, as a file's is (a label map warped comes back as labels, not float32), or
        # the nearest ITK wraps: a mask's bool as uint8, float16 as float32.
        array = image.view(np.uint8) if image.dtype == np.bool_ else image
        array = array.astype(np.float32) if array.dtype == np.float16 else array
        grid = None if on_grid_of is None else ImageGrid.of(on_grid_of)
        if grid is not None and array.shape == tuple(reversed(grid.size)):
            image = _image_on_grid(array, grid, name)
        elif grid is not None and not _is_array_grid(grid):
            raise InvalidImageError(
                f"{name} array has shape {array.shape}, not its image's {tuple(reversed(grid.size))} (z, y, x), "
                "and an array carries no spacing or origin to place it by; pass it as an itk.Image or a file "
                "with its grid, or resample it onto its image's grid.")
        else:
            image = _image_on_grid(array, ImageGrid(tuple(reversed(array.shape)), np.ones(3), np.zeros(3), np.eye(3)),
                                   name)
    elif _library_of(image) == "SimpleITK":
        image = _from_simpleitk(image, name)
    elif _library_of(image) == "nibabel" and hasattr(image, "affine") and hasattr(image, "dataobj"):
        image = _from_nibabel(image, name)
    if not hasattr(image, "GetImageDimension"):
        raise InvalidImageError(
            f"{name} image is a {type(image).__name__}; pass a file path, an itk.Image, a SimpleITK.Image, a "
            "nibabel image, a numpy array or a torch tensor."
        )
    _check_scalar_volume(name, image.GetImageDimension(), image.GetNumberOfComponentsPerPixel())
    return ImageGrid.of(image) if grid_only else image


def _check_itk_image(image, function: str) -> None:
    """:class:`InvalidImageError` unless ``image`` is an ``itk.Image``, saying what to do instead."""
    if hasattr(image, "GetLargestPossibleRegion"):
        return
    if isinstance(image, (str, os.PathLike)):
        advice = "an image file is read first (mgr_engine.itk_io.load_image or itk.imread)"
    elif isinstance(image, np.ndarray) or _library_of(image) == "torch":
        advice = ("an array carries no spacing, origin or direction: make it an itk.Image on its grid first "
                  "(itk.image_from_array, then SetSpacing, SetOrigin and SetDirection)")
    else:
        advice = "a result's outputs (warp, displacement_field, jacobian_determinant) are itk.Images"
    raise InvalidImageError(f"{function} takes an itk.Image, not a {type(image).__name__}: {advice}.")


def to_simpleitk(image):
    """A ``SimpleITK.Image`` copy of an ``itk.Image`` (a result's warped image, displacement field
    or Jacobian determinant): its voxels in their type, a vector image's components as a
    SimpleITK vector image, and its spacing, origin and direction. Public as
    ``mgr_engine.to_simpleitk``."""
    import itk

    try:
        import SimpleITK
    except ImportError:
        raise MissingDependencyError("to_simpleitk needs SimpleITK: pip install SimpleITK") from None
    _check_itk_image(image, "to_simpleitk")
    voxels = itk.array_view_from_image(image)
    converted = SimpleITK.GetImageFromArray(voxels, isVector=voxels.ndim > image.GetImageDimension())
    grid = ImageGrid.of(image)
    converted.SetSpacing(grid.spacing.tolist())
    converted.SetOrigin(grid.origin.tolist())
    converted.SetDirection(grid.direction.ravel().tolist())
    return converted


def to_nibabel(image):
    """A ``nibabel.Nifti1Image`` copy of an ``itk.Image`` (a result's warped image, displacement
    field or Jacobian determinant): what ``nibabel.load`` gives for the NIfTI file ITK writes of
    it. Voxels in their type on axes (x, y, z); the affine in RAS (ITK's LPS grid turned), as
    both sform and qform (code scanner); a vector image as ITK writes one, on axes (x, y, z, 1,
    components) with intent "vector" and its components unchanged (a displacement field's in
    LPS millimetres, as ANTs and ITK read them). Public as ``mgr_engine.to_nibabel``."""
    import itk

    try:
        import nibabel
    except ImportError:
        raise MissingDependencyError("to_nibabel needs nibabel: pip install nibabel (or 'mgr_engine[freesurfer]')") from None
    _check_itk_image(image, "to_nibabel")
    voxels = itk.array_from_image(image)  # a copy: the nibabel image outlives nothing of ITK's
    vector = voxels.ndim > image.GetImageDimension()
    voxels = voxels.transpose(2, 1, 0, 3)[:, :, :, None, :] if vector else voxels.transpose(2, 1, 0)
    affine = _ras_affine(ImageGrid.of(image))
    converted = nibabel.Nifti1Image(voxels, affine)
    converted.set_qform(affine, code="scanner")
    converted.set_sform(affine, code="scanner")
    converted.header.set_xyzt_units("mm", "sec")
    if vector:
        converted.header.set_intent("vector")
    return converted


def _ras_affine(grid: "ImageGrid") -> np.ndarray:
    """The 4x4 voxel-to-RAS affine of ``grid`` (ITK's LPS spacing, origin and direction turned),
    as NIfTI and MGH headers hold it."""
    affine = np.eye(4)
    affine[:3, :3] = _RAS_TO_LPS @ grid.direction * grid.spacing  # LPS -> RAS is its own inverse
    affine[:3, 3] = _RAS_TO_LPS @ grid.origin
    return affine


def not_a_volume(what: str, dimension: int, kind: str = "") -> InvalidImageError:
    """The error for an input of ``dimension`` axes (``what`` says which, and how it is) where a
    3-D volume is needed, with the advice that fits: a 4-D series is split, a slice is not a volume."""
    advice = ("split a 4-D series into 3-D frames first (one time point or echo each)" if dimension > 3 else
              "pass the whole volume, not one slice of it (for a DICOM series, its folder or any of its files)")
    return InvalidImageError(f"{what}; mgr_engine registers 3-D volumes{kind}: {advice}.")


def _check_scalar_volume(name: str, dimension: int, components: int) -> None:
    if dimension != 3:
        raise not_a_volume(f"{name} image is {dimension}-D", dimension)
    if components != 1:
        raise InvalidImageError(f"{name} image has {components} components per voxel; pass a scalar image.")


def _library_of(image) -> str:
    """The top-level package of ``image``'s class ("SimpleITK", "nibabel", ...): neither library
    is imported unless the image is one of its own."""
    return type(image).__module__.partition(".")[0]


def _from_simpleitk(image, name: str):
    """An ``itk.Image`` copy of a 3-D scalar ``SimpleITK.Image``: its voxels and its grid (both
    libraries hold ITK's (x, y, z) spacing, origin and row-major direction)."""
    import SimpleITK

    _check_scalar_volume(name, image.GetDimension(), image.GetNumberOfComponentsPerPixel())
    grid = ImageGrid(tuple(int(n) for n in image.GetSize()), np.asarray(image.GetSpacing(), dtype=np.float64),
                     np.asarray(image.GetOrigin(), dtype=np.float64),
                     np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3))
    return _image_on_grid(SimpleITK.GetArrayViewFromImage(image), grid, name)


_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _from_nibabel(image, name: str):
    """An ``itk.Image`` copy of a 3-D nibabel image, on the grid ITK reads from the same NIfTI
    file (:func:`_nibabel_grid`)."""
    grid = _nibabel_grid(image, name)
    array = np.asanyarray(image.dataobj)  # scl_slope and scl_inter applied, as ITK's reader applies them
    return _image_on_grid(array.reshape(grid.size).transpose(2, 1, 0), grid, name)


def _nibabel_grid(image, name: str) -> "ImageGrid":
    """The grid of a 3-D nibabel image as ITK reads it from the same NIfTI file: the affine's
    columns' lengths the spacing, its columns' directions the direction, its last column the
    origin, each turned from RAS to LPS; trailing axes of one voxel dropped."""
    shape = tuple(int(n) for n in image.shape)
    while len(shape) > 3 and shape[-1] == 1:  # ITK reads an (X, Y, Z, 1) NIfTI file as 3-D
        shape = shape[:-1]
    if len(shape) != 3:
        raise not_a_volume(f"{name} image has shape {shape}", len(shape), " of scalars")
    affine = _RAS_TO_LPS @ np.asarray(image.affine, dtype=np.float64)[:3]
    spacing = np.linalg.norm(affine[:, :3], axis=0)
    if not (np.isfinite(affine).all() and (spacing > 0).all()):
        raise InvalidImageError(f"{name} image's affine {affine.tolist()} has no voxel size on some axis; "
                                "fix the image's header.")
    direction = affine[:, :3] / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise InvalidImageError(
            f"{name} image's affine shears its voxel axes, which an ITK image's grid cannot hold; resample it "
            "onto an unsheared grid, or pass its file's path (ITK's reader then takes the header's qform).")
    return ImageGrid(shape, spacing, affine[:, 3], direction)


_MGH_SUFFIXES = (".mgz", ".mgh")


def _read_mgh(path: Path, name: str, grid_only: bool):
    """A FreeSurfer MGH image file (``.mgz``, gzipped, or ``.mgh``), which ITK's wheels do not
    read, through nibabel: an ``itk.Image`` (its ``ImageGrid`` with ``grid_only``, from the
    header alone) on its vox2ras affine, as FreeSurfer's ``mri_convert`` writes it to NIfTI."""
    nibabel = _nibabel_for_mgh(f"{name} image {str(path)!r}")
    try:
        image = nibabel.load(str(path))
        return _nibabel_grid(image, name) if grid_only else _from_nibabel(image, name)
    except InvalidImageError:
        raise
    except (OSError, EOFError, ValueError, zlib.error) as exc:  # nibabel's ImageFileError is a ValueError
        raise ImageReadError(f"cannot read the {name} image {str(path)!r} ({exc.__class__.__name__}: {exc}); "
                             "check the file, or convert it with FreeSurfer's mri_convert.") from exc


# The voxel types an MGH file holds, and for the others the one written: uint16 widens, float64
# narrows to float32 (as FreeSurfer's mri_convert does), wider integers only where they fit.
_MGH_TYPES = {np.dtype(t): np.dtype(t) for t in (np.uint8, np.int16, np.int32, np.float32)}
_MGH_TYPES.update({np.dtype(np.uint16): np.dtype(np.int32), np.dtype(np.float64): np.dtype(np.float32)})


def _write_mgh(image, path: str) -> None:
    """Write a scalar ``itk.Image`` as a FreeSurfer MGH file (``.mgz`` gzipped, ``.mgh``) through
    nibabel: its voxels (an MGH file's type: :data:`_MGH_TYPES`) on its grid's vox2ras affine,
    the file :func:`_read_mgh` reads back as the same grid."""
    import itk

    nibabel = _nibabel_for_mgh(f"writing {os.path.basename(path)!r}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise OutputWriteError(f"{os.path.basename(path)!r}: an MGH file holds scalar volumes, not a vector image "
                               "(a displacement field); name the output .nii.gz, which ANTs and ITK read as a field.")
    voxels = itk.array_view_from_image(image)
    dtype = _MGH_TYPES.get(voxels.dtype)
    if dtype is None and np.issubdtype(voxels.dtype, np.integer) and voxels.size and (
            np.iinfo(np.int32).min <= voxels.min() and voxels.max() <= np.iinfo(np.int32).max):
        dtype = np.dtype(np.int32)
    if dtype is None:
        raise OutputWriteError(f"{os.path.basename(path)!r}: an MGH file cannot hold voxels of type {voxels.dtype} "
                               "with these values (its types: uint8, int16, int32, float32); name the output .nii.gz.")
    converted = nibabel.MGHImage(np.asarray(voxels.transpose(2, 1, 0), dtype=dtype), _ras_affine(ImageGrid.of(image)))
    if path.lower().endswith(".mgz"):  # the .mgh gzipped: nibabel's gzip takes one core (20x longer at 512x512x300)
        _write_then_gzip(lambda uncompressed: nibabel.save(converted, uncompressed), path[: -len(".mgz")] + ".mgh", path)
    else:
        nibabel.save(converted, path)


def _nibabel_for_mgh(what: str):
    """nibabel, which reads and writes FreeSurfer's MGH files for mgr_engine;
    :class:`MissingDependencyError` saying how to install it."""
    try:
        import nibabel
    except ImportError:
        raise MissingDependencyError(
            f"{what}: a FreeSurfer MGH file, which ITK does not read or write; mgr_engine does it through nibabel: "
            "pip install 'mgr_engine[freesurfer]' (or nibabel), or use .nii.gz (FreeSurfer's tools read NIfTI)."
        ) from None
    return nibabel


def has_float_voxels(path) -> bool:
    """Whether the image file ``path`` holds floating-point voxels, from its header alone (an
    MGH file's through nibabel, as :func:`load_image` reads it)."""
    if _suffix(Path(path)).lower() in _MGH_SUFFIXES:
        return _nibabel_for_mgh(f"image {str(path)!r}").load(str(path)).get_data_dtype().kind == "f"
    return type(read_image(path, header_only=True)).__name__ in ("itkImageF3", "itkImageD3")


def _image_on_grid(array: np.ndarray, grid: "ImageGrid", name: str):
    """A new ``itk.Image`` of the (z, y, x) ``array`` on ``grid``, in ``array``'s type or the
    nearest one ITK's Python wrapping holds and writes (int8 -> int16; int64 and uint64 -> int32
    where the values fit, else float64; float128 -> float64). ITK holds uint64 images, but its
    wheels' file writers do not take them: a uint64 label map warped could not be written."""
    dtype = array.dtype.newbyteorder("=")  # an MGH file's big-endian voxels: swapped as they are copied
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise InvalidImageError(f"{name} image's voxels are of type {dtype}; mgr_engine registers images of real "
                                "numbers.")
    if not _itk_wraps(dtype) or dtype == np.uint64:
        if dtype == np.int8:
            dtype = np.dtype(np.int16)
        elif np.issubdtype(dtype, np.integer):
            fits = array.size == 0 or (int(array.min()) >= -2**31 and int(array.max()) < 2**31)
            dtype = np.dtype(np.int32 if fits else np.float64)
        else:
            dtype = np.dtype(np.float64)
    image, voxels = new_image(array.shape, dtype, grid)
    voxels[...] = array
    return image


@functools.lru_cache(maxsize=None)
def _itk_wraps(dtype) -> bool:
    """Whether ``itk.image_from_array`` holds arrays of the integer or floating ``dtype`` (ITK's
    wheels: uint8, uint16, int16, uint32, int32, uint64, float32, float64; not int8, int64)."""
    import itk

    try:
        itk.image_view_from_array(np.zeros((1, 1, 1), dtype))
    except (KeyError, TypeError, itk.TemplateTypeError):
        return False
    return True


def check_nifti_complete(path, name: str = "input") -> None:
    """Raise :class:`ImageReadError` where a NIfTI image (``.nii``, ``.nii.gz``, or a ``.hdr`` with
    its ``.img``/``.img.gz``, Analyze's too) holds fewer bytes than its header announces. ITK's
    NIfTI reader reads such a file without a word, the missing voxels zero: an interrupted copy
    registered as part of an image (its NRRD and MetaImage readers refuse a short file). A gzipped
    file's trailer gives its uncompressed size (modulo 2^32); only where that is not the header's
    size (a truncated file, or one of several gzip members, as bgzip writes) is the file
    decompressed once to count its bytes. Anything else odd is left to ITK's reader."""
    files = _nifti_files(Path(path))
    if files is None:
        return
    header_path, data_path = files
    single_file = header_path == data_path
    try:
        expected = _nifti_file_bytes(_leading_bytes(header_path, _NIFTI2_HEADER_BYTES), single_file)
        if expected is None:
            return
        if not data_path.name.lower().endswith(".gz"):
            actual = data_path.stat().st_size
        else:
            with open(data_path, "rb") as f:
                f.seek(-4, os.SEEK_END)
                if struct.unpack("<I", f.read(4))[0] == expected % 2**32:  # ISIZE, the trailer's last field
                    return
            actual = _gzip_bytes_before_its_end(data_path)
    except (OSError, EOFError, ValueError, zlib.error):  # no header to go by: ITK's reader says what is wrong
        return
    if actual is not None and actual < expected:
        voxel_file = "it " if single_file else f"its voxel file {str(data_path)!r} "
        raise ImageReadError(
            f"{name} image {str(path)!r} is truncated: {voxel_file}ends after {actual} of the {expected} bytes its "
            f"header announces ({100 * actual / expected:.3g}%); copy or export it again.")


def _nifti_files(path: Path):
    """``(header file, voxel file)`` of a NIfTI or Analyze image at ``path``: the same file for a
    ``.nii``/``.nii.gz``; a ``.hdr`` and the ``.img`` or ``.img.gz`` beside it (either named);
    None for any other path."""
    suffix = _suffix(path).lower()
    if suffix in (".nii", ".nii.gz"):
        return (path, path) if path.is_file() else None
    if suffix not in (".hdr", ".img", ".img.gz"):
        return None
    stem = path.name[:-len(suffix)]
    header = path.with_name(stem + ".hdr")
    voxels = [path.with_name(stem + ending) for ending in (".img", ".img.gz") if path.with_name(stem + ending).is_file()]
    return (header, voxels[0]) if header.is_file() and voxels else None


def _leading_bytes(path: Path, count: int) -> bytes:
    """The first ``count`` bytes of a file, inflated where it is gzipped, however the file ends."""
    with open(path, "rb") as f:
        if not path.name.lower().endswith(".gz"):
            return f.read(count)
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(f.read(2**16), count)


_NIFTI1_HEADER_BYTES, _NIFTI2_HEADER_BYTES = 348, 540


def _nifti_file_bytes(header: bytes, single_file: bool = True):
    """The bytes a NIfTI-1, NIfTI-2 or Analyze image's voxel file takes by its ``header``: the
    voxels' offset plus the voxels (every dimension, vector components included); for a single
    file (``.nii``) at least the header itself before them. None where ``header`` is not such a
    header (its size field, magic, dimensions or bits per voxel)."""
    for order in "<>":  # the header's own size tells its byte order
        size = struct.unpack_from(order + "i", header)[0] if len(header) >= 4 else None
        if size in (_NIFTI1_HEADER_BYTES, _NIFTI2_HEADER_BYTES) and len(header) >= size:
            break
    else:
        return None
    if size == _NIFTI1_HEADER_BYTES:
        # "n+1": a single file; "ni1" (or none at all, Analyze 7.5): a header with its voxels in a .img
        if (header[344:348] == b"n+1\0") != single_file:
            return None
        dims = struct.unpack_from(order + "8h", header, 40)
        bitpix = struct.unpack_from(order + "h", header, 72)[0]
        offset = struct.unpack_from(order + "f", header, 108)[0]
        if not np.isfinite(offset):
            return None
        offset = int(offset)
    else:
        if header[4:8] != (b"n+2\0" if single_file else b"ni2\0"):
            return None
        dims = struct.unpack_from(order + "8q", header, 16)
        bitpix = struct.unpack_from(order + "h", header, 14)[0]
        offset = struct.unpack_from(order + "q", header, 168)[0]
    if not 1 <= dims[0] <= 7 or bitpix <= 0 or bitpix % 8 or min(dims[1:dims[0] + 1]) < 1 or offset < 0:
        return None
    voxel_bytes = int(np.prod(dims[1:dims[0] + 1], dtype=np.int64)) * (bitpix // 8)
    return (max(offset, size) if single_file else offset) + voxel_bytes


def _gzip_bytes_before_its_end(path: Path):
    """How many bytes the gzip file ``path`` decompresses to, every member counted, where the
    file ends early up to there; None where it is corrupt otherwise. The standard library's
    ``read1`` hands out what it inflated before it finds the end missing; its ``read``, and
    ISA-L's ``read1``, lose what the call that finds it had inflated."""
    import gzip

    total = 0
    with gzip.open(path, "rb") as f:
        try:
            while chunk := f.read1(2**20):
                total += len(chunk)
        except EOFError:  # "Compressed file ended before the end-of-stream marker was reached"
            pass
        except (OSError, zlib.error):
            return None
    return total


def voxel_view(image) -> np.ndarray:
    """The voxels of a scalar ITK image as a (z, y, x) numpy view in its own pixel type (no copy)."""
    import itk

    return itk.array_view_from_image(image)


def voxel_array(image) -> np.ndarray:
    """The voxels of a scalar ITK image as a float32 (z, y, x) array (a copy)."""
    import itk

    # a float64 value beyond float32's range becomes infinite, which check_volume reports as such
    with np.errstate(over="ignore"):
        return np.array(itk.array_view_from_image(image), dtype=np.float32)  # one copy, converted or not


@dataclass(frozen=True)
class ImageGrid:
    """An image's voxel grid in ITK's (x, y, z) order: ``size`` (voxels), ``spacing`` and
    ``origin`` (mm), ``direction`` (3 x 3). What the affines below need of an image, so that the
    tensor path can be driven without itk (the GPU machine has none)."""

    size: tuple
    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray

    @classmethod
    def of(cls, image) -> "ImageGrid":
        """The grid of an ``itk.Image`` (an ``ImageGrid`` is returned as it is)."""
        if isinstance(image, cls):
            return image
        return cls(tuple(int(n) for n in image.GetLargestPossibleRegion().GetSize()),
                   np.asarray(image.GetSpacing(), dtype=np.float64), np.asarray(image.GetOrigin(), dtype=np.float64),
                   _matrix_array(image.GetDirection()))


def _matrix_array(matrix) -> np.ndarray:
    """An ``itk.Matrix`` as a float64 array, element by element: ``itk.array_from_matrix`` looks
    the matrix's type up among the classes ITK's lazy loader has loaded, and raises a KeyError
    while it has loaded none (a fresh process that read its images with :func:`read_image`)."""
    vnl = matrix.GetVnlMatrix()
    return np.array([[vnl.get(i, j) for j in range(vnl.cols())] for i in range(vnl.rows())], dtype=np.float64)


def axis_codes(direction) -> str:
    """The anatomical direction each voxel axis (i, j, k) of a grid with ``direction`` points to,
    the nearest of six, as nibabel's axis codes name them ("LPS" for ITK's identity direction,
    "RAS" for NIfTI's usual storage)."""
    codes = ""
    for column in np.asarray(direction, dtype=np.float64).T:
        axis = int(np.argmax(np.abs(column)))
        codes += ("RL", "AP", "IS")[axis][int(column[axis] > 0)]  # ITK's physical axes: +x L, +y P, +z S
    return codes


IDENTITY_AXES = ((0, 1, 2), (False, False, False))


def matching_axes(direction, target_direction):
    """How a grid of ``direction`` lines up with one of ``target_direction``: ``(axes, flips)``,
    for each voxel axis ``c`` of the target the axis ``axes[c]`` nearest to it (the largest
    cosine between their physical directions) and whether it runs the other way; None where two
    target axes share their nearest axis (grids at about 45 degrees to each other).
    :data:`IDENTITY_AXES` where the grids' axes already agree within 45 degrees."""
    cosines = np.asarray(direction, dtype=np.float64).T @ np.asarray(target_direction, dtype=np.float64)
    axes = np.abs(cosines).argmax(axis=0)  # [axis of direction, axis of the target]
    if len(set(axes.tolist())) != 3:
        return None
    return tuple(int(a) for a in axes), tuple(bool(cosines[a, c] < 0) for c, a in enumerate(axes))


def reordered_voxels(array: np.ndarray, axes, flips) -> np.ndarray:
    """A (z, y, x) voxel array with its axes reordered as :func:`reordered_grid` reorders its grid
    (a contiguous copy; voxel values unchanged)."""
    ijk = array.transpose(2, 1, 0).transpose(axes)
    ijk = np.flip(ijk, [c for c in range(3) if flips[c]])
    return np.ascontiguousarray(ijk.transpose(2, 1, 0))


def reordered_grid(grid: "ImageGrid", axes, flips) -> "ImageGrid":
    """The grid of the same voxels stored in another order: its voxel axis ``c`` is ``grid``'s axis
    ``axes[c]``, reversed where ``flips[c]``. Every voxel keeps its physical position."""
    axes = list(axes)
    first_voxel = np.zeros(3)  # the old index of the new index (0, 0, 0)
    for c, a in enumerate(axes):
        if flips[c]:
            first_voxel[a] = grid.size[a] - 1
    return ImageGrid(tuple(grid.size[a] for a in axes), grid.spacing[axes],
                     grid.origin + grid.direction @ (grid.spacing * first_voxel),
                     grid.direction[:, axes] * np.where(flips, -1.0, 1.0))


def reordered_image(image, axes, flips):
    """An ``itk.Image`` copy of ``image`` with its voxel axes reordered (see :func:`reordered_grid`):
    the same physical image, stored in another order, like ITK's ``OrientImageFilter``."""
    import itk

    return image_like(reordered_voxels(itk.array_view_from_image(image), axes, flips),
                      reordered_grid(ImageGrid.of(image), axes, flips))


def check_same_grid(mask, image, what: str) -> None:
    """Raise :class:`MaskMismatchError` unless ``mask`` (or a segmentation) lies on ``image``'s voxel
    grid; the message names what differs (size, spacing, origin, direction) with both values."""
    m, i = ImageGrid.of(mask), ImageGrid.of(image)
    differences = [
        (name, mask_value, image_value)
        for name, mask_value, image_value, same in (
            ("size", m.size, i.size, m.size == i.size),
            ("spacing", m.spacing, i.spacing, np.allclose(m.spacing, i.spacing, rtol=1e-5)),
            ("origin", m.origin, i.origin, np.allclose(m.origin, i.origin, atol=1e-3)),
            ("direction", m.direction, i.direction, np.allclose(m.direction, i.direction, atol=1e-5)),
        )
        if not same
    ]
    if differences:
        listed = "; ".join(f"{name} {_numbers(mask_value)} against {_numbers(image_value)}"
                           for name, mask_value, image_value in differences)
        raise MaskMismatchError(
            f"{what} does not lie on its image's grid ({what} against image: {listed}); resample the {what} onto "
            "the image (nearest neighbour) first."
        )


def _numbers(values) -> str:
    """Numbers of a size, vector or matrix as plain text: ``(1.2, 1, 0.9)``, not NumPy 2's
    ``np.float64(1.2)``."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim > 1:
        return "(" + ", ".join(_numbers(row) for row in values) + ")"
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def index_to_physical_affine(image) -> np.ndarray:
    """Voxel index -> physical point (mm) of ``image`` (an ``itk.Image`` or :class:`ImageGrid`), as
    a (3, 4) float64 affine ``[matrix | offset]`` in ITK's (x, y, z) order."""
    grid = ImageGrid.of(image)
    return np.concatenate([grid.direction @ np.diag(grid.spacing), grid.origin[:, None]], axis=1)


def network_to_physical_affine(image, network_shape) -> np.ndarray:
    """Network voxel (x, y, z) -> physical space of ``image`` (an ``itk.Image`` or
    :class:`ImageGrid`), as a (3, 4) float64 affine.

    The network grid covers the image's extent: centre on centre, voxel size
    ``spacing * size / network_size`` along the image's direction. This is the
    convention of the authors' ``itk_wrapper``, so transforms agree with theirs.
    """
    grid = ImageGrid.of(image)
    size = np.asarray(grid.size, dtype=np.float64)
    network = np.asarray(list(reversed(list(network_shape))), dtype=np.float64)  # (x, y, z)
    matrix = grid.direction @ np.diag(grid.spacing * size / network)
    image_centre = grid.origin + grid.direction @ (grid.spacing * (size - 1) / 2)
    return np.concatenate([matrix, (image_centre - matrix @ ((network - 1) / 2))[:, None]], axis=1)


def network_to_physical(image, network_shape):
    """:func:`network_to_physical_affine` as an ``itk.AffineTransform``."""
    import itk

    affine = network_to_physical_affine(image, network_shape)
    affine_class = wrapped_class("itkAffineTransform", "itkAffineTransformD3") or itk.AffineTransform[itk.D, 3]
    transform = affine_class.New()
    transform.SetMatrix(itk.matrix_from_array(np.ascontiguousarray(affine[:, :3])))
    transform.SetTranslation([float(v) for v in affine[:, 3]])
    return transform


def image_like(array: np.ndarray, reference, is_vector: bool = False):
    """An ITK image of ``array`` on ``reference``'s grid: a scalar image of ``array``'s type from
    (Z, Y, X), or with ``is_vector`` an ``itk.Image[itk.Vector[itk.F, 3], 3]`` (ITK's displacement
    field type) from (Z, Y, X, 3). See :func:`new_image`."""
    image, voxels = new_image(array.shape[:3], np.float32 if is_vector else array.dtype, reference, is_vector)
    voxels[...] = array
    return image


def new_image(shape, dtype, reference, is_vector: bool = False):
    """A new ITK image of ``shape`` (Z, Y, X) on ``reference``'s spacing, origin and direction,
    and a writable view of its voxels: a scalar image of ``dtype``, or with ``is_vector`` an
    ``itk.Image[itk.Vector[itk.F, 3], 3]`` (ITK's displacement field type; a (Z, Y, X, 3) view).

    A large output is computed straight into the view: built as an array and then copied into
    an image, a 512x512x300 field took 0.9 GB more and a second of copying and page faults.
    Spacing, origin and direction are set one by one: ``CopyInformation`` from a scalar image
    would also copy its one component per pixel onto a vector image."""
    import itk

    if is_vector:
        image_type = itk.Image[itk.Vector[itk.F, 3], 3]
    else:  # the image type itk.image_from_array gives this dtype
        image_type = type(itk.image_view_from_array(np.zeros((1, 1, 1), dtype)))
    image = _allocated_image(image_type, shape, reference)
    return image, itk.array_view_from_image(image)


def _is_array_grid(grid: "ImageGrid") -> bool:
    """Whether ``grid`` is the one an array is read on (``itk.image_from_array``'s)."""
    return bool(np.all(grid.spacing == 1) and np.all(grid.origin == 0) and np.array_equal(grid.direction, np.eye(3)))


def _allocated_image(image_type, shape, reference, zeroed: bool = False):
    """A new ``image_type`` of ``shape`` (Z, Y, X) on ``reference``'s spacing, origin and
    direction (an ITK image's or an :class:`ImageGrid`'s), its voxels left as allocated (or
    ``zeroed``), set one by one (see :func:`new_image`)."""
    import itk

    image = image_type.New()
    image.SetRegions([int(n) for n in reversed(tuple(shape))])
    image.Allocate(zeroed)
    grid = ImageGrid.of(reference)  # float64 numbers, as ITK holds them: the same grid exactly
    image.SetSpacing(grid.spacing.tolist())
    image.SetOrigin(grid.origin.tolist())
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(grid.direction)))
    return image


def keep_itk_from_importing_torch() -> None:
    """Stop ITK's Python wrapping from importing torch in this process, for the commands that run
    no network (``mgr-engine warp`` and ``jacobian``: numpy arrays, C++ kernels). Where torch is
    installed, ITK imports it as it loads ITKCommon, so that its snake_case filters accept tensors:
    1.3-2.0 s and 190 MB of a 2.5-3.4 s command on a small image (2-core AMD EPYC, ITK 5.4.7). These
    commands never hand ITK a tensor. A no-op where torch is already loaded, or where ITK has no
    such switch (``itk.support.helpers._HAVE_TORCH``, read when ITKCommon loads)."""
    if "torch" in sys.modules:
        return
    try:
        from itk.support import helpers
    except ImportError:
        return
    if hasattr(helpers, "_HAVE_TORCH"):
        helpers._HAVE_TORCH = False


def load_array_views() -> None:
    """Load ITK's module of numpy views of images (``itk.array_view_from_image``) now, in this
    thread. ITK's lazy loader changes the process's working directory while it loads a module
    (``itk.support.base.LibraryLoader``): loaded first by a reading thread, this one changed it
    under another thread, which then could not find its relative paths (reproduced)."""
    import itk

    with contextlib.suppress(Exception):  # another ITK's layout: loaded on first use, as before
        itk.PyBuffer  # noqa: B018 (the attribute's access loads the module)


def wrapped_class(module: str, name: str):
    """ITK's wrapped class ``name`` from its own wrapper module ``itk.<module>Python``, imported
    alone; None where this ITK lays its wrappers out otherwise (then ``itk.<Class>`` is the way).

    Why: ITK's lazy loader loads a wrapped module together with every module it declares as a
    dependency. ITKDisplacementField (the displacement field transform and its filters) and
    ITKIOTransformBase (transform files) declare ITKSmoothing, ITKConvolution, ITKThresholding,
    ITKImageIntensity and more: 7.5-8.2 s of one core on first use (2-core AMD EPYC, ITK 5.4.7),
    the longest step of a one-shot ``mgr-engine register`` (the network on this CPU: 3.5 s). The
    classes used here need none of them: imported alone, they load in 0.06 s."""
    try:
        return getattr(importlib.import_module(f"itk.{module}Python"), name)
    except (ImportError, AttributeError):
        log.debug("no ITK wrapper module itk.%sPython with %s: loading it through ITK's lazy loader", module, name)
        return None


def jacobian_determinant(field, physical: bool = False, device="cpu"):
    """The Jacobian determinant of an ``Image[Vector[F, 3], 3]`` displacement field (mm), an
    ``Image[F, 3]`` on its grid, computed on ``device``
    (:func:`mgr_engine.resample.jacobian_determinant`; on the CPU its C++ kernel).

    Default: what ITK's ``DisplacementFieldJacobianDeterminantFilter`` computes (as
    ``unigradicon-jacobian``: derivatives along the index axes, the direction not applied), bit for
    bit on x86-64; where the C++ kernel is not built (or ``kernel_mode("torch")``), ITK's filter
    itself on the CPU, without loading ITKDisplacementField's dependencies (see
    :func:`wrapped_class`). ``physical=True``: derivatives along the physical axes (the direction
    applied)."""
    import itk

    from .resample import jacobian_determinant as array_jacobian_determinant

    if _jacobian_left_to_itk(device, physical):
        jacobian = (wrapped_class("itkDisplacementFieldJacobianDeterminantFilter",
                                  "itkDisplacementFieldJacobianDeterminantFilterIVF33F")
                    or itk.DisplacementFieldJacobianDeterminantFilter[itk.Image[itk.Vector[itk.F, 3], 3], itk.F])
        f = jacobian.New(field)
        f.Update()
        return f.GetOutput()
    grid = ImageGrid.of(field)
    displacement = itk.array_view_from_image(field)
    image, voxels = new_image(displacement.shape[:3], np.float32, field)
    array_jacobian_determinant(_on_device(displacement, device), grid.spacing, grid.direction if physical else None,
                               out=voxels)
    return image


def _jacobian_left_to_itk(device, physical: bool) -> bool:
    """Whether :func:`jacobian_determinant` takes ITK's filter: on the CPU, along the index axes,
    where the C++ kernel is not taken (not built, or ``kernel_mode("torch")``)."""
    from .resample import use_cpp_jacobian

    return _is_cpu(device) and not physical and not use_cpp_jacobian()


def _is_cpu(device) -> bool:
    """Whether ``device`` (a torch device or its name) is the CPU, without importing torch."""
    return str(device).split(":")[0] == "cpu"


def _on_device(array: np.ndarray, device):
    """``array`` as it is on the CPU (the C++ kernels and the CPU path take numpy arrays, and
    need no torch), else a tensor on ``device``."""
    if _is_cpu(device):
        return array
    import torch

    return torch.from_numpy(array).to(device)


def transform_to_displacement_field(transform, reference):
    """``transform``'s displacement at every voxel of ``reference``'s grid: ITK's
    ``TransformToDisplacementFieldFilter``, an ``Image[Vector[F, 3], 3]``, as
    ``itk.transform_to_displacement_field_filter`` returns it (without loading ITKDisplacementField's
    dependencies, see :func:`wrapped_class`; and on ITK 5.3 too, where that function refuses its
    own output type)."""
    import itk

    rasterize = (wrapped_class("itkTransformToDisplacementFieldFilter", "itkTransformToDisplacementFieldFilterIVF33D")
                 or itk.TransformToDisplacementFieldFilter[itk.Image[itk.Vector[itk.F, 3], 3], itk.D])
    decorator = (wrapped_class("itkTransformBase", "itkDataObjectDecoratorTD33")
                 or itk.DataObjectDecorator[itk.Transform[itk.D, 3, 3]])
    decorated = decorator.New()
    decorated.Set(transform)
    f = rasterize.New(decorated, reference_image=reference, use_reference_image=True)
    f.Update()
    return f.GetOutput()


def displacement_transform(phi: np.ndarray):
    """An ITK DisplacementFieldTransform on the network grid (unit spacing, zero origin, identity
    direction) of a (3, D, H, W) map in [0, 1]: its displacement in network voxels
    (:func:`mgr_engine.resample.map_displacement`, float64, components (x, y, z)).

    The field is computed straight into an ``itk.Image[itk.Vector[itk.D, 3], 3]``, the type the
    transform holds: a ``VectorImage`` from ``itk.image_from_array`` costs two more copies of
    128 MB at 175^3 (the array's, then the transform's conversion of it, 60 ms)."""
    import itk

    from .resample import map_displacement

    image = itk.Image[itk.Vector[itk.D, 3], 3].New()
    image.SetRegions([int(n) for n in reversed(phi.shape[1:])])
    image.Allocate()
    map_displacement(phi, out=itk.array_view_from_image(image))
    return _field_transform(image)


def _field_transform(field):
    """ITK's DisplacementFieldTransform of ``field``, an ``itk.Image[itk.Vector[itk.D, 3], 3]``
    (imported alone, see :func:`wrapped_class`)."""
    import itk

    field_transform = wrapped_class("itkDisplacementFieldTransform", "itkDisplacementFieldTransformD3")
    transform = (field_transform or itk.DisplacementFieldTransform[itk.D, 3]).New()
    transform.SetDisplacementField(field)
    return transform


def identity_transform():
    """A new ``itk.IdentityTransform[itk.D, 3]`` (imported alone, see :func:`wrapped_class`)."""
    import itk

    return (wrapped_class("itkIdentityTransform", "itkIdentityTransformD3") or itk.IdentityTransform[itk.D, 3]).New()


def map_to_transform(phi: np.ndarray, source_image, target_image):
    """ITK transform sending ``target_image`` physical points to ``source_image`` physical points.

    ``phi``: a (3, D, H, W) map in [0, 1] coordinates with ``source o phi ~ target`` on the
    network grid. Built as: target physical -> network voxel -> + displacement -> source physical.
    """
    import itk

    shape = phi.shape[1:]
    composite_class = wrapped_class("itkCompositeTransform", "itkCompositeTransformD3") or itk.CompositeTransform[itk.D, 3]
    composite = composite_class.New()
    # ITK applies the last-added transform first.
    composite.AddTransform(network_to_physical(source_image, shape))
    composite.AddTransform(displacement_transform(phi))
    composite.AddTransform(network_to_physical(target_image, shape).GetInverseTransform())
    return composite


def grid_transform(transform):
    """``transform`` (an ITK transform, as :func:`read_transform` gives it) as a
    :class:`mgr_engine.resample.GridTransform`, for :func:`warp_image` and
    :func:`grid_displacement_field`, where it is of that form: a displacement field transform,
    alone or in a composite with linear transforms before and after it, as this engine's and
    unigradicon's transform files are. None for any other transform (ITK's filters evaluate
    those: :func:`resample`, :func:`transform_to_displacement_field`). The field is taken as
    interpolated linearly: a transform file holds no interpolator, and ITK's Python wrapping has
    no other one for a field.

    The field's grid (spacing, origin, direction) goes into the affines, its displacement (mm)
    into grid voxels; on a grid of unit spacing and identity direction (this engine's) the
    displacement is the transform's own array, not a copy."""
    import itk

    from .resample import GridTransform, compose_affines, invert_affine

    transform = down_cast(transform)
    if transform.GetNameOfClass() == "CompositeTransform":
        parts = [down_cast(transform.GetNthTransform(i)) for i in range(transform.GetNumberOfTransforms())]
    else:
        parts = [transform]
    parts.reverse()  # in the order they are applied: a composite applies its last-added first
    fields = [i for i, part in enumerate(parts) if part.GetNameOfClass() == "DisplacementFieldTransform"]
    if len(fields) != 1:
        return None
    affines = [_linear_affine(part) for i, part in enumerate(parts) if i != fields[0]]
    if any(a is None for a in affines):
        return None
    before, after = np.eye(3, 4), np.eye(3, 4)
    for affine in affines[:fields[0]]:
        before = compose_affines(affine, before)
    for affine in affines[fields[0]:]:
        after = compose_affines(affine, after)
    field = parts[fields[0]].GetDisplacementField()
    displacement = itk.array_view_from_image(field)
    grid_to_physical = index_to_physical_affine(field)
    if not np.array_equal(grid_to_physical[:, :3], np.eye(3)):
        displacement = displacement @ np.linalg.inv(grid_to_physical[:, :3]).T  # mm -> grid voxels
    return GridTransform(displacement, compose_affines(invert_affine(grid_to_physical), before),
                         compose_affines(after, grid_to_physical))


def _linear_affine(transform):
    """A linear ITK transform's (3, 4) affine, or None for another kind."""
    name = transform.GetNameOfClass()
    if name == "IdentityTransform":
        return np.eye(3, 4)
    if name == "TranslationTransform":
        return np.concatenate([np.eye(3), np.asarray(transform.GetOffset(), dtype=np.float64)[:, None]], axis=1)
    if transform.IsLinear() and hasattr(transform, "GetMatrix") and hasattr(transform, "GetOffset"):
        return np.concatenate([_matrix_array(transform.GetMatrix()),
                               np.asarray(transform.GetOffset(), dtype=np.float64)[:, None]], axis=1)
    return None


def _reference_grid(grid, reference):
    """``reference``'s (Z, Y, X) shape, its voxel index -> physical point, and its voxel index ->
    ``grid``'s index."""
    from .resample import compose_affines

    image_grid = ImageGrid.of(reference)
    to_physical = index_to_physical_affine(image_grid)
    return tuple(reversed(image_grid.size)), to_physical, compose_affines(grid.to_grid, to_physical)


def warp_image(grid, image, reference, interpolation: str = "linear", device="cpu"):
    """``image`` resampled onto ``reference``'s grid through ``grid`` (a
    :class:`mgr_engine.resample.GridTransform`, reference point -> image point), 0 outside the
    image; the pixel type kept, an integer type clamped and truncated as ITK does. What
    :func:`resample` (ITK's ``ResampleImageFilter``) computes through the same transform,
    evaluated on ``device`` (:func:`mgr_engine.resample.resampled_image`; on the CPU in C++,
    straight from the image's voxels into the output's)."""
    import itk

    from .resample import compose_affines, invert_affine, resampled_image

    array = itk.array_view_from_image(image)
    shape, _, fixed_to_grid = _reference_grid(grid, reference)
    grid_to_index = compose_affines(invert_affine(index_to_physical_affine(image)), grid.from_grid)
    warped, voxels = new_image(shape, array.dtype, reference)
    # the image as it is: resampled_image moves it to the displacement's device
    resampled_image(_on_device(grid.displacement, device), fixed_to_grid, shape, array, grid_to_index, interpolation,
                    out=voxels)
    return warped


def grid_displacement_field(grid, reference, device="cpu"):
    """``grid``'s displacement (a :class:`mgr_engine.resample.GridTransform`) at every voxel of
    ``reference``'s grid in mm, ``transform(p) - p``: an ``Image[Vector[F, 3], 3]``, what
    :func:`transform_to_displacement_field` (ITK's filter) computes from the same transform,
    evaluated on ``device`` (:func:`mgr_engine.resample.displacement_field`; on the CPU in C++)."""
    from .resample import displacement_field

    shape, fixed_to_physical, fixed_to_grid = _reference_grid(grid, reference)
    image, voxels = new_image(shape, np.float32, reference, is_vector=True)
    displacement_field(_on_device(grid.displacement, device), fixed_to_grid, shape, grid.from_grid, fixed_to_physical,
                       out=voxels)
    return image


def grid_jacobian_determinant(grid, reference, physical: bool = False, device="cpu", slab_voxels: int = 2**23):
    """The Jacobian determinant of ``grid``'s displacement on ``reference``'s grid: what
    :func:`jacobian_determinant` computes from :func:`grid_displacement_field`, bit for bit, without
    the whole field (0.9 GB at 512x512x300). The field is computed slab by slab (about
    ``slab_voxels`` voxels, with the slice on either side that the central differences take), each
    slab's determinant kept without those two slices."""
    from .resample import displacement_field
    from .resample import jacobian_determinant as array_jacobian_determinant

    if _jacobian_left_to_itk(device, physical):  # ITK's filter takes a whole field
        return jacobian_determinant(grid_displacement_field(grid, reference, device), physical, device)
    on_cpu = _is_cpu(device)
    shape, fixed_to_physical, fixed_to_grid = _reference_grid(grid, reference)
    image_grid = ImageGrid.of(reference)
    image, voxels = new_image(shape, np.float32, reference)
    displacement = _on_device(grid.displacement, device)
    slices = max(1, slab_voxels // (shape[1] * shape[2]))
    # one buffer for every slab's field and one for its determinant (on a GPU, the slab's own tensors)
    buffer_slices = min(slices + 2, shape[0])
    field_buffer = np.empty((buffer_slices, *shape[1:], 3), np.float32) if on_cpu else None
    jacobian_buffer = np.empty((buffer_slices, *shape[1:]), np.float32) if on_cpu else None
    for start in range(0, shape[0], slices):
        stop = min(start + slices, shape[0])
        first, end = max(start - 1, 0), min(stop + 1, shape[0])
        field = displacement_field(displacement, fixed_to_grid, (end - first, *shape[1:]), grid.from_grid,
                                   fixed_to_physical, None if field_buffer is None else field_buffer[:end - first],
                                   first_z=first)
        jacobian = array_jacobian_determinant(field, image_grid.spacing, image_grid.direction if physical else None,
                                              None if jacobian_buffer is None else jacobian_buffer[:end - first])
        slab = jacobian[start - first:stop - first]
        voxels[start:stop] = slab if on_cpu else slab.cpu().numpy()
    return image


def _suffix(path: Path) -> str:
    suffixes = "".join(path.suffixes[-2:]) if path.name.lower().endswith(".gz") else path.suffix
    return suffixes


def _output_directory(path: Path) -> Path:
    """The folder ``path`` goes into; :class:`OutputWriteError` where there is none."""
    if not path.parent.is_dir():
        raise OutputWriteError(f"output directory {str(path.parent)!r} does not exist{tilde_hint(path)}; create it "
                               "first.")
    return path.parent


@contextlib.contextmanager
def staged_outputs():
    """Yield ``stage(path)``, which gives a path with ``path``'s file name in a new hidden folder
    beside it. On success everything written there replaces its namesakes beside the paths, once
    every staged file is there; on any error or Ctrl-C none does, and the folders are deleted:
    several outputs of one command are written all or none.

    A folder, not a temporary name: formats with a detached header (.mhd, .nhdr, .hdr) also write
    a data file named after the header, and the header refers to it by that name. Data files are
    moved first, each header last. The writer creates the files itself, so they get the mode the
    umask gives (``mkstemp``'s would be 0600, unreadable by the user's group)."""
    staged = []  # (staging folder, final path)

    def stage(path) -> str:
        path = Path(path)
        staged.append((Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial",
                                             dir=_output_directory(path))), path))
        return str(staged[-1][0] / path.name)

    try:
        yield stage
        for staging, path in staged:
            if not (staging / path.name).is_file():
                raise OutputWriteError(f"nothing was written to {str(path)!r}; check the file extension.")
        for staging, path in staged:
            for written in sorted(staging.iterdir(), key=lambda f: f.name == path.name):  # the header last
                try:
                    os.replace(written, path.parent / written.name)
                except OSError as exc:  # a folder made there since the check, a file system full of inodes
                    raise OutputWriteError(f"cannot write {str(path.parent / written.name)!r} "
                                           f"({exc.strerror or exc})") from exc
    finally:
        for staging, _ in staged:
            shutil.rmtree(staging, ignore_errors=True)


def write_outputs(outputs) -> None:
    """Write a command's outputs all or none (see :func:`staged_outputs`): ``outputs`` lists
    ``(value, path)``, each value an ITK transform, an ITK image or a text (``str``), written as
    :func:`write_transform`, :func:`write_image` and :func:`mgr_engine.points.write_text` write
    them. A writer failing on the third (a format refusing the pixel type, a full disk) leaves
    none behind, not even the first two."""
    with staged_outputs() as stage:
        for value, path in outputs:
            staged = stage(path)
            with _write_errors_typed(path, staged):
                if isinstance(value, str):
                    Path(staged).write_text(value, encoding="utf-8")
                elif hasattr(value, "TransformPoint"):
                    _write_transform_file(value, staged)
                else:
                    _write_image_file(value, staged)


def write_image(image, path) -> None:
    """Write an ITK image as ``itk.imwrite`` does, but atomically (see :func:`staged_outputs`)
    and, for a ``.nii.gz``, gzipped on every core (see :func:`_write_image_file`); a scalar
    image also as FreeSurfer's ``.mgz``/``.mgh`` (through nibabel, which ITK's wheels lack;
    float64 voxels as float32, uint16 as int32); :class:`OutputWriteError` when it
    cannot be written (its name checked first, as :func:`check_output_path` does). Public as
    ``mgr_engine.write_image``."""
    _check_itk_image(image, "write_image")  # a path was written as its own text, an array failed in ITK
    check_output_path(path, "image")
    write_outputs([(image, path)])


@contextlib.contextmanager
def _write_errors_typed(path, staged: str):
    """ITK's RuntimeError and the file system's OSError while writing ``path`` (into ``staged``,
    whose name the message does not show), as :class:`OutputWriteError`."""
    import itk

    try:
        yield
    except OutputWriteError:
        raise
    except (RuntimeError, OSError) as exc:
        raise OutputWriteError(f"cannot write {str(path)!r}: {itk_reason(exc).replace(staged, str(path))}") from exc
    except itk.TemplateTypeError as exc:  # a pixel type ITK holds but its wheels' writers do not (uint64)
        raise OutputWriteError(f"cannot write {str(path)!r}: ITK's file writers take no image of this pixel type "
                               f"({exc.__class__.__name__}: {str(exc).splitlines()[0]}); cast it to a type they take "
                               "(uint8, int16, int32, float32, ...) first.") from exc


_ITK_LOCATION = re.compile(r"^\S+:\d+:$")  # "/path/to/itkNrrdImageIO.cxx:935:"
_ITK_ERROR_PREFIX = re.compile(r"^ITK ERROR: \w+\(0x[0-9a-fA-F]+\): ")


def itk_reason(exc) -> str:
    """What went wrong, from an ITK exception's message (or any other's): the line after ITK's
    source location, without its "ITK ERROR: Class(0x...): " prefix; where that line ends with a
    colon (NRRD's "Read: Error reading f.nrrd:", then its chain of troubles), the last line too,
    the innermost cause. MetaImage's last line ("Reason: Success", an errno of 0) and the IO
    factories' lists of what they tried say nothing, so only a colon asks for more."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if lines and _ITK_LOCATION.match(lines[0]):
        lines = lines[1:]
    if not lines:
        return repr(exc)
    reason = _ITK_ERROR_PREFIX.sub("", lines[0])
    return f"{reason} {lines[-1]}" if reason.endswith(":") and len(lines) > 1 else reason


def check_output_path(path, kind: str) -> None:
    """Raise :class:`OutputWriteError` now, before the work whose result goes to ``path``, where
    writing it would fail: its folder missing, a folder in its place, an extension no ITK writer
    of ``kind`` (``"image"``, ``"field"``: a displacement field, or ``"transform"``) takes, a
    transform's ``.mat``, which ITK writes but cannot read back, or a field's MGH file (a scalar
    image's is written through nibabel: :class:`MissingDependencyError` without it). ``"text"``:
    a text file (points, tables), any name."""
    path = Path(path)
    _output_directory(path)
    if path.is_dir():
        raise OutputWriteError(f"output {str(path)!r} is a directory; give a file name.")
    if kind == "text":
        return
    suffix = _suffix(path)
    if kind in ("image", "field") and suffix.lower() in _NIFTI_SUFFIXES and suffix != suffix.lower():
        # ITK's NIfTI IO says it can write these, then refuses the name ("Bad Nifti file name")
        raise OutputWriteError(f"ITK writes NIfTI only with a lowercase extension; name the output "
                               f"{path.name[:-len(suffix)] + suffix.lower()!r}.")
    if kind in ("image", "field") and suffix.lower() in _MGH_SUFFIXES:  # written through nibabel, not ITK
        if kind == "field":
            raise OutputWriteError(f"an MGH file holds scalar volumes, not a displacement field; name the output "
                                   f"{path.name[:-len(suffix)] + '.nii.gz'!r}, which ANTs and ITK read as a field.")
        _nibabel_for_mgh(f"output {path.name!r}")
        return
    if kind == "transform" and suffix.lower() == ".mat":
        # ITK writes a registration's transform there without complaint, and then cannot read it
        # back ("CompositeTransform: Input parameter list size is not expected size")
        raise OutputWriteError(f"ITK's Matlab transform files cannot hold a registration's transform (a displacement "
                               f"field): ITK would not read {path.name!r} back. Name the output .h5 (or .tfm, text).")
    if kind in ("image", "field"):  # a field is an image to ITK's writers
        writer, can_write = "image", _image_writer_exists(path)
        formats = ".nii.gz, .nii, .nrrd, .mha or another format ITK writes"
    else:
        writer, can_write, formats = "transform", _transform_writer_exists(path), ".h5 or .tfm/.txt"
    if can_write is False and writer == "transform":
        lower = path.name[:-len(suffix)] + suffix.lower()
        if suffix and _transform_writer_exists(Path(lower)):  # ITK's transform IOs match lowercase extensions only
            raise OutputWriteError(f"ITK writes transforms only with a lowercase extension; name the output {lower!r}.")
        if suffix and _image_writer_exists(path):
            raise OutputWriteError(
                f"{path.name!r} names an image, not a transform file: name the transform {formats}; the dense "
                "displacement field as an image (ANTs reads a .nii.gz field) is --displacement_field_out "
                "(RegistrationResult.displacement_field()).")
    if can_write is False:
        raise OutputWriteError(f"ITK has no {writer} writer for {path.name!r}; name the output {formats}.")


_NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img", ".img.gz")


def _image_writer_exists(path):
    """Whether an ITK ImageIO writes ``path``'s format; None where it cannot be asked."""
    import itk

    io = _image_io(path)
    if io is not None:
        return bool(io.CanWriteFile(str(path)))
    try:  # an extension of the other formats: ask ITK's IO factories (this loads them all)
        return bool(itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_WriteMode))
    except (AttributeError, TypeError, RuntimeError):
        return None


# The transform file formats ITK's IO module registers: HDF5 (.h5), text (.tfm, .txt), Matlab (.mat).
_TRANSFORM_IOS = ("HDF5", "Txt", "Matlab")


def _transform_writer_exists(path):
    """Whether one of ITK's transform IOs (HDF5, text, Matlab) writes ``path``; None where they
    cannot be asked."""
    ios = [wrapped_class(f"itk{io}TransformIO", f"itk{io}TransformIOTemplateD") for io in _TRANSFORM_IOS]
    if None in ios:
        return None
    return any(io.New().CanWriteFile(str(path)) for io in ios)


# Formats one ITK ImageIO class reads and writes; for these, reading and writing import that
# class alone (see read_image). Other extensions go through ITK's IO factories.
_IMAGE_IO_BY_SUFFIX = {".nii": "Nifti", ".nii.gz": "Nifti", ".nrrd": "Nrrd", ".nhdr": "Nrrd", ".mha": "Meta",
                       ".mhd": "Meta"}
_IMAGE_FILE_SUFFIXES = (*_IMAGE_IO_BY_SUFFIX, *_MGH_SUFFIXES)  # a folder's image files, named in an error
# ITK's names of the pixel component types (ImageIOBase::GetComponentTypeAsString) as they
# appear in its wrapped class names (itkImageFileReaderISS3: short).
_COMPONENT_CODES = {"unsigned_char": "UC", "char": "SC", "unsigned_short": "US", "short": "SS", "unsigned_int": "UI",
                    "int": "SI", "unsigned_long": "UL", "long": "SL", "unsigned_long_long": "ULL", "long_long": "SLL",
                    "float": "F", "double": "D"}


def _image_io(path):
    """A new ITK ImageIO of the one class for ``path``'s extension, or None."""
    name = _IMAGE_IO_BY_SUFFIX.get(_suffix(Path(path)).lower())
    io_class = name and wrapped_class(f"itk{name}ImageIO", f"itk{name}ImageIO")
    return io_class.New() if io_class else None


def read_image(path, header_only: bool = False):
    """``itk.imread(path)``: the image as stored, pixel type included.

    Why not ``itk.imread`` itself: its first call loads every ImageIO module ITK has (DICOM, TIFF,
    JPEG 2000, MINC, HDF5, ...) and what they depend on, ITKTransform among them: a first read
    took 2.1 s against 0.6 s this way (2-core AMD EPYC). A 3-D NIfTI, NRRD or MetaImage file of
    scalars or vectors (a displacement field) is read by its own ImageIO class, imported alone
    (see :func:`wrapped_class`), into the image type ``itk.imread`` picks; a folder of DICOM files
    by ITK's GDCM classes alone, as ``itk.imread`` reads it (:func:`_read_dicom_series`); any
    other file by ``itk.imread``.

    ``header_only``: such a file is read up to its header: the image's size, spacing, origin and
    direction are set, no voxels are read (decompressing a 512x512x300 int16 ``.nii.gz`` took
    0.7-0.8 s). For its grid only (:func:`load_image`'s ``grid_only``): ITK filters must not get
    it, which fail on its empty region or, passing it on in place, crash."""
    import itk

    path = str(path)
    io = _image_io(path)
    if io is not None and io.CanReadFile(path):
        io.SetFileName(path)
        io.ReadImageInformation()
        pixel = _pixel_code(io)
        reader = pixel and io.GetNumberOfDimensions() == 3 and wrapped_class("itkImageFileReader",
                                                                             f"itkImageFileReaderI{pixel}3")
        if reader:
            r = reader.New()
            r.SetImageIO(io)
            r.SetFileName(path)
            return _updated_output(r, header_only)
    with _process_locale_kept():
        if os.path.isdir(path):
            image = _read_dicom_series(path, header_only)
            if image is not None:
                return image
        return itk.imread(path)


def _pixel_code(io):
    """The pixel type ``itk.imread`` reads an ImageIO's image into, as its wrapped classes name
    it ("SS", "F", "VF3", ...); None for another kind (RGB, complex, ...)."""
    component = _COMPONENT_CODES.get(io.GetComponentTypeAsString(io.GetComponentType()))
    pixel = {"scalar": component, "vector": f"V{component}{io.GetNumberOfComponents()}"}
    return component and pixel.get(io.GetPixelTypeAsString(io.GetPixelType()))


def _updated_output(reader, header_only: bool):
    if header_only:
        reader.UpdateOutputInformation()
    else:
        reader.Update()
    return reader.GetOutput()


def _read_dicom_series(folder: str, header_only: bool = False, member: str | None = None):
    """The first DICOM series of ``folder`` as ``itk.imread`` reads a folder (series told apart
    by their details and their date, the first UID's files, an image type from the first file's
    pixel type), through ITK's GDCM and series reader classes imported alone: 0.5 s for a first
    read where ``itk.imread`` took 1.2 s more loading every ImageIO module (torch loaded already,
    2-core AMD EPYC). With ``member`` (a file in ``folder``), the series that file belongs to
    instead, or None where it is alone in its series. None where this ITK or this series needs
    ``itk.imread``'s own way."""
    series_names = wrapped_class("itkGDCMImageIO", "itkGDCMSeriesFileNames")
    gdcm_io = wrapped_class("itkGDCMImageIO", "itkGDCMImageIO")
    if series_names is None or gdcm_io is None:
        return None
    names = series_names.New()
    names.SetUseSeriesDetails(True)
    names.AddSeriesRestriction("0008|0021")  # Series Date
    names.SetDirectory(folder)
    uids = names.GetSeriesUIDs()
    if not uids:
        return None  # itk.imread says there are no DICOM files
    if member is None:
        files = [str(name) for name in names.GetFileNames(uids[0])]
    else:
        member = os.path.realpath(member)
        files = next((series for series in ([str(name) for name in names.GetFileNames(uid)] for uid in uids)
                      if member in map(os.path.realpath, series)), [])
        if len(files) < 2:
            return None
    io = gdcm_io.New()
    io.SetFileName(files[0])
    io.ReadImageInformation()
    if member is not None:
        log.info("%s is one file of a DICOM series: reading the series, %s (%d files)", member,
                 _series_description(io), len(files))
    elif len(uids) > 1:  # a study's export often holds localizers and derived series beside the one meant
        others = []
        for uid in uids[1:]:
            other_files = names.GetFileNames(uid)
            other = gdcm_io.New()
            other.SetFileName(str(other_files[0]))
            other.ReadImageInformation()
            others.append(f"{_series_description(other)} ({len(other_files)} files)")
        log.warning("%s holds %d DICOM series; reading the first, as itk.imread does: %s (%d files). The others: %s. "
                    "To register another, give one of its files (its series is read) or a folder holding it "
                    "alone.", folder, len(uids),
                    _series_description(io), len(files), "; ".join(others))
    dimension = io.GetNumberOfDimensions()
    if io.GetDimensions(dimension - 1) != 1:  # itk.imread stacks files along a new axis then
        dimension += 1
    pixel = _pixel_code(io)
    reader = pixel and dimension == 3 and wrapped_class("itkImageSeriesReader", f"itkImageSeriesReaderI{pixel}3")
    if not reader:
        return None
    r = reader.New()
    r.SetImageIO(io)
    r.SetFileNames(files)
    return _updated_output(r, header_only)


def _series_description(io) -> str:
    """A DICOM series as a person knows it, from a GDCM ImageIO that read one of its files: its
    Series Description and Series Number where the file has them."""
    tags = io.GetMetaDataDictionary()
    number, description = (str(tags[tag]).strip() if tags.HasKey(tag) else "" for tag in ("0020|0011", "0008|103e"))
    named = " ".join(part for part in (number and f"series {number}", description and repr(description)) if part)
    return named or "a series without number or description"


@contextlib.contextmanager
def _process_locale_kept():
    """Put the process's locale back after ITK: its VTK image reader leaves it at "C" (ASCII on
    glibc), and Python's ``open()`` without an encoding then decodes as ASCII (``torch.compile``
    failed reading its own templates in a process that had read a .vtk image)."""
    import locale

    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        if locale.setlocale(locale.LC_ALL) != saved:
            locale.setlocale(locale.LC_ALL, saved)


def _write_image_file(image, path) -> None:
    """``itk.imwrite(image, path)`` (no compression unless the format implies it); to NIfTI, NRRD
    or MetaImage through that format's ImageIO alone (see :func:`read_image`); to MGH through
    nibabel (:func:`_write_mgh`).

    A ``.nii`` or ``.nii.gz`` of the pixel types this engine writes is laid out here
    (:class:`_NiftiBytes`: ITK's header, the voxels straight from the image) and a ``.nii.gz`` is
    gzipped on every core by :func:`gzip_file`: ITK compresses on one core (37 s for a 512x512x300
    displacement field on the 2-core AMD EPYC) and reorders a vector image through a copy of it
    (2.5 s to write that field's ``.nii``, 1.2 s as ``.nrrd``). The file holds the bytes ITK's
    writer gives, once decompressed. Another pixel type's ``.nii.gz`` is written by ITK as
    ``.nii`` beside it, then gzipped."""
    path = str(path)
    if _suffix(Path(path)).lower() in _MGH_SUFFIXES:
        _write_mgh(image, path)
        return
    if path.endswith((".nii", ".nii.gz")):  # ITK takes no other case
        nifti = _NiftiBytes.of(image, os.path.dirname(path) or None)
        if nifti is not None:
            if path.endswith(".gz"):
                gzip_file(nifti, path)
            else:
                nifti.write(path)
            return
    if path.endswith(".nii.gz"):
        _write_then_gzip(lambda uncompressed: _write_with_itk(image, uncompressed), path[: -len(".gz")], path)
        return
    _write_with_itk(image, path)


def _write_then_gzip(write, uncompressed: str, path: str) -> None:
    """``write(uncompressed)``, then that file gzipped on every core into ``path``
    (:func:`gzip_file`) and removed: for writers that compress on one core or not at all."""
    write(uncompressed)
    try:
        gzip_file(uncompressed, path)
    finally:
        os.remove(uncompressed)


def _write_with_itk(image, path) -> None:
    """``itk.imwrite(image, path)`` without compression, through the format's ImageIO alone where
    it has one of its own."""
    import itk

    io, code = _image_io(path), _image_type_code(image)
    writer = wrapped_class("itkImageFileWriter", f"itkImageFileWriter{code}") if io and code else None
    if writer is None:
        itk.imwrite(image, path)
        return
    w = writer.New()
    w.SetImageIO(io)
    w.SetInput(image)
    w.SetFileName(str(path))
    w.SetUseCompression(False)
    w.Update()


# A single-file NIfTI-1: a 348-byte header, 4 bytes of extension flags, then the voxels.
_NIFTI_VOXEL_OFFSET = 352
_NIFTI_DIM_OFFSET = 40  # dim[0..7], 16-bit
_NIFTI_MAX_SIZE = 32767  # dim[] is 16-bit; ITK's writer refuses a longer axis
# The 3-D image types laid out by _NiftiBytes: the scalars ITK's Python writer takes, and
# Vector[F, 3] (a displacement field).
_NIFTI_IMAGE_TYPES = ("IUC3", "IUS3", "ISS3", "IUI3", "ISI3", "IF3", "ID3", "IVF33")


@dataclass
class _NiftiBytes:
    """The bytes of the ``.nii`` ITK's NIfTI writer makes of an image, produced on demand instead
    of through the file: ITK's own header, then the voxels (x fastest; a vector image's components
    one after another, a volume each, which ITK's writer reorders into a copy of the image first).

    The header is the one ITK writes for an image of the same type, spacing, origin and direction
    at 1 or 2 voxels an axis, with the size put into ``dim``: nothing else in it depends on the
    size or on the voxels (tests/test_image_files.py compares whole files with ITK's)."""

    header: bytes
    voxels: np.ndarray  # (Z, Y, X) or (Z, Y, X, components), a view of the image

    @property
    def size(self) -> int:
        """The file's length in bytes."""
        return len(self.header) + self.voxels.nbytes

    @classmethod
    def of(cls, image, scratch_folder=None) -> "_NiftiBytes | None":
        """``image``'s ``.nii`` bytes, or None for the images whose file ITK must write itself
        (another pixel type, an axis longer than a NIfTI-1 header holds, a header not as expected).
        ITK writes the small image's file in a temporary folder in ``scratch_folder`` (default:
        the system's)."""
        import itk

        if _image_type_code(image) not in _NIFTI_IMAGE_TYPES:
            return None
        size = [int(n) for n in image.GetLargestPossibleRegion().GetSize()]
        if max(size) > _NIFTI_MAX_SIZE:
            return None
        small = _allocated_image(type(image), [min(n, 2) for n in reversed(size)], image, zeroed=True)
        with tempfile.TemporaryDirectory(prefix=".nifti_header.", dir=scratch_folder) as folder:
            _write_with_itk(small, os.path.join(folder, "header.nii"))
            with open(os.path.join(folder, "header.nii"), "rb") as f:
                header = bytearray(f.read(_NIFTI_VOXEL_OFFSET))
        order = "<" if header[:4] == struct.pack("<i", 348) else ">"
        dims = struct.unpack_from(f"{order}8h", header, _NIFTI_DIM_OFFSET)
        if (header[:4] != struct.pack(f"{order}i", 348) or header[344:348] != b"n+1\0"
                or struct.unpack_from(f"{order}f", header, 108)[0] != _NIFTI_VOXEL_OFFSET
                or list(dims[1:4]) != [min(n, 2) for n in size]):
            log.debug("ITK's NIfTI header is not the one expected: ITK writes the file")
            return None
        struct.pack_into(f"{order}3h", header, _NIFTI_DIM_OFFSET + 2, *size)
        return cls(bytes(header), itk.array_view_from_image(image))  # the machine's byte order, as ITK's

    def read(self, start: int, length: int):
        """The file's bytes ``start`` to ``start + length`` (fewer at its end), bytes-like."""
        end = min(start + length, self.size)
        parts = [self.header[start:end]] if start < _NIFTI_VOXEL_OFFSET else []
        if end > _NIFTI_VOXEL_OFFSET:
            parts.append(self._voxel_bytes(max(start, _NIFTI_VOXEL_OFFSET) - _NIFTI_VOXEL_OFFSET,
                                           end - _NIFTI_VOXEL_OFFSET))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _voxel_bytes(self, first: int, end: int) -> memoryview:
        """Bytes ``first`` to ``end`` of the voxels as the file holds them."""
        if self.voxels.ndim == 3:
            return memoryview(self.voxels.reshape(-1)).cast("B")[first:end]
        item = self.voxels.itemsize
        element, end_element = first // item, -(-end // item)
        pieces = []
        while element < end_element:
            component, index = divmod(element, self._values.shape[0])
            stop = min(self._values.shape[0], index + end_element - element)
            pieces.append(self._component(component, index, stop))
            element += stop - index
        skip = first - (first // item) * item
        voxels = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        return memoryview(voxels).cast("B")[skip:skip + end - first]

    @property
    def _values(self) -> np.ndarray:
        """A vector image's voxels as (voxels, components)."""
        return self.voxels.reshape(-1, self.voxels.shape[-1])

    def _component(self, component: int, start: int, stop: int) -> np.ndarray:
        """Voxels ``start`` to ``stop`` of one component, contiguous: a strided copy."""
        return np.ascontiguousarray(self._values[start:stop, component])

    def write(self, path) -> None:
        """Write the file to ``path``: no more than one slab of a vector image's component is
        copied at a time."""
        with open(path, "wb") as f:
            f.write(self.header)
            if self.voxels.ndim == 3:
                f.write(memoryview(self.voxels.reshape(-1)).cast("B"))
                return
            count, components = self._values.shape
            step = max(1, _NIFTI_WRITE_BYTES // self.voxels.itemsize)
            for component in range(components):
                for start in range(0, count, step):
                    f.write(self._component(component, start, min(start + step, count)))


_NIFTI_WRITE_BYTES = 16 << 20


def _fast_deflate():
    """The deflate module and level ``.nii.gz`` outputs are compressed with: ISA-L's
    (``isal``, a dependency where it ships wheels) at its level 2, else the standard library's
    zlib at level 1 (nibabel's). Both shrink this project's outputs as much as each other; ISA-L
    takes 1/3 (int16 image) to 1/8 (displacement field) of zlib's time. ITK's own files are
    0.1-4% smaller, 9% for a label map (benchmarks/bench_nii_gz.py)."""
    try:
        from isal import isal_zlib

        return isal_zlib, 2
    except ImportError:
        return zlib, 1


# pigz's scheme: each chunk is deflated on its own, primed with the 32 KiB before it (deflate's
# window, so the ratio is as one stream's) and ended on a byte boundary by a sync flush; the
# chunks joined are one valid deflate stream, any gzip reader reads it.
_GZIP_CHUNK_BYTES = 1 << 20
_DEFLATE_WINDOW_BYTES = 1 << 15
# A chunk the fast deflate shrinks 8-fold or more (a label map, a mask, air) is deflated again
# by zlib at level 6: quick on such data, and 1.6-2x smaller on a label map, about ITK's size.
_RECOMPRESSED_BELOW_RATIO = 8
_MAX_GZIP_THREADS = 16


def default_gzip_threads() -> int:
    """The threads :func:`gzip_file` takes by default: the cores this process may use, at most 16,
    and at most ``OMP_NUM_THREADS`` where it is set (:func:`mgr_engine.kernel_modes.usable_cores`).
    ISA-L deflates a float field at about 260 MB/s a thread here, so 16 outrun most disks; and a
    container that sees a host's 128 cores under a 2-CPU quota would otherwise hold 256 chunks
    (0.5 GB) in flight."""
    from .kernel_modes import usable_cores

    return min(usable_cores(), _MAX_GZIP_THREADS)


def gzip_file(source, target, threads: int | None = None, deflate=None) -> None:
    """Write ``source``'s bytes to ``target`` as a gzip file of one member, compressed on
    ``threads`` threads (default: :func:`default_gzip_threads`; zlib and ISA-L work without the
    GIL) by ``deflate``, a (module, level) pair such as ``(zlib, 1)`` (default:
    :func:`_fast_deflate`'s). ``source``: a file's path, or bytes produced on demand (an object
    with ``size`` and ``read(start, length)``, as :class:`_NiftiBytes`). The bytes do not depend
    on ``threads``; the header's time stamp is 0, as ITK writes it."""
    deflate_module, level = deflate or _fast_deflate()
    threads = max(1, default_gzip_threads() if threads is None else threads)
    if isinstance(source, (str, os.PathLike)):
        size = os.path.getsize(source)

        def read_source(start: int, length: int) -> bytes:
            with open(source, "rb") as f:  # a file object each: threads do not share a position
                f.seek(start)
                return f.read(length)
    else:
        size, read_source = source.size, source.read
    with open(target, "wb") as out, ThreadPoolExecutor(threads) as pool:

        def compress_chunk(start: int):
            """(the chunk, its deflate stream); read here, so that only the chunks in flight
            are in memory (a field's .nii is 0.9 GB), with the window before it."""
            primer = min(start, _DEFLATE_WINDOW_BYTES)
            read = read_source(start - primer, primer + _GZIP_CHUNK_BYTES)
            chunk, end = read[primer:], min(start + _GZIP_CHUNK_BYTES, size)

            def deflated(module, module_level):
                compressor = module.compressobj(module_level, zlib.DEFLATED, -zlib.MAX_WBITS,
                                                **({"zdict": bytes(read[:primer])} if primer else {}))
                return compressor.compress(chunk) + compressor.flush(zlib.Z_FINISH if end == size else zlib.Z_SYNC_FLUSH)

            compressed = deflated(deflate_module, level)
            if len(compressed) * _RECOMPRESSED_BELOW_RATIO < len(chunk):
                compressed = deflated(zlib, 6)
            return chunk, compressed

        # RFC 1952: magic, deflate, no flags, time 0, no level hint, OS unknown
        out.write(struct.pack("<4BIBB", 0x1F, 0x8B, zlib.DEFLATED, 0, 0, 0, 255))
        crc, pending = 0, deque()

        def write_oldest() -> None:
            nonlocal crc
            chunk, compressed = pending.popleft().result()
            out.write(compressed)
            crc = deflate_module.crc32(chunk, crc)  # ISA-L's: a 0.9 GB field's in 0.08 s, zlib's 0.26 s

        for start in range(0, max(size, 1), _GZIP_CHUNK_BYTES):
            pending.append(pool.submit(compress_chunk, start))
            if len(pending) > 2 * threads:  # two chunks a thread in flight: memory stays bounded
                write_oldest()
        while pending:
            write_oldest()
        out.write(struct.pack("<II", crc, size & 0xFFFFFFFF))


def write_transform(transform, path) -> None:
    """Write an ITK transform (.h5, .tfm; .mat only for a transform without a displacement field,
    see :func:`check_output_path`) atomically; readable by ``itk.transformread``;
    :class:`OutputWriteError` when it cannot be written."""
    write_outputs([(transform, path)])


def _write_transform_file(transform, path) -> None:
    """``itk.transformwrite([transform], path)``, without loading ITKIOTransformBase's dependencies."""
    import itk

    writer = _transform_file_class("Writer")
    if writer is None:
        itk.transformwrite([transform], path)
        return
    w = writer.New()
    w.SetFileName(str(path))
    w.AddTransform(transform)
    w.Update()


def read_transform(path):
    """The first transform of an ITK transform file (.h5, .tfm, .mat), as ``itk.transformread``
    gives it, or a displacement field image (NIfTI, NRRD, MetaImage: :func:`field_image_transform`);
    :class:`ImageReadError` when it cannot be read."""
    import itk

    if not Path(path).is_file():  # else ITK's HDF5 library prints a page of diagnostics first
        what = "is a directory" if Path(path).is_dir() else f"does not exist{tilde_hint(path)}"
        raise ImageReadError(f"transform {str(path)!r} {what}; give the path of an ITK .h5/.tfm file.")
    if _suffix(Path(path)).lower() in _IMAGE_IO_BY_SUFFIX:
        return field_image_transform(path)
    reader = _transform_file_class("Reader")
    try:
        if reader is None:
            return itk.transformread(str(path))[0]
        r = reader.New()
        r.SetFileName(str(path))
        r.Update()
        # pop() hands over the list's references (an element read in place would die with the reader)
        listed, transforms = r.GetModifiableTransformList(), []
        while not listed.empty():
            transforms.append(listed.pop())
        return down_cast(transforms[-1])  # popped from the back: the file's first
    except Exception as exc:
        raise ImageReadError(f"cannot read transform {str(path)!r} ({exc.__class__.__name__}: {itk_reason(exc)}); "
                             "pass an ITK .h5/.tfm/.mat file or a displacement field image.") from exc


def field_image_transform(path):
    """A displacement field image file (``register --displacement_field_out``'s, ANTs' ``Warp``
    fields) as an ITK ``DisplacementFieldTransform``: a point p of the field's grid -> ``p +
    field(p)`` (mm, LPS; linear between voxels, no displacement outside the grid), as
    antsApplyTransforms and ITK take such a field. :class:`ImageReadError` for an image that is not
    a 3-D field of 3 finite components per voxel."""
    import itk

    try:
        field = read_image(path)
    except Exception as exc:
        raise ImageReadError(f"cannot read the displacement field {str(path)!r} ({exc.__class__.__name__}: "
                             f"{itk_reason(exc)}).") from exc
    array = itk.array_view_from_image(field)
    if field.GetImageDimension() != 3 or array.ndim != 4 or array.shape[-1] != 3:
        components = array.shape[-1] if array.ndim == field.GetImageDimension() + 1 else 1
        raise ImageReadError(
            f"transform {str(path)!r} is a {field.GetImageDimension()}-D image of {components} component"
            f"{'s' * (components != 1)} per voxel, not a displacement field (3-D, 3 components: x, y, z in mm); "
            "give a transform file (.h5, .tfm) or a displacement field image.")
    if not np.isfinite(array).all():
        raise ImageReadError(f"displacement field {str(path)!r} has NaN or infinite displacements.")
    double = _allocated_image(itk.Image[itk.Vector[itk.D, 3], 3], array.shape[:3], field)  # the transform's type
    itk.array_view_from_image(double)[...] = array
    return _field_transform(double)


def down_cast(obj):
    """``itk.down_cast(obj)``: ``obj`` as its most derived wrapped class, looked up in that class's
    own wrapper module (see :func:`wrapped_class`): ``itk.down_cast`` looks it up through the lazy
    loader, which loads ITKTransform whole for a transform read from a file (1.2 s)."""
    import itk

    class_name = obj.GetNameOfClass()
    with contextlib.suppress(ImportError):
        module = importlib.import_module(f"itk.itk{class_name}Python")
        # its instantiations: itkCompositeTransformD3, ...; cast() raises on all but obj's own
        for name in dir(module):
            if re.fullmatch(f"itk{class_name}[A-Z]+[0-9]*", name) and hasattr(getattr(module, name), "cast"):
                with contextlib.suppress(RuntimeError):
                    return getattr(module, name).cast(obj)
    return itk.down_cast(obj)


def _transform_file_class(kind: str):
    """ITK's ``TransformFile<kind>Template[D]`` (``"Reader"`` or ``"Writer"``) with the transform
    IOs registered; None where the wrappers are laid out otherwise (see :func:`wrapped_class`)."""
    file_class = wrapped_class(f"itkTransformFile{kind}", f"itkTransformFile{kind}TemplateD")
    return file_class if file_class is not None and _transform_ios_registered() else None


@functools.lru_cache(maxsize=1)
def _transform_ios_registered() -> bool:
    """Register ITK's HDF5, text and Matlab transform IOs, as loading ITKIOTransformBase whole
    does; whether all three were found."""
    factories = [wrapped_class(f"itk{io}TransformIO", f"itk{io}TransformIOFactory") for io in _TRANSFORM_IOS]
    if None in factories:
        return False
    for factory in factories:
        factory.RegisterOneFactory()
    return True


def resample(image, transform, reference, interpolation: str = "linear"):
    """``image`` resampled onto ``reference``'s grid through ``transform`` (reference point ->
    image point), outside the image 0; the pixel type is kept. ITK's ResampleImageFilter with
    its linear or nearest-neighbour interpolator, imported alone (see :func:`wrapped_class`:
    through the lazy loader, ITKImageFunction and ITKImageGrid cost 1.9 s of a one-shot
    ``mgr-engine warp``)."""
    import itk

    from .resample import check_interpolation

    check_interpolation(interpolation)
    interpolator_name = {"linear": "LinearInterpolateImageFunction",
                         "nearest": "NearestNeighborInterpolateImageFunction"}[interpolation]
    code = _image_type_code(image)
    interpolator = code and wrapped_class(f"itk{interpolator_name}", f"itk{interpolator_name}{code}D")
    resampler = code and wrapped_class("itkResampleImageFilter", f"itkResampleImageFilter{code}{code}")
    if interpolator and resampler:
        f = resampler.New()
        f.SetInput(image)
        f.SetTransform(transform)
        f.SetInterpolator(interpolator.New())
        f.SetUseReferenceImage(True)
        f.SetReferenceImage(reference)
        f.Update()
        return f.GetOutput()
    # ITK's Python wrapping instantiates interpolators for some pixel types only: through double
    lazy_interpolator = getattr(itk, interpolator_name)
    original_type = type(image)
    try:
        lazy_interpolator[original_type, itk.D]
        cast_back = None
    except (KeyError, TypeError):
        image = itk.CastImageFilter[original_type, itk.Image[itk.D, 3]].New()(image)
        cast_back = itk.CastImageFilter[itk.Image[itk.D, 3], original_type].New()
    warped = itk.resample_image_filter(image, transform=transform, interpolator=lazy_interpolator.New(image),
                                       use_reference_image=True, reference_image=reference)
    return warped if cast_back is None else cast_back(warped)


def _image_type_code(image):
    """The code of an ``itk.Image``'s type in ITK's wrapped class names (``itkImageSS3``:
    ``"ISS3"``), or None for another type."""
    name = type(image).__name__
    return "I" + name[len("itkImage"):] if name.startswith("itkImage") else None
