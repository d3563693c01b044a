"""register() against the authors' pipeline (preprocess + register_pair), in millimetres."""

import copy
import pickle

import numpy as np
import pytest
import torch

from helpers import oblique_image, random_network, reference_network, smooth_volume
from mgr_engine import Engine, RegistrationResult
from mgr_engine.errors import MgrEngineError
from mgr_engine.model import official_state_dict
from mgr_engine.preprocess import normalize_intensity

itk = pytest.importorskip("itk")
unigradicon = pytest.importorskip("unigradicon")
from icon_registration import itk_wrapper  # noqa: E402

SHAPE = (72, 72, 72)


@pytest.fixture(scope="module")
def setting():
    net = random_network(SHAPE, seed=7, displacement_scale=0.5)
    fixed = oblique_image(smooth_volume((50, 64, 58), 1) * 900, [1.3, 0.9, 1.1], [12.0, -30.0, 7.5], (0.2, -0.1, 0.3))
    moving = oblique_image(smooth_volume((56, 48, 61), 2) * 700 + 50, [1.0, 1.2, 0.8], [3.0, -20.0, 0.0], (-0.15, 0.25, 0.05))
    return net, fixed, moving


def random_points(image, n=500, seed=0):
    """Physical points spread over ``image``'s extent (and a little beyond)."""
    rng = np.random.default_rng(seed)
    size = np.asarray(image.GetLargestPossibleRegion().GetSize(), float)
    indices = rng.uniform(-2, size + 1, size=(n, 3))
    origin = np.asarray(image.GetOrigin(), float)
    direction = itk.array_from_matrix(image.GetDirection())
    spacing = np.asarray(image.GetSpacing(), float)
    return [[float(v) for v in origin + direction @ (spacing * idx)] for idx in indices]


def max_distance(t1, t2, points):
    return max(np.linalg.norm(np.array(t1.TransformPoint(p)) - np.array(t2.TransformPoint(p))) for p in points)


def test_transforms_equal_reference_in_mm(setting):
    net, fixed, moving = setting
    ref = reference_network(net)
    fixed_pre = unigradicon.preprocess(fixed, "mri")
    moving_pre = unigradicon.preprocess(moving, "mri")
    ref_ab, ref_ba = itk_wrapper.register_pair(ref, moving_pre, fixed_pre, finetune_steps=None)

    engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu")
    result = engine.register(fixed, moving, io_iterations=None)

    points = random_points(fixed)
    moved = max(np.linalg.norm(np.array(result.transform.TransformPoint(p)) - np.array(p)) for p in points)
    assert moved > 5.0  # the pair sits apart, and the random network moves points: not a vacuous check
    identity_like = itk_wrapper.create_itk_transform(ref.identity_map, ref.identity_map, moving_pre, fixed_pre)
    assert max_distance(ref_ab, identity_like, points) > 1.0
    assert max_distance(result.transform, ref_ab, points) < 0.01
    assert max_distance(result.inverse_transform, ref_ba, random_points(moving)) < 0.01


@pytest.mark.parametrize("modality,kwargs", [("ct", {}), ("ct", {"ct_window": (-200, 300)}), ("mri", {}),
                                             ("mri", {"quantile_range": (0.05, 0.95)})])
def test_preprocessing_equals_reference(modality, kwargs):
    array = (smooth_volume((30, 34, 28), 4) * 2400 - 1200).astype(np.float32)
    image = itk.image_from_array(array)
    expected = itk.array_from_image(unigradicon.preprocess(image, modality, **kwargs))
    ours = normalize_intensity(array, modality, **kwargs).numpy()
    np.testing.assert_array_equal(ours, expected)  # ITK computes in double too: bit for bit


def test_displacement_field_matches_transform_point(setting):
    net, fixed, moving = setting
    engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu")
    result = engine.register(fixed, moving, io_iterations=None)
    field = result.displacement_field()
    assert field.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_allclose(np.asarray(field.GetSpacing()), np.asarray(fixed.GetSpacing()))
    np.testing.assert_allclose(np.asarray(field.GetOrigin()), np.asarray(fixed.GetOrigin()))
    array = itk.array_from_image(field)  # (z, y, x, [dx, dy, dz])
    rng = np.random.default_rng(1)
    size = np.asarray(fixed.GetLargestPossibleRegion().GetSize())
    for _ in range(50):
        index = [int(rng.integers(0, n)) for n in size]  # (x, y, z)
        point = np.array(fixed.TransformIndexToPhysicalPoint(index))
        expected = np.array(result.transform.TransformPoint(point)) - point
        np.testing.assert_allclose(array[index[2], index[1], index[0]], expected, atol=1e-4)
    jacobian = itk.array_from_image(result.jacobian_determinant())
    assert jacobian.shape == tuple(reversed(size.tolist())) and np.isfinite(jacobian).all()


