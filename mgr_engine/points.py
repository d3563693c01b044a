"""Points through a registration's transform: landmarks in fixed space -> where they lie in moving
space (mm), what a target registration error compares with the moving image's landmarks.

A registration's transform maps a fixed-space point to its moving-space point (ITK's convention),
so points go the way images do not: landmarks of the fixed image come out in the moving image.
Points are physical coordinates in ITK's LPS convention (x grows to the patient's left, y to
the posterior), the space of the images' origins; 3D Slicer and other RAS tools negate x and y.

Points files (``mgr-engine transform-points``, :func:`read_points`, :func:`write_points`) are
text tables, one point per row, columns separated by commas, semicolons or blanks:

- a header row names the columns ``x, y, z`` (ANTs' ``antsApplyTransformsToPoints`` CSV),
  ``r, a, s`` (RAS) or ``l, p, s`` (LPS); without one the first three columns are x, y, z;
- lines starting with ``#`` are comments; 3D Slicer's ``.fcsv`` declares its columns there
  (``# columns = id,x,y,z,...``) and its coordinate system (``# CoordinateSystem = RAS``, or
  ``0`` for RAS and ``1`` for LPS in older files);
- the other columns (labels, descriptions) and the comments are written back unchanged, only
  the coordinates replaced, in the file's own coordinate system.

3D Slicer's markups JSON (``.mrk.json``, its default since 4.11) is read too: the ``position``
of every control point of its markups, in each markup's ``coordinateSystem``; written back with
the positions replaced and everything else kept. Control points not placed (``positionStatus``
``"undefined"``, a list's names waiting for their points) keep what they had.

Landmarks given as voxel indices (DIR-Lab's and Learn2Reg's tables) are continuous indices
(i, j, k) of an image's voxel grid in ITK's index order, which is the order of a NIfTI file's
voxel axes and of nibabel's array axes (the reverse of ``itk.array_from_image``'s z, y, x):
:func:`indices_to_points` and :func:`points_to_indices` convert them through the image's
spacing, origin and direction, counting from 0 or, for tables that count from 1, from 1.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import ImageReadError, InvalidOptionError, InvalidPointsError, tilde_hint

log = logging.getLogger(__name__)

COORDINATE_SYSTEMS = ("LPS", "RAS")
_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])  # either way: x and y negated
_COLUMN_NAMES = {("x", "y", "z"): None, ("l", "p", "s"): "LPS", ("r", "a", "s"): "RAS"}
_DECLARED_SYSTEM = re.compile(r"^#\s*CoordinateSystem\s*=\s*(\w+)", re.IGNORECASE)
_DECLARED_COLUMNS = re.compile(r"^#\s*columns\s*=\s*(.+)$", re.IGNORECASE)
_SLICER_SYSTEM_CODES = {"0": "RAS", "1": "LPS"}  # Slicer's markups files before 4.11
_VOXEL = "voxel"  # read_points' coordinate system of a file of voxel indices


def as_points(points, name: str = "points") -> np.ndarray:
    """``points`` (an array, or a :class:`PointsFile` of points in mm) as an (N, 3) float64 array of
    finite numbers; :class:`InvalidPointsError` otherwise."""
    if isinstance(points, PointsFile):  # read_points' result, whose .points was meant
        if points.coordinate_system == _VOXEL:
            raise InvalidPointsError(f"{name} are voxel indices (read with voxel_indices=True): convert them to mm "
                                     "first, with mgr_engine.points.indices_to_points(file.points, image).")
        points = points.points
    if isinstance(points, (str, os.PathLike)):
        raise InvalidPointsError(f"{name} {str(points)!r} is a path, not points: read a points file with "
                                 "mgr_engine.read_points(path).points (in mm, LPS, whatever the file's convention).")
    try:
        array = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidPointsError(f"{name} are not numbers ({exc}); pass an (N, 3) array of x, y, z in mm.") from None
    if array.ndim == 1 and array.shape[0] == 3:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != 3:
        raise InvalidPointsError(f"{name} have shape {array.shape}; pass an (N, 3) array of x, y, z in mm (LPS).")
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        raise InvalidPointsError(f"{name}: point {int(np.argmax(bad))} is not finite ({array[bad][0].tolist()}); "
                                 "remove or fix it.")
    return array


def transform_points(transform, points) -> np.ndarray:
    """The (N, 3) physical points (x, y, z, mm, LPS) that ``transform`` maps ``points`` to, as
    ITK's ``transform.TransformPoint`` maps each: for a registration's transform, fixed-space
    points (landmarks of the fixed image) -> their moving-space points.

    ``transform``: an ITK transform, the path of a transform file (.h5, .tfm) or a
    :class:`mgr_engine.RegistrationResult` (its ``transform``); ``points``: an (N, 3) array (or
    one point) or a :class:`PointsFile` in mm. A transform of this engine's form (a displacement
    field between linear transforms, as this engine and unigradicon write) is evaluated for all
    points at once (:func:`mgr_engine.resample.transformed_points`), any other point by point by
    ITK. Points of the former outside the image it was computed on are warned of: there it has
    no displacement."""
    from . import itk_io
    from .resample import points_outside_field, transformed_points

    points = as_points(points)
    if isinstance(transform, (str, os.PathLike)):
        transform = itk_io.read_transform(transform)
    elif hasattr(transform, "phi_ab") and hasattr(transform, "transform"):  # a RegistrationResult
        transform = transform.transform
    if not hasattr(transform, "TransformPoint"):
        raise InvalidOptionError(f"transform_points takes an ITK transform, a transform file's path or a registration "
                                 f"result, not a {type(transform).__name__}.")
    grid = itk_io.grid_transform(transform)
    if grid is not None:
        outside = np.flatnonzero(points_outside_field(grid, points))
        if outside.size:  # most often points of another coordinate system (RAS) or image
            first = outside[0]
            log.warning("%d of %d points (first: point %d, at %s mm) lie outside the image the transform was "
                        "computed on, where it has no displacement field: as ITK does, they are moved by its linear "
                        "parts alone. Are they in mm in ITK's LPS (RAS, as 3D Slicer's, negates x and y), and points "
                        "of the right image?", outside.size, len(points), first,
                        "(" + ", ".join(f"{c:g}" for c in points[first]) + ")")
        return transformed_points(grid, points)
    return np.array([tuple(transform.TransformPoint([float(c) for c in point])) for point in points],
                    dtype=np.float64).reshape(-1, 3)


def indices_to_points(indices, image, index_base: int = 0) -> np.ndarray:
    """(N, 3) continuous voxel indices (i, j, k, see the module's description) of ``image`` -> their
    physical points (x, y, z, mm, LPS).

    ``image``: an ``itk.Image``, an :class:`mgr_engine.itk_io.ImageGrid` or an image file's path
    (read up to its header); ``index_base``: 0 where the first voxel's index is 0, 1 where it is 1."""
    matrix, offset = _index_affine(image, index_base)
    return as_points(indices, "voxel indices") @ matrix.T + offset


def points_to_indices(points, image, index_base: int = 0) -> np.ndarray:
    """The inverse of :func:`indices_to_points`: (N, 3) physical points (LPS mm) -> continuous
    voxel indices (i, j, k) of ``image``, counted from ``index_base``."""
    matrix, offset = _index_affine(image, index_base)
    return np.linalg.solve(matrix, (as_points(points) - offset).T).T


def _index_affine(image, index_base: int):
    """``(matrix, offset)``: index (counted from ``index_base``) -> physical point of ``image``."""
    from . import itk_io

    if index_base not in (0, 1):
        raise InvalidOptionError(f"index base {index_base!r}: voxel indices count from 0 or from 1")
    grid = image if isinstance(image, itk_io.ImageGrid) else itk_io.load_image(image, "landmarks' reference", grid_only=True)
    affine = itk_io.index_to_physical_affine(grid)
    return affine[:, :3], affine[:, 3] - index_base * affine[:, :3].sum(axis=1)


def landmark_distances(points, targets) -> np.ndarray:
    """The (N,) distances (mm) between corresponding rows of two (N, 3) point sets: with the
    fixed landmarks moved by a registration's transform and the moving image's landmarks, the
    target registration error of each."""
    points, targets = as_points(points), as_points(targets, "target points")
    if len(points) != len(targets):
        raise InvalidPointsError(f"{len(points)} points against {len(targets)} target points; the landmarks "
                                 "correspond row by row.")
    return np.linalg.norm(points - targets, axis=1)


@dataclass
class PointsFile:
    """A points file as read (:func:`read_points`): ``points`` (N, 3) in LPS mm, the file's
    ``coordinate_system`` (``"LPS"`` or ``"RAS"``; in a markups JSON each markup keeps its own;
    ``"voxel"`` for voxel indices, which ``points`` then are), which points were ``placed`` (3D
    Slicer's lists keep control points not placed yet, at a position that means nothing: a target
    registration error leaves them out, and they are written back as they were), and its layout,
    for :func:`write_points` to write other points in it."""

    points: np.ndarray
    coordinate_system: str
    placed: np.ndarray  # (N,) bool: False for a markup's control point not placed (positionStatus "undefined")
    _signs: np.ndarray  # (N, 3): each point from LPS to the file's coordinates
    _render: Callable[[np.ndarray], str]  # the file's text with other points, in the file's coordinates

    def text_with(self, points: np.ndarray) -> str:
        """The file's text with ``points`` (N, 3, LPS mm, or voxel indices for a file of them) in place of
        its own."""
        points = as_points(points)
        if len(points) != len(self.points):
            count = f"{len(points)} point{'' if len(points) == 1 else 's'}"
            raise InvalidPointsError(f"{count} to write in the layout of a file of {len(self.points)}: give one point "
                                     "for each of its rows (like= is that file).")
        return self._render(points * self._signs)


def read_points(path, coordinate_system: str | None = None, voxel_indices: bool = False) -> PointsFile:
    """Read a points file (see the module's description); its points in LPS mm.

    ``coordinate_system``: ``"LPS"`` or ``"RAS"``, for a file that does not declare its own
    (default LPS, ITK's); one that contradicts the file's declaration raises
    :class:`InvalidOptionError`. ``voxel_indices=True``: the file holds voxel indices, which
    ``points`` are then, as written (for :func:`indices_to_points`; ``coordinate_system`` is
    ``"voxel"``); a file that declares a coordinate system raises :class:`InvalidPointsError`."""
    if coordinate_system is not None and coordinate_system.upper() not in COORDINATE_SYSTEMS:
        raise InvalidOptionError(f"unknown coordinate system {coordinate_system!r}: use 'LPS' or 'RAS'")
    if voxel_indices:
        if coordinate_system is not None:
            raise InvalidOptionError("voxel indices have no coordinate system; give one or the other")
        coordinate_system = _VOXEL
    path = Path(path)
    if not path.is_file():
        what = "is a directory; give a file" if path.is_dir() else f"does not exist{tilde_hint(path)}; check the path"
        raise ImageReadError(f"points file {str(path)!r} {what}.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ImageReadError(f"cannot read points file {str(path)!r} ({exc.strerror or exc}); check the path.") from exc
    except UnicodeDecodeError as exc:  # readable, but its content is not what a points file holds
        raise InvalidPointsError(f"points file {str(path)!r} is not UTF-8 text (byte {exc.start}); give a text table "
                                 "of x, y, z saved as UTF-8, or a 3D Slicer markups file.") from None
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        return _read_markups_json(path, text, coordinate_system)
    return _read_table(path, text, coordinate_system)


def _read_table(path: Path, text: str, asked) -> PointsFile:
    """A text table of points (see the module's description)."""
    declared, names, lines, delimiter, rows = None, None, [], None, []
    table_started = False
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            lines.append(line)
            if match := _DECLARED_SYSTEM.match(line.strip()):
                value = match.group(1).upper()
                declared = _SLICER_SYSTEM_CODES.get(value, value)
            elif match := _DECLARED_COLUMNS.match(line.strip()):
                names = [name.strip().lower() for name in next(csv.reader([match.group(1)]))]
            continue
        if not table_started:  # the first row decides the delimiter, and whether it is a header
            table_started = True
            delimiter = "," if "," in line else ";" if ";" in line else None
            fields = _fields(line, delimiter)
            if names is None and not _all_numbers(fields[:3]):
                names = [field.lower() for field in fields]
                lines.append(line)
                continue
        fields = _fields(line, delimiter)
        lines.append(fields)
        rows.append((number, fields))
    columns, named_system = _coordinate_columns(names, path)
    system = _file_system(path, declared, named_system, asked)
    if not rows:
        raise InvalidPointsError(f"points file {str(path)!r} holds no points; one row per point, columns x, y, z.")
    points = np.empty((len(rows), 3), dtype=np.float64)
    for i, (number, fields) in enumerate(rows):
        try:
            points[i] = [float(fields[column]) for column in columns]
        except (IndexError, ValueError):
            raise InvalidPointsError(f"{path.name}, line {number}: no x, y, z numbers in columns "
                                     f"{[c + 1 for c in columns]} of {fields}; one point per row.") from None

    def render(coordinates: np.ndarray) -> str:
        rows_out, out = iter(coordinates), []
        for line in lines:
            if isinstance(line, str):  # a comment, the header
                out.append(line)
                continue
            fields = list(line)
            for column, value in zip(columns, next(rows_out)):
                fields[column] = repr(float(value))  # the shortest text that reads back as the same float
            out.append(_row(fields, delimiter))
        return "\n".join(out) + "\n"

    signs = np.tile(_RAS_TO_LPS if system == "RAS" else np.ones(3), (len(points), 1))
    return PointsFile(as_points(points * signs, f"points of {path.name}"), system, np.ones(len(points), bool), signs,
                      render)


def _read_markups_json(path: Path, text: str, asked) -> PointsFile:
    """3D Slicer's markups file (``.mrk.json``): the control points of its markups, each markup in
    its ``coordinateSystem`` (where it names none: the one asked for, else LPS, the format's
    default)."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidPointsError(f"points file {str(path)!r} is not valid JSON ({exc}).") from None
    markups = document.get("markups") if isinstance(document, dict) else None
    if not isinstance(markups, list):
        raise InvalidPointsError(f"points file {str(path)!r} holds no \"markups\" list; give a 3D Slicer markups "
                                 "file (.mrk.json) or a text table of x, y, z.")
    control_points, systems, positions, placed = [], [], [], []
    for markup in markups:
        if not isinstance(markup, dict):
            raise InvalidPointsError(f"points file {str(path)!r}: a markup is {markup!r}, not an object.")
        declared = str(markup["coordinateSystem"]).upper() if "coordinateSystem" in markup else None
        system = _file_system(path, declared, None, asked)
        for point in markup.get("controlPoints") or []:
            position = point.get("position") if isinstance(point, dict) else None
            placed.append(point.get("positionStatus") != "undefined" if isinstance(point, dict) else True)
            if not placed[-1] and not (isinstance(position, list) and len(position) == 3):
                position = [0.0, 0.0, 0.0]  # a point not placed may have no position: none is written back
            if not isinstance(position, list) or len(position) != 3:
                raise InvalidPointsError(f"points file {str(path)!r}: control point {point!r} has no position [x, y, z].")
            control_points.append(point)
            systems.append(system)
            positions.append(position)
    if not control_points:
        raise InvalidPointsError(f"points file {str(path)!r} holds no control points.")
    signs = np.array([_RAS_TO_LPS if system == "RAS" else np.ones(3) for system in systems])
    points = as_points(positions, f"points of {path.name}") * signs

    def render(coordinates: np.ndarray) -> str:
        for point, position, is_placed in zip(control_points, coordinates, placed):
            if is_placed:
                point["position"] = [float(value) for value in position]
        try:
            return json.dumps(document, indent=4, ensure_ascii=False) + "\n"  # labels as written: the file is UTF-8
        finally:
            for point, position, is_placed in zip(control_points, positions, placed):
                if is_placed:
                    point["position"] = position  # the document as read, for the next call

    return PointsFile(points, systems[0], np.array(placed), signs, render)


def _fields(line: str, delimiter) -> list:
    """A row's fields: CSV rules (quotes) for a comma or semicolon, else split at blanks."""
    if delimiter is None:
        return line.split()
    return [field.strip() for field in next(csv.reader([line], delimiter=delimiter))]


def _row(fields, delimiter) -> str:
    """A row's fields joined as :func:`_fields` splits them."""
    if delimiter is None:
        return " ".join(fields)
    text = io.StringIO()
    csv.writer(text, delimiter=delimiter, lineterminator="").writerow(fields)
    return text.getvalue()


def _all_numbers(fields) -> bool:
    try:
        [float(field) for field in fields]
    except ValueError:
        return False
    return True


def _coordinate_columns(names, path: Path):
    """The x, y, z columns' indices from a header's ``names`` (the first three without one), and
    the coordinate system the names imply (None for x, y, z)."""
    if names is None:
        return (0, 1, 2), None
    for wanted, system in _COLUMN_NAMES.items():
        if all(name in names for name in wanted):
            return tuple(names.index(name) for name in wanted), system
    raise InvalidPointsError(f"points file {str(path)!r}: its header {names} names no x, y, z (or r, a, s) columns; "
                             "name them, or leave the header out with x, y, z as the first three columns.")


def _file_system(path: Path, declared, named, asked) -> str:
    """The coordinate system of a file: what it declares (a comment, its column names), else what
    the caller asked for, else LPS; a caller's contradicting a file's declaration raises."""
    if declared is not None and declared not in COORDINATE_SYSTEMS:
        raise InvalidPointsError(f"points file {str(path)!r} declares coordinate system {declared!r}; "
                                 "mgr_engine reads LPS or RAS.")
    if declared and named and declared != named:
        raise InvalidPointsError(f"points file {str(path)!r} declares {declared} but names its columns as {named}.")
    own = declared or named
    if own and asked == _VOXEL:
        raise InvalidPointsError(f"points file {str(path)!r} declares {own} physical coordinates, not voxel indices; "
                                 "read it as physical points (no voxel-index option).")
    if asked == _VOXEL:
        return _VOXEL
    if own and asked and asked.upper() != own:
        raise InvalidOptionError(f"points file {str(path)!r} declares {own} coordinates, not {asked.upper()}; "
                                 "leave the coordinate system out (the file's own is used).")
    return own or (asked.upper() if asked else "LPS")


def write_points(points, path, like: PointsFile | None = None) -> None:
    """Write (N, 3) ``points`` (LPS mm) atomically: in ``like``'s layout and coordinate system
    (its other columns and comments kept), else as a CSV with the header ``x,y,z`` (LPS)."""
    points = as_points(points)
    if like is None:
        text = "x,y,z\n" + "".join(",".join(repr(float(c)) for c in point) + "\n" for point in points)
    else:
        text = like.text_with(points)
    write_text(text, path)


def write_text(text: str, path) -> None:
    """Write a text file (points, tables) atomically (see :func:`mgr_engine.itk_io.staged_outputs`)."""
    from .itk_io import check_output_path, write_outputs

    check_output_path(path, "text")
    write_outputs([(text, path)])
