"""Points through a transform (mgr_engine.points): against ITK's TransformPoint, and points files."""

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import affine_transform, composite, oblique_field_transform, oblique_registration, random_map, read_back
from mgr_engine import itk_io, points, resample
from mgr_engine.cli import main
from mgr_engine.errors import ImageReadError, InvalidOptionError, InvalidPointsError, OutputWriteError

itk = pytest.importorskip("itk")


def itk_transform_points(transform, at):
    return np.array([tuple(transform.TransformPoint([float(c) for c in point])) for point in at])


def points_around(image, count, seed, margin=3.0):
    """``count`` random physical points over ``image``'s grid and up to ``margin`` voxels beyond it."""
    size = np.array(image.GetLargestPossibleRegion().GetSize(), dtype=np.float64)
    index = np.random.default_rng(seed).uniform(-margin, size - 1 + margin, (count, 3))
    affine = itk_io.index_to_physical_affine(image)
    return index @ affine[:, :3].T + affine[:, 3]


@pytest.fixture(scope="module")
def registration():
    result = oblique_registration()
    result.phi_ba = random_map(tuple(result.phi_ab.shape[2:]), 0.05, seed=14)[None]  # the inverse direction's map
    return result


@pytest.mark.parametrize("inverse", [False, True])
def test_a_results_points_match_itks_transform_point(registration, inverse):
    transform = registration.inverse_transform if inverse else registration.transform
    at = points_around(registration.moving if inverse else registration.fixed, 500, seed=1)
    expected = itk_transform_points(transform, at)
    moved = registration.transform_points(at, inverse=inverse)
    assert moved.shape == (500, 3) and moved.dtype == np.float64
    shift = np.linalg.norm(expected - at, axis=1)
    assert shift.max() > 2.0, "the test wants a transform that moves points (mm)"
    np.testing.assert_allclose(moved, expected, rtol=0, atol=1e-9)


def test_the_field_adds_nothing_from_half_a_voxel_beyond_its_grid():
    """ITK's rule: a grid position in [-0.5, n - 0.5) is inside (the edge value repeated beyond
    the edge), anything else gets no displacement."""
    phi = random_map((6, 7, 5), 0.1, seed=3).numpy()
    transform = itk_io.displacement_transform(phi)  # unit spacing, zero origin: grid position = point
    nx, ny, nz = 5, 7, 6
    at = np.array([[-0.5, 3.0, 2.0], [-0.5 - 1e-9, 3.0, 2.0], [nx - 0.5, 3.0, 2.0], [nx - 0.5 - 1e-9, 3.0, 2.0],
                   [2.0, -0.5, 2.0], [2.0, ny - 0.5, 2.0], [2.0, 3.0, nz - 0.5 - 1e-9], [2.0, 3.0, -0.25],
                   [1.25, 2.5, 3.75], [0.0, 0.0, 0.0], [nx - 1.0, ny - 1.0, nz - 1.0]])
    moved = points.transform_points(transform, at)
    np.testing.assert_allclose(moved, itk_transform_points(transform, at), rtol=0, atol=1e-12)
    unmoved = np.all(moved == at, axis=1)
    assert unmoved.tolist() == [False, True, True, False, False, True, False, False, False, False, False]