def test_save_roundtrip_and_warp(setting, tmp_path):
    net, fixed, moving = setting
    engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu")
    result = engine.register(fixed, moving, io_iterations=None)
    for name in ("t.h5", "t.tfm"):
        result.save(tmp_path / name)
        loaded = itk.transformread(str(tmp_path / name))[0]
        assert max_distance(loaded, result.transform, random_points(fixed, 50)) < 1e-4
    warped = result.warp()
    assert tuple(warped.GetLargestPossibleRegion().GetSize()) == tuple(fixed.GetLargestPossibleRegion().GetSize())
    # a voxel of the warped image is the moving image sampled at the transformed point
    interpolator = itk.LinearInterpolateImageFunction.New(moving)
    voxel = [20, 30, 25]
    point = result.transform.TransformPoint(fixed.TransformIndexToPhysicalPoint(voxel))
    matrix = itk.array_from_matrix(moving.GetDirection()) @ np.diag(np.asarray(moving.GetSpacing(), float))
    continuous = np.linalg.solve(matrix, np.array(point) - np.asarray(moving.GetOrigin(), float))
    assert np.all(continuous > 0) and np.all(continuous < np.asarray(moving.GetLargestPossibleRegion().GetSize()) - 1)
    index = itk.ContinuousIndex[itk.D, 3]()
    for axis, value in enumerate(continuous):
        index.SetElement(axis, float(value))
    expected = interpolator.EvaluateAtContinuousIndex(index)
    assert expected != 0.0
    assert abs(itk.array_from_image(warped)[voxel[2], voxel[1], voxel[0]] - expected) < 1e-3


def test_a_result_survives_pickle_without_its_engine(setting):
    """A process pool's results and a cache on disk pickle results: it failed on the engine's
    locks ("cannot pickle '_thread.lock' object"), which the result kept for its inverse."""
    net, fixed, moving = setting
    engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu")
    result = engine.register(fixed, moving, io_iterations=None)
    points = np.array(random_points(fixed, 20))
    copied = pickle.loads(pickle.dumps(result))
    np.testing.assert_array_equal(copied.transform_points(points), result.transform_points(points))
    np.testing.assert_array_equal(itk.array_from_image(copied.warp()), itk.array_from_image(result.warp()))
    assert copied.fixed.GetSpacing() == fixed.GetSpacing() and copied.moving.GetOrigin() == moving.GetOrigin()
    with pytest.raises(MgrEngineError, match=r"copied or pickled without its engine\): give it phi_ba .*read "
                                              r"inverse_transform before copying"):
        copied.inverse_transform
    inverse_points = result.transform_points(points, inverse=True)  # computes the inverse map before the copy
    np.testing.assert_array_equal(copy.deepcopy(result).transform_points(points, inverse=True), inverse_points)


def test_a_result_made_from_predict_maps_map_is_registers(setting):
    """The tensor path's way to millimetres (a pipeline that preprocesses and predicts itself):
    a RegistrationResult of the two images and the map gives register()'s transform and warp."""
    net, fixed, moving = setting
    engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu")
    expected = engine.register(fixed, moving, io_iterations=None)
    phi_ab = engine.predict_map(engine.preprocess(moving, "mri"), engine.preprocess(fixed, "mri"))
    made = RegistrationResult(fixed, moving, phi_ab)
    points = np.array(random_points(fixed, 20))
    np.testing.assert_array_equal(made.transform_points(points), expected.transform_points(points))
    np.testing.assert_array_equal(itk.array_from_image(made.warp()), itk.array_from_image(expected.warp()))
    with pytest.raises(MgrEngineError, match=r"no inverse map and no engine to compute it \(it was made from a map"):
        made.inverse_transform
    phi_ba = engine.predict_map(engine.preprocess(fixed, "mri"), engine.preprocess(moving, "mri"))
    both = RegistrationResult(fixed, moving, phi_ab, phi_ba)
    np.testing.assert_array_equal(both.transform_points(points, inverse=True),
                                  expected.transform_points(points, inverse=True))


def test_numpy_input_is_one_millimetre_identity_grid():
    net = random_network(SHAPE, seed=2, narrow=True, displacement_scale=0.5)
    engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu")
    result = engine.register(smooth_volume((40, 44, 48), 1), smooth_volume((40, 44, 48), 2), io_iterations=None)
    assert tuple(result.fixed.GetSpacing()) == (1.0, 1.0, 1.0)
    assert tuple(result.fixed.GetLargestPossibleRegion().GetSize()) == (48, 44, 40)
    assert isinstance(result.phi_ab, torch.Tensor) and result.phi_ab.shape == (1, 3, *SHAPE)


def test_a_result_made_from_a_batchs_map_is_refused_and_from_arrays_taken(setting):
    """A batch's map (B = 2) gave the first pair's transform without a word; images given as
    arrays (as register takes them) were an AttributeError at the first output."""
    from mgr_engine.errors import InvalidImageError

    net, fixed, moving = setting
    engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu")
    moving_in, fixed_in = engine.preprocess(moving, "mri"), engine.preprocess(fixed, "mri")
    batch = engine.predict_map(torch.cat([moving_in, fixed_in]), torch.cat([fixed_in, moving_in]))
    with pytest.raises(InvalidImageError, match=r"phi_ab must be one pair's map, a \(1, 3, D, H, W\) tensor .* got "
                                                r"\(2, 3, "):
        RegistrationResult(fixed, moving, batch)
    arrays = RegistrationResult(itk.array_from_image(fixed), itk.array_from_image(moving), batch[:1])
    assert arrays.warp().GetSpacing() == (1.0, 1.0, 1.0)  # an array's grid: 1 mm, as register reads one
