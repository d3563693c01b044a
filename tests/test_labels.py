"""Label maps (mgr_engine.labels): Dice per label against a label-by-label count."""

import numpy as np
import pytest

from mgr_engine import labels as labels_module
from mgr_engine.errors import InvalidImageError
from mgr_engine.labels import dice_per_label, label_array


def dice_by_label(labels, reference):
    """The definition, one label at a time."""
    out = {}
    for label in np.unique(reference):
        if label != 0:
            a, b = labels == label, reference == label
            out[int(label)] = 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))
    return out


@pytest.mark.parametrize("slab", [None, 97])  # the whole map at once; slabs that do not divide it
@pytest.mark.parametrize("scale", [1, -3, 1000, 10**7])  # pairs; negative labels; bins by offset; ranks
def test_dice_per_label_is_the_definitions_count(scale, slab, monkeypatch):
    if slab:
        monkeypatch.setattr(labels_module, "_SLAB_VOXELS", slab)
    rng = np.random.default_rng(1)
    reference = rng.integers(0, 12, (9, 14, 11)) * scale
    labels = np.where(rng.random(reference.shape) < 0.7, reference, rng.integers(0, 15, reference.shape) * scale)
    labels[labels == 5 * scale] = 0  # a label of the reference missing from the other map: Dice 0
    dice = dice_per_label(labels, reference)
    expected = dice_by_label(labels, reference)
    assert list(dice) == sorted(expected) and len(dice) == 11  # 0 and labels only `labels` holds not counted
    np.testing.assert_allclose([dice[k] for k in expected], [expected[k] for k in expected], rtol=0, atol=1e-15)
    assert dice[5 * scale] == 0.0 and 0.5 < dice[1 * scale] < 1.0
    assert dice_per_label(reference, reference) == {k: 1.0 for k in expected}


@pytest.mark.parametrize("offset", [-(2**62), 2**62])  # labels near int64's ends, spanning a few values
def test_label_ids_near_the_integer_limits_are_counted_as_their_values(offset):
    rng = np.random.default_rng(3)
    reference = rng.integers(1, 40, (7, 9, 8)) + offset
    labels = np.where(rng.random(reference.shape) < 0.6, reference, rng.integers(1, 40, reference.shape) + offset)
    assert dice_per_label(labels, reference) == pytest.approx(dice_by_label(labels, reference), abs=1e-15)


def test_maps_of_two_integer_types_are_counted_as_their_values():
    rng = np.random.default_rng(2)
    reference = rng.integers(0, 200, (6, 7, 8)).astype(np.uint8)
    labels = np.where(rng.random(reference.shape) < 0.6, reference, rng.integers(-3, 5, reference.shape)).astype(np.int16)
    expected = dice_by_label(labels.astype(np.int64), reference.astype(np.int64))
    assert dice_per_label(labels, reference) == pytest.approx(expected, abs=1e-15)


def test_maps_of_different_sizes_and_label_maps_that_are_not_whole_numbers_are_typed_errors():
    itk = pytest.importorskip("itk")
    with pytest.raises(InvalidImageError, match="one grid"):
        dice_per_label(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)))
    whole = itk.image_from_array(np.array([[[0.0, 2.0], [3.0, 1.0]]], dtype=np.float32))
    assert label_array(whole).dtype == np.int64 and label_array(whole).tolist() == [[[0, 2], [3, 1]]]
    assert label_array(itk.image_from_array(np.array([[[0, 2]]], dtype=np.uint8))).dtype == np.uint8  # kept
    with pytest.raises(InvalidImageError, match="not whole numbers"):
        label_array(itk.image_from_array(np.array([[[0.0, 2.5]]], dtype=np.float32)), "labels")


def segmentation(image, thresholds):
    """``image``'s intensities cut into labels 0, 1, 2, ... (uint8), on its grid."""
    itk = pytest.importorskip("itk")
    labels = itk.image_from_array(np.digitize(itk.array_from_image(image), thresholds).astype(np.uint8))
    labels.CopyInformation(image)
    return labels


