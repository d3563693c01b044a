"""Images whose voxel axes point in different anatomical directions (mgr_engine.itk_io's axis
reordering, ``match_orientation``): the network compares volumes axis by axis as stored, so a
moving image stored in another order is warned about, and with ``match_orientation`` registered
as the same physical image stored in the fixed image's order is."""

import logging

import numpy as np
import pytest

from helpers import oblique_image, smooth_volume
from mgr_engine import itk_io

itk = pytest.importorskip("itk")

REORDERINGS = [((0, 1, 2), (True, False, False)), ((2, 0, 1), (False, True, True)), ((1, 0, 2), (False, False, False)),
               ((2, 1, 0), (True, True, True))]


def physical_points(grid, indices):
    """Physical points (x, y, z) of voxel ``indices`` (N, 3; i, j, k) of ``grid``."""
    return grid.origin + (grid.direction @ (grid.spacing * np.asarray(indices, dtype=np.float64)).T).T


@pytest.mark.parametrize("axes, flips", REORDERINGS)
def test_a_reordered_image_keeps_every_voxel_at_its_physical_position(axes, flips):
    image = oblique_image(smooth_volume((7, 9, 6), seed=1) * 100, [1.2, 0.9, 2.1], [-40.0, 13.5, 7.25], (0.3, -0.2, 0.5))
    reordered = itk_io.reordered_image(image, axes, flips)
    grid, new_grid = itk_io.ImageGrid.of(image), itk_io.ImageGrid.of(reordered)
    assert new_grid.size == tuple(grid.size[a] for a in axes)
    old_voxels, new_voxels = itk.array_view_from_image(image), itk.array_view_from_image(reordered)
    new_indices = np.stack(np.meshgrid(*[np.arange(n) for n in new_grid.size], indexing="ij"), -1).reshape(-1, 3)
    points = physical_points(new_grid, new_indices)
    old_indices = np.linalg.solve(grid.direction * grid.spacing, (points - grid.origin).T).T  # back to the old grid
    np.testing.assert_allclose(old_indices, np.round(old_indices), atol=1e-9)
    old_indices = np.round(old_indices).astype(int)
    np.testing.assert_array_equal(new_voxels[new_indices[:, 2], new_indices[:, 1], new_indices[:, 0]],
                                  old_voxels[old_indices[:, 2], old_indices[:, 1], old_indices[:, 0]])
    assert itk_io.matching_axes(grid.direction, new_grid.direction) == (axes, flips)  # each new axis' old one
    back = itk_io.matching_axes(new_grid.direction, grid.direction)
    assert back is not None
    restored = itk_io.reordered_image(reordered, *back)
    assert itk_io.ImageGrid.of(restored).size == grid.size
    np.testing.assert_array_equal(itk.array_view_from_image(restored), old_voxels)
    np.testing.assert_allclose(itk_io.ImageGrid.of(restored).origin, grid.origin, atol=1e-12)
    np.testing.assert_allclose(itk_io.ImageGrid.of(restored).direction, grid.direction, atol=1e-15)


def test_axis_codes_name_where_each_voxel_axis_points():
    assert itk_io.axis_codes(np.eye(3)) == "LPS"  # ITK's identity: +x left, +y posterior, +z superior
    assert itk_io.axis_codes(np.diag([-1.0, -1.0, 1.0])) == "RAS"  # a NIfTI file's usual storage
    assert itk_io.axis_codes(np.array([[0, 0, -1.0], [1, 0, 0], [0, -1.0, 0]])) == "PIR"  # a sagittal series
    turned = np.array([[np.cos(0.7), -np.sin(0.7), 0], [np.sin(0.7), np.cos(0.7), 0], [0, 0, 1]])  # 40 degrees
    assert itk_io.axis_codes(turned) == "LPS" and itk_io.matching_axes(turned, np.eye(3)) == itk_io.IDENTITY_AXES
    diagonal = np.array([[1.0, 1.0, 0.0], [1.0, -1.0, 0.0], [0.0, 0.0, np.sqrt(2.0)]]) / np.sqrt(2.0)
    assert itk_io.matching_axes(np.eye(3), diagonal) is None  # x nearest to both of its first two axes (45 degrees)