def test_points_outside_the_transforms_image_are_warned_of(registration, caplog):
    """Landmarks of another image, or in another coordinate system (RAS given as LPS), fall
    outside the field, where ITK's rule moves them by the affines alone: they came back without
    a word, looking like landmarks the registration left where they were."""
    inside = points_around(registration.fixed, 6, seed=2, margin=0.0)
    with caplog.at_level("WARNING", logger="mgr_engine"):
        registration.transform_points(inside)
    assert "outside" not in caplog.text
    elsewhere = inside + [200.0, 0.0, 0.0]  # 20 cm away from the 2-cm image
    at = np.concatenate([inside[:2], elsewhere])
    grid = itk_io.grid_transform(registration.transform)
    assert resample.points_outside_field(grid, at).tolist() == [False] * 2 + [True] * 6
    by_affines_alone = (at @ grid.to_grid[:, :3].T + grid.to_grid[:, 3]) @ grid.from_grid[:, :3].T + grid.from_grid[:, 3]
    moved = resample.transformed_points(grid, at)
    np.testing.assert_allclose(moved[2:], by_affines_alone[2:], rtol=0, atol=1e-9)
    assert np.abs(moved[:2] - by_affines_alone[:2]).max() > 0.1
    with caplog.at_level("WARNING", logger="mgr_engine"):
        registration.transform_points(at)
    assert (f"6 of 8 points (first: point 2, at ({', '.join(f'{c:g}' for c in elsewhere[0])}) mm) lie outside the "
            "image the transform was computed on") in caplog.text


def test_a_points_file_and_a_result_are_taken_as_what_they_hold(registration, tmp_path):
    """read_points' result and a registration result, given where their points and transform
    were meant, failed: "points are not numbers (... not 'PointsFile')", and an AttributeError
    ('RegistrationResult' object has no attribute 'GetNameOfClass'), as did None."""
    path = write(tmp_path / "p.csv", "x,y,z\n-3.5,-2,1.25\n4,-6.5,3\n")
    landmarks = points.read_points(path)
    expected = registration.transform_points(landmarks.points)
    np.testing.assert_array_equal(registration.transform_points(landmarks), expected)
    np.testing.assert_array_equal(points.transform_points(registration, landmarks), expected)
    with pytest.raises(InvalidOptionError, match=r"transform_points takes an ITK transform, a transform file's path "
                                                 r"or a registration result, not a NoneType"):
        points.transform_points(None, landmarks)
    indices = points.read_points(write(tmp_path / "v.txt", "1 2 3\n"), voxel_indices=True)
    with pytest.raises(InvalidPointsError, match=r"points are voxel indices \(read with voxel_indices=True\): "
                                                 r"convert them to mm first"):
        registration.transform_points(indices)


def test_points_written_in_a_files_layout_are_one_for_each_of_its_rows(tmp_path):
    """The error said "1 points for a file of 2", not what to give."""
    like = points.read_points(write(tmp_path / "p.csv", "x,y,z\n1,2,3\n4,5,6\n"))
    with pytest.raises(InvalidPointsError, match=r"^1 point to write in the layout of a file of 2: give one point for "
                                                 r"each of its rows \(like= is that file\)"):
        points.write_points([[0.0, 0.0, 0.0]], tmp_path / "out.csv", like=like)
    assert not (tmp_path / "out.csv").exists()


def test_a_transform_file_of_another_layout_matches_itk(tmp_path):
    """A composite of an affine, a field on an oblique grid (displacement in mm) and another
    affine, read from a file by path."""
    path = tmp_path / "t.h5"
    transform = read_back(composite(itk, affine_transform(itk, 20), oblique_field_transform(itk, (9, 11, 10), 4.0, 21),
                                    affine_transform(itk, 22)), path)
    assert itk_io.grid_transform(transform) is not None
    at = np.random.default_rng(2).uniform(-25.0, 25.0, (300, 3))
    expected = itk_transform_points(transform, at)
    assert np.linalg.norm(expected - itk_transform_points(
        composite(itk, affine_transform(itk, 20), affine_transform(itk, 22)), at), axis=1).max() > 1.0
    np.testing.assert_allclose(points.transform_points(path, at), expected, rtol=0, atol=1e-9)


def test_other_transforms_go_point_by_point_through_itk(tmp_path):
    field = oblique_field_transform(itk, (5, 6, 7), 1.0, 22)
    at = np.random.default_rng(3).uniform(-20.0, 20.0, (50, 3))
    for transform in (affine_transform(itk, 23), composite(itk, field, affine_transform(itk, 24), field)):
        assert itk_io.grid_transform(transform) is None
        np.testing.assert_array_equal(points.transform_points(transform, at), itk_transform_points(transform, at))
    assert points.transform_points(affine_transform(itk, 23), [1.0, 2.0, 3.0]).shape == (1, 3)