def test_the_command_gives_the_dice_of_itks_nearest_neighbour_warp(tmp_path, caplog):
    itk = pytest.importorskip("itk")
    from helpers import oblique_registration
    from mgr_engine import itk_io
    from mgr_engine.cli import main

    registration = oblique_registration()  # oblique, anisotropic grids; the moving image partly outside
    registration.save(tmp_path / "transform.h5")
    fixed_labels = segmentation(registration.fixed, (150.0, 450.0, 700.0))
    moving_labels = segmentation(registration.moving, (200.0, 400.0, 600.0))
    itk_io.write_image(fixed_labels, tmp_path / "fixed_labels.nii.gz")
    itk_io.write_image(moving_labels, tmp_path / "moving_labels.nii.gz")
    command = ["dice", "--transform", str(tmp_path / "transform.h5"), "--fixed_labels",
               str(tmp_path / "fixed_labels.nii.gz"), "--moving_labels", str(tmp_path / "moving_labels.nii.gz"),
               "--dice_out", str(tmp_path / "dice.csv"), "--warped_labels_out", str(tmp_path / "warped.nii.gz")]
    with caplog.at_level("INFO", logger="mgr_engine"):
        assert main(command) == 0
    fixed_labels = itk_io.read_image(tmp_path / "fixed_labels.nii.gz")  # as the command read them
    moving_labels = itk_io.read_image(tmp_path / "moving_labels.nii.gz")
    expected = itk_io.resample(moving_labels, registration.transform, fixed_labels, "nearest")  # ITK's filter
    np.testing.assert_array_equal(itk.array_from_image(itk_io.read_image(tmp_path / "warped.nii.gz")),
                                  itk.array_from_image(expected))
    reference = itk.array_from_image(fixed_labels)
    unregistered = itk_io.resample(moving_labels, itk_io.identity_transform(), fixed_labels, "nearest")
    np.testing.assert_array_equal(  # the command's own identity resampling gives ITK's voxels
        itk.array_from_image(itk_io.warp_image(labels_module._identity_grid_transform(), moving_labels, fixed_labels,
                                               "nearest")), itk.array_from_image(unregistered))
    before = dice_by_label(itk.array_from_image(unregistered), reference)
    after = dice_by_label(itk.array_from_image(expected), reference)
    table = np.loadtxt(tmp_path / "dice.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(table, [(k, before[k], after[k]) for k in sorted(after)], rtol=0, atol=1e-12)
    assert len(table) == 3 and before != after
    assert f"label 2: Dice {before[2]:.3f} before, {after[2]:.3f} after" in caplog.text
    # a fixed segmentation of background only, float labels that are not whole numbers: refused, nothing written
    for name, array in (("empty", np.zeros(reference.shape, np.uint8)),
                        ("float", itk.array_from_image(registration.fixed).astype(np.float32))):
        bad = itk.image_from_array(array)
        bad.CopyInformation(fixed_labels)
        itk_io.write_image(bad, tmp_path / f"{name}.nii.gz")
        out = [*command[:4], str(tmp_path / f"{name}.nii.gz"), *command[5:-4], "--dice_out", str(tmp_path / "d2.csv")]
        assert main(out) == 2
        assert not (tmp_path / "d2.csv").exists()


def test_a_results_dice_is_the_commands(tmp_path):
    pytest.importorskip("itk")
    from helpers import oblique_registration
    from mgr_engine import itk_io
    from mgr_engine.errors import MaskMismatchError
    from mgr_engine.labels import dice_before_and_after

    registration = oblique_registration()
    fixed_labels = segmentation(registration.fixed, (150.0, 450.0, 700.0))
    moving_labels = segmentation(registration.moving, (200.0, 400.0, 600.0))
    itk_io.write_image(moving_labels, tmp_path / "moving_labels.nrrd")
    before, after = registration.dice(fixed_labels, tmp_path / "moving_labels.nrrd")  # an image and a path
    warped = itk_io.resample(moving_labels, registration.transform, fixed_labels, "nearest")  # ITK's filter
    assert (before, after) == dice_before_and_after(fixed_labels, moving_labels, warped)
    assert list(after) == [1, 2, 3] and before != after
    with pytest.raises(MaskMismatchError, match="fixed labels does not lie on its image's grid.*size"):
        registration.dice(moving_labels, moving_labels)


def test_a_results_arrays_lie_on_their_images_grids():
    """An array carries no grid: one of the moving image's shape was warped as if its voxels were
    1 mm apart from the origin, however the moving image lies (a map of wrong values, silently);
    it now takes its image's grid, and an array of another shape is refused."""
    itk = pytest.importorskip("itk")
    from helpers import oblique_registration

    registration = oblique_registration()
    fixed_labels = segmentation(registration.fixed, (150.0, 450.0, 700.0))
    moving_labels = segmentation(registration.moving, (200.0, 400.0, 600.0))
    moving_array = itk.array_from_image(moving_labels)
    np.testing.assert_array_equal(itk.array_from_image(registration.warp(moving_array, "nearest")),
                                  itk.array_from_image(registration.warp(moving_labels, "nearest")))
    assert registration.dice(itk.array_from_image(fixed_labels), moving_array) == \
        registration.dice(fixed_labels, moving_labels)
    with pytest.raises(InvalidImageError, match=r"image to warp array has shape \(22, 19, 24\), not its image's "
                                                r"\(22, 19, 25\) \(z, y, x\), and an array carries no spacing"):
        registration.warp(moving_array[..., 1:])


@pytest.mark.parametrize("dtype, itk_dtype", [
    (np.uint8, np.uint8), (np.int16, np.int16), (np.uint16, np.uint16), (np.int64, np.int32), (np.int8, np.int16),
    (np.bool_, np.uint8), (np.float16, np.float32), (np.float64, np.float64),
])
def test_an_array_keeps_its_type_as_a_file_does(dtype, itk_dtype):
    """Arrays were read as float32 whatever their type: a uint8 label map warped came back as
    float32, where the same map as an itk.Image or a file comes back as uint8 labels."""
    itk = pytest.importorskip("itk")
    from helpers import oblique_registration

    registration = oblique_registration()
    labels = itk.array_from_image(segmentation(registration.moving, (200.0, 400.0, 600.0)))
    array = labels > 1 if dtype is np.bool_ else labels.astype(dtype)
    as_image = itk.image_from_array(array.astype(itk_dtype))
    as_image.CopyInformation(registration.moving)
    warped = registration.warp(array, "nearest")
    assert itk.array_view_from_image(warped).dtype == itk_dtype
    np.testing.assert_array_equal(itk.array_view_from_image(warped),
                                  itk.array_view_from_image(registration.warp(as_image, "nearest")))


def test_a_label_map_warped_linearly_is_warned_of(tmp_path, caplog):
    """Linear interpolation truncated to the label map's type mixes labels at their borders: the
    result's warp and the warp command warn, for integer and float label maps; an intensity image
    (a uint8 MR of 256 values, a float CT) and a nearest-neighbour warp are not warned of."""
    itk = pytest.importorskip("itk")
    from helpers import oblique_registration
    from mgr_engine import itk_io
    from mgr_engine.cli import main

    registration = oblique_registration()
    registration.save(tmp_path / "transform.h5")
    labels = segmentation(registration.moving, (200.0, 400.0, 600.0))
    moving = itk.array_from_image(registration.moving)
    intensities = np.interp(moving, (moving.min(), moving.max()), (0, 255)).round().astype(np.uint8)
    images = {"labels": labels, "float labels": itk.image_from_array(itk.array_from_image(labels).astype(np.float32)),
              "uint8 intensities": itk.image_from_array(intensities), "float image": registration.moving}
    assert len(np.unique(intensities[::4, ::4, ::4])) > 64
    warning = "looks like a label map"
    for name, image in images.items():
        image.CopyInformation(registration.moving)
        path = tmp_path / f"{name.replace(' ', '_')}.nii.gz"
        itk_io.write_image(image, path)
        for interpolation, flag in (("linear", "--linear"), ("nearest", "--nearest_neighbor")):
            caplog.clear()
            with caplog.at_level("WARNING", logger="mgr_engine"):
                registration.warp(image, interpolation)
                assert main(["warp", "--fixed", str(tmp_path / "labels.nii.gz"), "--moving", str(path), flag,
                             "--transform", str(tmp_path / "transform.h5"),
                             "--warped_moving_out", str(tmp_path / "warped.nii.gz")]) == 0
            expected = 2 if name.endswith("labels") and interpolation == "linear" else 0
            assert caplog.text.count(warning) == expected, (name, interpolation)


def test_label_numberings_that_do_not_meet_are_named(caplog):
    """A fixed label the moving labels lack on the fixed grid has a Dice of 0 no registration can
    raise: every label so (two numberings) is an error, some a warning that names them. Before,
    both gave tables of zeros without a word."""
    itk = pytest.importorskip("itk")
    from helpers import oblique_registration

    registration = oblique_registration()
    fixed_labels = segmentation(registration.fixed, (150.0, 450.0, 700.0))  # labels 1, 2, 3
    moving_labels = segmentation(registration.moving, (200.0, 400.0, 600.0))

    def renumbered(mapping):
        array = itk.array_from_image(moving_labels)
        image = itk.image_from_array(np.select([array == k for k in mapping], list(mapping.values()), 0).astype(np.uint8))
        image.CopyInformation(moving_labels)
        return image

    with caplog.at_level("WARNING", logger="mgr_engine"):
        registration.dice(fixed_labels, moving_labels)
    assert "do not occur" not in caplog.text
    with pytest.raises(InvalidImageError, match=r"share no label \(fixed: 1, 2, 3; the moving labels on the fixed "
                                                r"grid: 11, 12, 13\): every Dice would be 0"):
        registration.dice(fixed_labels, renumbered({1: 11, 2: 12, 3: 13}))
    with caplog.at_level("WARNING", logger="mgr_engine"):
        before, after = registration.dice(fixed_labels, renumbered({1: 1, 2: 2, 3: 30}))
    assert before[3] == after[3] == 0.0
    assert ("fixed labels 3 do not occur in the moving labels on the fixed grid (the moving labels on the fixed "
            "grid: 1, 2, 30)") in caplog.text