def test_a_moving_image_stored_in_another_order_is_warned_about_and_matched_on_request(caplog):
    import mgr_engine

    angles = (0.1, -0.05, 0.15)
    fixed = oblique_image(smooth_volume((30, 34, 28), seed=4) * 1000, [1.1, 1.0, 1.2], [-20.0, 5.0, 3.0], angles)
    moving = oblique_image(smooth_volume((30, 34, 28), seed=5) * 1000, [1.0, 1.2, 0.9], [-18.0, 2.0, 6.0], angles)
    mask = oblique_image((smooth_volume((30, 34, 28), seed=6) > 0.3).astype(np.uint8), [1.0, 1.2, 0.9],
                         [-18.0, 2.0, 6.0], angles)
    axes, flips = (2, 0, 1), (True, False, True)
    moving_stored_otherwise = itk_io.reordered_image(moving, axes, flips)
    mask_stored_otherwise = itk_io.reordered_image(mask, axes, flips)
    engine = mgr_engine.Engine(model="compact", device="cpu")
    options = dict(io_iterations=None, masking="input")
    with caplog.at_level(logging.WARNING, logger="mgr_engine"):
        expected = engine.register(fixed, moving, moving_mask=mask, **options)
    assert not caplog.records
    assert expected.phi_ab.std() > 0

    with caplog.at_level(logging.WARNING, logger="mgr_engine"):
        unmatched = engine.register(fixed, moving_stored_otherwise, moving_mask=mask_stored_otherwise, **options)
        engine.register(fixed, moving_stored_otherwise, moving_mask=mask_stored_otherwise, **options)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1  # once per engine and pair of orientations
    assert "point LPS" in warnings[0] and "the moving image's ILA" in warnings[0] and "match_orientation" in warnings[0]
    assert np.abs(unmatched.phi_ab.numpy() - expected.phi_ab.numpy()).max() > 1e-3

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mgr_engine"):
        matched = engine.register(fixed, moving_stored_otherwise, moving_mask=mask_stored_otherwise,
                                  match_orientation=True, **options)
    assert not caplog.records
    np.testing.assert_array_equal(matched.phi_ab.numpy(), expected.phi_ab.numpy())  # the network saw the same input
    grid = itk_io.ImageGrid.of(fixed)
    points = physical_points(grid, np.random.default_rng(0).integers(0, grid.size, (20, 3)))
    for point in points.tolist():
        np.testing.assert_allclose(matched.transform.TransformPoint(point), expected.transform.TransformPoint(point),
                                   rtol=0, atol=1e-4)
    np.testing.assert_allclose(itk.array_view_from_image(matched.warp()), itk.array_view_from_image(expected.warp()),
                               rtol=0, atol=1e-2)
    results = list(engine.register_many([(fixed, moving_stored_otherwise)], match_orientation=True, io_iterations=None))
    np.testing.assert_array_equal(results[0].phi_ab.numpy(), engine.register(fixed, moving, io_iterations=None).phi_ab.numpy())

    # An array of the moving image as given (its labels, say) lies on that image's grid, not on
    # the reordered copy's: of the same shape there after a flip, it was warped flipped, silently.
    labels = itk.array_from_image(mask_stored_otherwise)
    fixed_labels = itk.array_from_image(itk_io.resample(mask, expected.transform, fixed, "nearest"))
    for result in (matched, results[0]):
        warped = itk.array_view_from_image(result.warp(mask_stored_otherwise, "nearest"))
        assert warped.any()
        np.testing.assert_array_equal(itk.array_view_from_image(result.warp(labels, "nearest")), warped)
        assert result.dice(fixed_labels, labels) == result.dice(fixed_labels, mask_stored_otherwise)


def test_an_array_of_a_flipped_moving_image_is_warped_where_it_was_given():
    """A moving image stored RAS against an LPS fixed one: match_orientation flips its x and y
    axes, keeping its shape, so an array of its labels was taken for the flipped copy's and
    warped mirrored, half its voxels wrong, without a word."""
    import mgr_engine

    fixed = oblique_image(smooth_volume((20, 22, 18), seed=1) * 1000, [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], (0, 0, 0))
    moving = itk_io.reordered_image(fixed, (0, 1, 2), (True, True, False))  # stored RAS
    labels = (itk.array_from_image(moving) > 500).astype(np.uint8)
    label_image = itk.image_from_array(labels)
    label_image.CopyInformation(moving)
    result = mgr_engine.register(fixed, moving, model="compact", io_iterations=None, match_orientation=True,
                                 progress=False)
    expected = itk.array_view_from_image(result.warp(label_image, "nearest"))
    np.testing.assert_array_equal(itk.array_view_from_image(result.warp(labels, "nearest")), expected)


def test_the_command_matches_orientations_on_request(tmp_path):
    from mgr_engine import cli

    angles = (0.1, -0.05, 0.15)
    fixed = oblique_image(smooth_volume((30, 34, 28), seed=7) * 1000, [1.1, 1.0, 1.2], [-20.0, 5.0, 3.0], angles)
    moving = oblique_image(smooth_volume((30, 34, 28), seed=8) * 1000, [1.0, 1.2, 0.9], [-18.0, 2.0, 6.0], angles)
    paths = {name: str(tmp_path / f"{name}.nii.gz") for name in ("fixed", "moving", "moving_ras")}
    itk.imwrite(fixed, paths["fixed"])
    itk.imwrite(moving, paths["moving"])
    itk.imwrite(itk_io.reordered_image(moving, (0, 1, 2), (True, True, False)), paths["moving_ras"])

    def transform(moving_path, *options):
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.h5"
        assert cli.main(["-q", "register", "--fixed", paths["fixed"], "--moving", moving_path, "--fixed_modality", "mri",
                         "--moving_modality", "mri", "--model", "compact", "--io_iterations", "None",
                         "--transform_out", str(out), *options]) == 0
        return itk.transformread(str(out))[0]

    expected, matched, unmatched = (transform(paths["moving"]), transform(paths["moving_ras"], "--match_orientation"),
                                    transform(paths["moving_ras"]))
    point = [-10.0, 12.0, 9.0]
    np.testing.assert_allclose(matched.TransformPoint(point), expected.TransformPoint(point), rtol=0, atol=1e-4)
    assert np.abs(np.subtract(unmatched.TransformPoint(point), expected.TransformPoint(point))).max() > 1e-2