@pytest.mark.parametrize("bad", [np.zeros((4, 2)), np.zeros((2, 3, 3)), [[1.0, np.nan, 2.0]], [["a", "b", "c"]],
                                 [[1.0, 2.0, np.inf]]])
def test_points_that_are_not_n_by_3_finite_numbers_are_a_typed_error(bad):
    with pytest.raises(InvalidPointsError, match=r"\(N, 3\)|not finite|not numbers"):
        points.transform_points(affine_transform(itk, 23), bad)


@pytest.mark.parametrize("path", ["landmarks.csv", Path("landmarks.csv")])
def test_a_points_files_path_is_told_to_go_through_read_points(path):
    with pytest.raises(InvalidPointsError, match=r"points 'landmarks.csv' is a path, not points: read a points file "
                                                 r"with mgr_engine.read_points\(path\).points"):
        points.transform_points(affine_transform(itk, 23), path)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("text, expected_system", [
    ("x,y,z,t,label\n1.5,-2,3,0,a\n4,5,6e1,0,b\n", "LPS"),  # ANTs' CSV
    ("1.5 -2 3\n4\t5  60\n", "LPS"),  # no header, blanks
    ("label;x;y;z\nA;1.5;-2;3\nB;4;5;60\n", "LPS"),  # semicolons
    ("# Markups fiducial file version = 4.11\n# CoordinateSystem = RAS\n"
     "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
     "n_1,-1.5,2,3,0,0,0,1,1,1,0,F-1,\"a, b\",vol\nn_2,-4,-5,60,0,0,0,1,1,1,0,F-2,,vol\n", "RAS"),  # 3D Slicer
    ("# CoordinateSystem = 0\n# columns = id,x,y,z\nn_1,-1.5,2,3\nn_2,-4,-5,60\n", "RAS"),  # Slicer before 4.11
    ("label,r,a,s\np,-1.5,2,3\nq,-4,-5,60\n", "RAS"),
])
def test_points_files_are_read_in_lps(tmp_path, text, expected_system):
    read = points.read_points(write(tmp_path / "p.csv", text))
    assert read.coordinate_system == expected_system
    np.testing.assert_array_equal(read.points, [[1.5, -2.0, 3.0], [4.0, 5.0, 60.0]])


def test_a_written_file_keeps_its_layout_and_coordinate_system(tmp_path):
    text = ("# Markups fiducial file version = 4.11\n# CoordinateSystem = RAS\n"
            "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
            "n_1,-1.5,2,3,0,0,0,1,1,1,0,F-1,\"a, b\",vol\nn_2,-4,-5,60,0,0,0,1,1,1,0,F-2,,vol\n")
    read = points.read_points(write(tmp_path / "p.fcsv", text))
    moved = read.points + [[0.1, 0.2, 1 / 3], [10.0, -20.0, 30.0]]
    points.write_points(moved, tmp_path / "out.fcsv", like=read)
    written = (tmp_path / "out.fcsv").read_text().splitlines()
    assert written[:3] == text.splitlines()[:3]
    x, y, z = -(1.5 + 0.1), -(-2.0 + 0.2), 3.0 + 1 / 3  # back in RAS: x and y negated
    assert written[3] == f"n_1,{x!r},{y!r},{z!r},0,0,0,1,1,1,0,F-1,\"a, b\",vol"
    back = points.read_points(tmp_path / "out.fcsv")
    np.testing.assert_array_equal(back.points, moved)  # repr: the same floats
    points.write_points(moved, tmp_path / "plain.csv")
    assert (tmp_path / "plain.csv").read_text().splitlines()[0] == "x,y,z"
    np.testing.assert_array_equal(points.read_points(tmp_path / "plain.csv").points, moved)


def markups_json(*markups):
    """A 3D Slicer markups file (the layout Slicer 5 writes) of ``(coordinate system or None,
    positions)`` markups."""
    document = {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                           "Resources/Schema/markups-schema-v1.0.3.json#", "markups": []}
    for system, positions in markups:
        markup = {"type": "Fiducial", "coordinateUnits": "mm",
                  "controlPoints": [{"id": str(i + 1), "label": f"F-{i + 1}", "position": list(position),
                                     "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
                                     "selected": True, "locked": False, "visibility": True,
                                     "positionStatus": "defined"} for i, position in enumerate(positions)],
                  "display": {"visibility": True, "color": [0.4, 1.0, 1.0]}}
        if system:
            markup["coordinateSystem"] = system
        document["markups"].append(markup)
    return json.dumps(document, indent=4)


def test_slicers_markups_json_is_read_and_written_in_its_own_coordinates(tmp_path):
    source = write(tmp_path / "F.mrk.json", markups_json(("RAS", [[-1.5, 2.0, 3.0], [-4.0, -5.0, 60.0]]),
                                                         ("LPS", [[7.0, 8.0, 9.0]])).replace("F-1", "Schädel-1"))
    read = points.read_points(source)
    np.testing.assert_array_equal(read.points, [[1.5, -2.0, 3.0], [4.0, 5.0, 60.0], [7.0, 8.0, 9.0]])
    assert read.coordinate_system == "RAS"
    moved = read.points + [[0.5, 0.25, 1.0]]
    points.write_points(moved, tmp_path / "out.mrk.json", like=read)
    written, original = json.loads((tmp_path / "out.mrk.json").read_text()), json.loads(source.read_text())
    positions = [point.pop("position") for markup in written["markups"] for point in markup["controlPoints"]]
    assert positions == [[-2.0, 1.75, 4.0], [-4.5, -5.25, 61.0], [7.5, 8.25, 10.0]]  # each markup in its own system
    for markup in original["markups"]:
        for point in markup["controlPoints"]:
            del point["position"]
    assert written == original  # labels, orientation, display: kept
    assert "Schädel-1" in (tmp_path / "out.mrk.json").read_text(encoding="utf-8")  # not escaped
    np.testing.assert_array_equal(points.read_points(tmp_path / "out.mrk.json").points, moved)
    points.write_points(moved, tmp_path / "again.mrk.json", like=read)  # the layout is reusable
    assert (tmp_path / "again.mrk.json").read_text() == (tmp_path / "out.mrk.json").read_text()


def test_a_markup_without_a_coordinate_system_takes_the_one_asked_for(tmp_path):
    undeclared = write(tmp_path / "u.mrk.json", markups_json((None, [[1.0, 2.0, 3.0]])))
    np.testing.assert_array_equal(points.read_points(undeclared).points, [[1.0, 2.0, 3.0]])  # LPS, the default
    np.testing.assert_array_equal(points.read_points(undeclared, "RAS").points, [[-1.0, -2.0, 3.0]])
    with pytest.raises(InvalidOptionError, match="declares RAS"):
        points.read_points(write(tmp_path / "d.mrk.json", markups_json(("RAS", [[1.0, 2.0, 3.0]]))), "LPS")


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ('{"markups": 3}', "no \"markups\" list"),
    (markups_json(("RAS", [])), "no control points"),
    (markups_json(("IJK", [[1.0, 2.0, 3.0]])), "declares coordinate system 'IJK'"),
    (markups_json(("LPS", [[1.0, 2.0]])), "has no position"),
    (markups_json(("LPS", [[1.0, float("nan"), 2.0]])), "not finite"),
    (markups_json(("LPS", [["1", "two", "3"]])), "not numbers"),
])
def test_unreadable_markups_files_are_a_typed_error(tmp_path, text, match):
    with pytest.raises(InvalidPointsError, match=match):
        points.read_points(write(tmp_path / "p.mrk.json", text))


def test_the_coordinate_system_asked_for_applies_to_files_that_declare_none(tmp_path):
    plain = write(tmp_path / "p.txt", "1 2 3\n")
    np.testing.assert_array_equal(points.read_points(plain, "RAS").points, [[-1.0, -2.0, 3.0]])
    np.testing.assert_array_equal(points.read_points(plain, "lps").points, [[1.0, 2.0, 3.0]])
    declared = write(tmp_path / "d.csv", "# CoordinateSystem = LPS\nx,y,z\n1,2,3\n")
    with pytest.raises(InvalidOptionError, match="declares LPS"):
        points.read_points(declared, "RAS")
    with pytest.raises(InvalidOptionError, match="LPS or RAS|'LPS' or 'RAS'"):
        points.read_points(plain, "IJK")


@pytest.mark.parametrize("text, match", [
    ("", "holds no points"),
    ("# only a comment\n\n", "holds no points"),
    ("x,y,z\n", "holds no points"),
    ("id,a,b,c\n1,2,3,4\n", "names no x, y, z"),
    ("L1,1,2,3\n", "names no x, y, z"),  # a label first and no header
    ("1,2,3\n4,five,6\n", "line 2"),
    ("1,2\n", "line 1"),
    ("# CoordinateSystem = IJK\n1,2,3\n", "declares coordinate system 'IJK'"),
    ("# CoordinateSystem = LPS\nr,a,s\n1,2,3\n", "declares LPS but names its columns as RAS"),
    ("x,y,z\n1,nan,3\n", "not finite"),
])
def test_unreadable_points_files_are_a_typed_error(tmp_path, text, match):
    with pytest.raises(InvalidPointsError, match=match):
        points.read_points(write(tmp_path / "p.csv", text))


def test_a_missing_points_file_is_a_typed_error(tmp_path):
    with pytest.raises(ImageReadError, match="does not exist"):
        points.read_points(tmp_path / "nothing.csv")
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00\x81")
    # readable but not text: a content error, as a pairs file that is not UTF-8 is an option error
    with pytest.raises(InvalidPointsError, match="is not UTF-8 text"):
        points.read_points(tmp_path / "binary.csv")


def test_the_command_moves_a_files_points_as_the_result_does(registration, tmp_path, capsys):
    transform = tmp_path / "transform.h5"
    registration.save(transform)
    at = points_around(registration.fixed, 40, seed=4, margin=0.0)
    table = "".join(f"P{i},{-x!r},{-y!r},{z!r}\n" for i, (x, y, z) in enumerate(at.tolist()))  # in RAS
    source = write(tmp_path / "landmarks.fcsv", "# CoordinateSystem = RAS\n# columns = label,x,y,z\n" + table)
    out = tmp_path / "moved.fcsv"
    assert main(["transform-points", "--transform", str(transform), "--points", str(source),
                 "--points_out", str(out)]) == 0
    moved = points.read_points(out)
    assert moved.coordinate_system == "RAS" and out.read_text().splitlines()[2].startswith("P0,")
    np.testing.assert_allclose(moved.points, registration.transform_points(at), rtol=0, atol=1e-9)
    assert np.abs(moved.points - at).max() > 1.0
    # an output folder that does not exist: refused before the work, nothing written
    assert main(["transform-points", "--transform", str(transform), "--points", str(source),
                 "--points_out", str(tmp_path / "missing" / "out.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(OutputWriteError):
        points.write_points(at, tmp_path)  # a folder


def test_the_command_reports_the_target_registration_error(registration, tmp_path, caplog):
    transform = tmp_path / "transform.h5"
    registration.save(transform)
    at = points_around(registration.fixed, 12, seed=6, margin=0.0)
    offsets = np.random.default_rng(7).normal(size=(12, 3))
    targets = registration.transform_points(at) + offsets  # the moving image's landmarks, a little off
    points.write_points(at, tmp_path / "fixed.csv")
    points.write_points(targets, tmp_path / "moving.csv")
    command = ["transform-points", "--transform", str(transform), "--points", str(tmp_path / "fixed.csv"),
               "--points_out", str(tmp_path / "moved.csv"), "--target_points", str(tmp_path / "moving.csv")]
    with caplog.at_level("INFO", logger="mgr_engine"):
        assert main([*command, "--tre_out", str(tmp_path / "tre.csv")]) == 0
    table = np.loadtxt(tmp_path / "tre.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(table[:, 1], np.linalg.norm(at - targets, axis=1), rtol=0, atol=1e-12)
    np.testing.assert_allclose(table[:, 2], np.linalg.norm(offsets, axis=1), rtol=0, atol=1e-9)
    assert f"after registration over 12 landmarks: mean {np.linalg.norm(offsets, axis=1).mean():.2f} mm" in caplog.text
    # refused before any output is written: counts that differ, --tre_out alone
    points.write_points(targets[:11], tmp_path / "eleven.csv")
    (tmp_path / "moved.csv").unlink()
    for bad in ([*command[:-1], str(tmp_path / "eleven.csv"), "--tre_out", str(tmp_path / "t2.csv")],
                [*command[:-2], "--tre_out", str(tmp_path / "t2.csv")]):
        assert main(bad) == 2
        assert not (tmp_path / "moved.csv").exists() and not (tmp_path / "t2.csv").exists()
    with pytest.raises(InvalidPointsError, match="11 target points"):
        points.landmark_distances(at, targets[:11])


def test_numpy_evaluation_equals_the_transform_of_the_maps_grid():
    """:func:`resample.transformed_points` with identity affines is the map's displacement,
    interpolated: at grid nodes exactly the node's value."""
    phi = random_map((6, 7, 5), 0.1, seed=5).numpy()
    displacement = resample.map_displacement(phi)
    grid = resample.GridTransform(displacement, np.eye(3, 4), np.eye(3, 4))
    nodes = np.array([[0, 0, 0], [4, 6, 5], [2, 3, 1]], dtype=np.float64)  # x, y, z
    moved = resample.transformed_points(grid, nodes)
    expected = nodes + displacement[nodes[:, 2].astype(int), nodes[:, 1].astype(int), nodes[:, 0].astype(int)]
    np.testing.assert_array_equal(moved, expected)


def itk_index_to_point(image, indices):
    def continuous_index(values):
        index = itk.ContinuousIndex[itk.D, 3]()
        for axis, value in enumerate(values):
            index.SetElement(axis, float(value))
        return index

    return np.array([tuple(image.TransformContinuousIndexToPhysicalPoint(continuous_index(i))) for i in indices])


@pytest.mark.parametrize("index_base", [0, 1])
def test_voxel_indices_convert_as_itk_converts_continuous_indices(registration, tmp_path, index_base):
    image = registration.fixed  # oblique, anisotropic, away from the origin
    indices = np.random.default_rng(8).uniform(-2.0, 20.0, (30, 3))
    expected = itk_index_to_point(image, indices - index_base)
    at = points.indices_to_points(indices, image, index_base)
    np.testing.assert_allclose(at, expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(points.points_to_indices(at, image, index_base), indices, rtol=0, atol=1e-9)
    itk_io.write_image(image, tmp_path / "fixed.nii.gz")  # a path: the grid read from the header
    np.testing.assert_allclose(points.indices_to_points(indices, tmp_path / "fixed.nii.gz", index_base), expected,
                               rtol=0, atol=1e-4)  # NIfTI stores the geometry in float32
    with pytest.raises(InvalidOptionError, match="count from 0 or from 1"):
        points.indices_to_points(indices, image, 2)
    with pytest.raises(ImageReadError, match="does not exist"):
        points.indices_to_points(indices, tmp_path / "missing.nii.gz")


def test_a_file_of_voxel_indices_declares_no_coordinate_system(tmp_path):
    read = points.read_points(write(tmp_path / "indices.txt", "10 20 30\n1.5 2 3\n"), voxel_indices=True)
    assert read.coordinate_system == "voxel"
    np.testing.assert_array_equal(read.points, [[10, 20, 30], [1.5, 2, 3]])
    assert read.text_with(np.array([[-1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])) == "-1.0 2.0 3.0\n4.0 5.0 6.0\n"  # as given
    for text in ("# CoordinateSystem = RAS\n1 2 3\n", "l,p,s\n1,2,3\n"):
        with pytest.raises(InvalidPointsError, match="physical coordinates, not voxel indices"):
            points.read_points(write(tmp_path / "declared.csv", text), voxel_indices=True)
    with pytest.raises(InvalidOptionError, match="no coordinate system"):
        points.read_points(tmp_path / "indices.txt", "RAS", voxel_indices=True)


@pytest.mark.parametrize("index_base", [0, 1])
def test_the_command_moves_voxel_indices_into_the_moving_images_indices(registration, tmp_path, caplog, index_base):
    """Fixed-image indices -> physical points -> the transform -> moving-image indices, each step
    as ITK takes it; the errors in mm."""
    transform = tmp_path / "transform.h5"
    registration.save(transform)
    fixed, moving = tmp_path / "fixed.nrrd", tmp_path / "moving.nrrd"  # NRRD keeps the geometry in float64
    itk_io.write_image(registration.fixed, fixed)
    itk_io.write_image(registration.moving, moving)
    indices = np.random.default_rng(9).uniform(1.0, 13.0, (10, 3)) + index_base
    target_indices = indices + np.random.default_rng(10).normal(size=(10, 3))
    write(tmp_path / "fixed.txt", "".join(" ".join(repr(c) for c in row) + "\n" for row in indices.tolist()))
    write(tmp_path / "moving.txt", "".join(" ".join(repr(c) for c in row) + "\n" for row in target_indices.tolist()))
    command = ["transform-points", "--transform", str(transform), "--points", str(tmp_path / "fixed.txt"),
               "--points_out", str(tmp_path / "moved.txt"), "--voxel_indices", str(fixed), str(moving)]
    with caplog.at_level("INFO", logger="mgr_engine"):
        assert main([*command, "--index_base", str(index_base), "--target_points", str(tmp_path / "moving.txt"),
                     "--tre_out", str(tmp_path / "tre.csv")]) == 0
    moved_points = itk_transform_points(registration.transform, itk_index_to_point(registration.fixed,
                                                                                   indices - index_base))
    expected = np.array([tuple(registration.moving.TransformPhysicalPointToContinuousIndex(
        itk.Point[itk.D, 3]([float(c) for c in point]))) for point in moved_points]) + index_base
    moved = np.loadtxt(tmp_path / "moved.txt")
    np.testing.assert_allclose(moved, expected, rtol=0, atol=1e-7)
    assert np.abs(moved - indices).max() > 1.0
    targets = itk_index_to_point(registration.moving, target_indices - index_base)
    table = np.loadtxt(tmp_path / "tre.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(table[:, 2], np.linalg.norm(moved_points - targets, axis=1), rtol=0, atol=1e-7)
    np.testing.assert_allclose(table[:, 1], np.linalg.norm(itk_index_to_point(registration.fixed, indices - index_base)
                                                           - targets, axis=1), rtol=0, atol=1e-7)
    # refused before the work: --index_base alone, a missing image
    (tmp_path / "moved.txt").unlink()
    assert main([*command[:-3], "--index_base", "1"]) == 2
    assert main([*command[:-1], str(tmp_path / "missing.nrrd")]) == 2
    assert not (tmp_path / "moved.txt").exists()


def with_unplaced(text, *unplaced, drop_position=()):
    """A markups file's text with the control points ``unplaced`` (indices over all markups) marked
    as not placed (positionStatus "undefined"), those in ``drop_position`` without a position."""
    document = json.loads(text)
    control_points = [point for markup in document["markups"] for point in markup["controlPoints"]]
    for i in unplaced:
        control_points[i]["positionStatus"] = "undefined"
        if i in drop_position:
            del control_points[i]["position"]
    return json.dumps(document, indent=4)


def test_control_points_not_placed_are_written_back_as_they_were(tmp_path):
    source = write(tmp_path / "F.mrk.json", with_unplaced(markups_json(
        ("LPS", [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])), 1, 3, drop_position=(3,)))
    read = points.read_points(source)
    assert read.placed.tolist() == [True, False, True, False]
    points.write_points(read.points + 10.0, tmp_path / "out.mrk.json", like=read)
    written = json.loads((tmp_path / "out.mrk.json").read_text())["markups"][0]["controlPoints"]
    assert [point.get("position") for point in written] == [[11.0, 12.0, 13.0], [0.0, 0.0, 0.0], [14.0, 15.0, 16.0],
                                                            None]
    assert points.read_points(write(tmp_path / "t.csv", "1,2,3\n")).placed.tolist() == [True]


def test_the_error_leaves_out_landmarks_not_placed_in_either_file(registration, tmp_path, caplog):
    transform = tmp_path / "transform.h5"
    registration.save(transform)
    at = points_around(registration.fixed, 6, seed=11, margin=0.0)
    targets = registration.transform_points(at) + np.random.default_rng(12).normal(size=(6, 3))
    write(tmp_path / "fixed.mrk.json", with_unplaced(markups_json(("LPS", at.tolist())), 1))
    write(tmp_path / "moving.mrk.json", with_unplaced(markups_json(("LPS", targets.tolist())), 4))
    command = ["transform-points", "--transform", str(transform), "--points", str(tmp_path / "fixed.mrk.json"),
               "--points_out", str(tmp_path / "moved.mrk.json"), "--target_points", str(tmp_path / "moving.mrk.json"),
               "--tre_out", str(tmp_path / "tre.csv")]
    with caplog.at_level("INFO", logger="mgr_engine"):
        assert main(command) == 0
    table = np.loadtxt(tmp_path / "tre.csv", delimiter=",", skiprows=1)
    counted = [0, 2, 3, 5]
    assert table[:, 0].tolist() == counted
    np.testing.assert_allclose(table[:, 1], np.linalg.norm(at - targets, axis=1)[counted], rtol=0, atol=1e-9)
    np.testing.assert_allclose(table[:, 2], np.linalg.norm(registration.transform_points(at) - targets, axis=1)[counted],
                               rtol=0, atol=1e-9)
    assert "2 of 6 landmarks are not placed" in caplog.text and "over 4 landmarks" in caplog.text
    write(tmp_path / "none.mrk.json", with_unplaced(markups_json(("LPS", targets.tolist())), 0, 2, 3, 4, 5))
    assert main([*command[:-4], "--target_points", str(tmp_path / "none.mrk.json")]) == 2


def test_quiet_keeps_a_commands_results_and_hides_its_progress(tmp_path):
    """``-q`` hides the progress lines (INFO) but not what a command found: its target registration
    error (as Dice and the Jacobian's summary) would otherwise go nowhere without an output file.
    In a fresh process, where the command configures logging itself."""
    import subprocess
    import sys

    itk_io.write_transform(affine_transform(itk, seed=5), tmp_path / "affine.h5")
    write(tmp_path / "p.csv", "x,y,z\n1,2,3\n-4,5,6.5\n")
    write(tmp_path / "t.csv", "x,y,z\n2,2,3\n-4,6,6.5\n")
    command = [sys.executable, "-m", "mgr_engine.cli", "transform-points", "--transform", str(tmp_path / "affine.h5"),
               "--points", str(tmp_path / "p.csv"), "--target_points", str(tmp_path / "t.csv"),
               "--points_out", str(tmp_path / "out.csv")]
    for quiet in (False, True):
        run = subprocess.run(command[:3] + ["-q"] * quiet + command[3:], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert "target registration error after registration over 2 landmarks" in run.stderr
        assert ("moved 2 points into" in run.stderr) is not quiet
