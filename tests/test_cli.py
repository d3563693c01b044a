"""`mgr-engine register|warp|jacobian` reproduce `unigradicon-register|warp|jacobian`."""

import sys

import numpy as np
import pytest
import torch

from helpers import random_network, recorded_io_precisions, smooth_volume
from mgr_engine import cli, itk_io, resample
from mgr_engine.model import official_state_dict

itk = pytest.importorskip("itk")
unigradicon = pytest.importorskip("unigradicon")
from icon_registration import itk_wrapper  # noqa: E402

SHAPE = [72, 72, 72]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    net = random_network(SHAPE, seed=9, displacement_scale=0.5)  # official channel widths: the CLI builds those
    weights = folder / "Step_2_final.trch"
    torch.save(official_state_dict(net), weights)
    paths = {"weights": str(weights)}
    for name, seed, spacing, shape in (("fixed", 1, (1.1, 0.9, 1.3), (50, 60, 56)), ("moving", 2, (1.0, 1.2, 1.0), (54, 52, 60))):
        image = itk.image_from_array((smooth_volume(shape, seed) * 1000).astype(np.int16))  # integer pixels, as scans are
        image.SetSpacing(spacing)
        image.SetOrigin([seed * 3.0, -seed * 2.0, 1.0])
        paths[name] = str(folder / f"{name}.nii.gz")
        itk.imwrite(image, paths[name])
    return paths


def run_reference(monkeypatch, entry, args):
    monkeypatch.setattr(unigradicon, "input_shape", [1, 1, *SHAPE])
    monkeypatch.setattr(sys, "argv", ["unigradicon", *args])
    entry()


def points_in(image_path, n=300):
    image = itk.imread(image_path)
    size = np.asarray(image.GetLargestPossibleRegion().GetSize(), float)
    rng = np.random.default_rng(0)
    return [image.TransformIndexToPhysicalPoint([int(v) for v in rng.uniform(0, size - 1)]) for _ in range(n)]


def max_distance(path_a, path_b, points):
    a, b = itk.transformread(path_a)[0], itk.transformread(path_b)[0]
    return max(np.linalg.norm(np.array(a.TransformPoint(p)) - np.array(b.TransformPoint(p))) for p in points)


@pytest.mark.parametrize("io", ["None", "1"])
def test_register_reproduces_unigradicon_register(files, tmp_path, monkeypatch, io):
    common = ["--fixed", files["fixed"], "--moving", files["moving"], "--fixed_modality", "mri",
              "--moving_modality", "ct", "--network_weights", files["weights"], "--io_iterations", io]
    # Seed the reference right before its IO (building networks consumes random numbers
    # differently on both sides); ours draws the regularizer's grid from --seed's generator.
    finetune = itk_wrapper.finetune_execute

    def seeded_finetune(*args, **kwargs):
        torch.manual_seed(5)
        return finetune(*args, **kwargs)

    monkeypatch.setattr(itk_wrapper, "finetune_execute", seeded_finetune)
    run_reference(monkeypatch, unigradicon.main, common + [
        "--transform_out", str(tmp_path / "ref.h5"), "--warped_moving_out", str(tmp_path / "ref.nii.gz")])
    assert cli.main(["register", *common, "--network_input_shape", *map(str, SHAPE), "--seed", "5",
                     "--transform_out", str(tmp_path / "ours.h5"), "--warped_moving_out", str(tmp_path / "ours.nii.gz")]) == 0
    points = points_in(files["fixed"])
    assert max_distance(str(tmp_path / "ours.h5"), str(tmp_path / "ref.h5"), points) < 0.01
    identity_distance = max(np.linalg.norm(np.array(itk.transformread(str(tmp_path / "ref.h5"))[0].TransformPoint(p)) - np.array(p))
                            for p in points)
    assert identity_distance > 1.0
    ours = itk.imread(str(tmp_path / "ours.nii.gz"))
    ref = itk.imread(str(tmp_path / "ref.nii.gz"))
    assert type(ours) is type(ref)  # pixel type kept (int16)
    difference = np.abs(itk.array_from_image(ours).astype(float) - itk.array_from_image(ref).astype(float))
    assert np.mean(difference > 1) < 0.001  # integer rounding at a few voxels at most
    # unigradicon's transform file is of the form `mgr-engine warp` evaluates in C++: warped
    # through it, the moving image is the reference's own warped image
    assert itk_io.grid_transform(itk_io.read_transform(tmp_path / "ref.h5")) is not None
    assert cli.main(["warp", "--fixed", files["fixed"], "--moving", files["moving"], "--transform", str(tmp_path / "ref.h5"),
                     "--linear", "--warped_moving_out", str(tmp_path / "ref_warped_again.nii.gz")]) == 0
    again = itk.array_from_image(itk.imread(str(tmp_path / "ref_warped_again.nii.gz"))).astype(float)
    difference = np.abs(again - itk.array_from_image(ref).astype(float))
    assert difference.max() <= 1 and np.mean(difference > 0) < 0.001


def test_register_writes_the_inverse_transform(files, tmp_path):
    """``--inverse_transform_out``: the result's ``inverse_transform`` (moving point -> fixed
    point, the network's backward map), as the Python API gives it for the same pair."""
    from mgr_engine import Engine
    from mgr_engine.model import NetworkConfig

    paths = {name: str(tmp_path / f"{name}.h5") for name in ("forward", "inverse")}
    assert cli.main(["register", "--fixed", files["fixed"], "--moving", files["moving"], "--fixed_modality", "mri",
                     "--moving_modality", "mri", "--network_weights", files["weights"], "--io_iterations", "None",
                     "--network_input_shape", *map(str, SHAPE), "--transform_out", paths["forward"],
                     "--inverse_transform_out", paths["inverse"]]) == 0
    engine = Engine(model="unigradicon", weights=files["weights"], device="cpu", config=NetworkConfig(input_shape=tuple(SHAPE)))
    result = engine.register(files["fixed"], files["moving"], io_iterations=None)
    at = points_in(files["moving"])
    written = itk.transformread(paths["inverse"])[0]
    expected = [np.array(result.inverse_transform.TransformPoint(p)) for p in at]
    assert max(np.linalg.norm(np.array(written.TransformPoint(p)) - e) for p, e in zip(at, expected)) < 1e-6
    forward = itk.transformread(paths["forward"])[0]
    assert max(np.linalg.norm(np.array(forward.TransformPoint(p)) - e) for p, e in zip(at, expected)) > 1.0


def test_register_runs_io_in_the_precision_asked(files, tmp_path, monkeypatch):
    """``--io_precision`` is instance optimization's precision (fp32 by default); the parser's
    choices are the engine's (written out there, so that parsing imports no torch)."""
    from mgr_engine import Engine
    from mgr_engine.engine import IO_PRECISIONS

    assert cli.IO_PRECISION_CHOICES == IO_PRECISIONS
    asked = recorded_io_precisions(monkeypatch, Engine)
    command = ["-q", "register", "--fixed", files["fixed"], "--moving", files["moving"], "--fixed_modality", "mri",
               "--moving_modality", "mri", "--model", "compact", "--io_iterations", "1",
               "--transform_out", str(tmp_path / "transform.h5")]
    assert cli.main(command) == 0
    assert cli.main([*command, "--io_precision", "tf32x3"]) == 0
    assert asked == ["fp32", "tf32x3"]


def test_register_warns_that_masks_without_a_masking_option_are_not_used(files, tmp_path, caplog):
    """unigradicon-register takes --fixed_mask without --input_masking/--loss_function_masking and
    ignores it without a word; so does mgr-engine (a drop-in), with a warning."""
    import logging

    command = ["register", "--fixed", files["fixed"], "--moving", files["moving"], "--fixed_modality", "mri",
               "--moving_modality", "mri", "--network_weights", files["weights"], "--io_iterations", "None",
               "--network_input_shape", *map(str, SHAPE), "--transform_out", str(tmp_path / "t.h5"),
               "--fixed_mask", files["fixed"]]
    for masking, warned in (([], True), (["--input_masking"], False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mgr_engine"):
            assert cli.main(command + masking) == 0
        assert ("--fixed_mask/--moving_mask are not used without --input_masking or --loss_function_masking"
                in caplog.text) is warned


def test_warp_and_jacobian_reproduce_reference(files, tmp_path, monkeypatch):
    transform = str(tmp_path / "t.h5")
    assert cli.main(["register", "--fixed", files["fixed"], "--moving", files["moving"], "--fixed_modality", "mri",
                     "--moving_modality", "mri", "--network_weights", files["weights"], "--io_iterations", "None",
                     "--network_input_shape", *map(str, SHAPE), "--transform_out", transform]) == 0
    for flag in ("--linear", "--nearest_neighbor"):
        warp_args = ["--fixed", files["fixed"], "--moving", files["moving"], "--transform", transform, flag]
        run_reference(monkeypatch, unigradicon.warp_command, warp_args + ["--warped_moving_out", str(tmp_path / "ref_w.nii.gz")])
        assert cli.main(["warp", *warp_args, "--warped_moving_out", str(tmp_path / "w.nii.gz")]) == 0
        np.testing.assert_array_equal(itk.array_from_image(itk.imread(str(tmp_path / "w.nii.gz"))),
                                      itk.array_from_image(itk.imread(str(tmp_path / "ref_w.nii.gz"))))
    jac_args = ["--transform", transform, "--fixed", files["fixed"]]
    run_reference(monkeypatch, unigradicon.compute_jacobian_map_command,
                  jac_args + ["--jacob", str(tmp_path / "ref_j.nii.gz"), "--log_jacob", str(tmp_path / "ref_lj.nii.gz")])
    assert cli.main(["jacobian", *jac_args, "--jacob", str(tmp_path / "j.nii.gz"), "--log_jacob", str(tmp_path / "lj.nii.gz")]) == 0
    for ours, ref in (("j", "ref_j"), ("lj", "ref_lj")):
        a = itk.array_from_image(itk.imread(str(tmp_path / f"{ours}.nii.gz")))
        b = itk.array_from_image(itk.imread(str(tmp_path / f"{ref}.nii.gz")))
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert np.std(a) > 0  # the transform is not the identity


def test_extra_outputs(files, tmp_path, caplog):
    out = {name: str(tmp_path / f"{name}.nii.gz") for name in ("field", "jac")}
    with caplog.at_level("INFO", logger="mgr_engine.results"):
        assert cli.main(["register", "--fixed", files["fixed"], "--moving", files["moving"], "--fixed_modality", "mri",
                         "--moving_modality", "mri", "--network_weights", files["weights"], "--io_iterations",
                         "None", "--network_input_shape", *map(str, SHAPE), "--transform_out", str(tmp_path / "t.h5"),
                         "--displacement_field_out", out["field"], "--jacobian_out", out["jac"],
                         "--physical_jacobian"]) == 0
    field = itk.imread(out["field"])
    assert field.GetNumberOfComponentsPerPixel() == 3
    assert tuple(field.GetSpacing()) == pytest.approx(tuple(itk.imread(files["fixed"]).GetSpacing()))
    # an axis-aligned fixed image: the physical Jacobian is the one along index axes (ITK's filter's)
    along_index_axes = resample.jacobian_determinant(torch.from_numpy(itk.array_from_image(field)), field.GetSpacing())
    jacobian = itk.array_from_image(itk.imread(out["jac"]))
    assert jacobian.std() > 0.01
    np.testing.assert_allclose(jacobian, along_index_axes.numpy(), rtol=1e-5, atol=1e-5)
    # its summary logged, as the jacobian command logs it
    assert f"Jacobian determinant: min {jacobian.min():.3f}, max {jacobian.max():.3f};" in caplog.text


def test_physical_jacobian_of_an_affine_transform_on_an_oblique_image(tmp_path):
    from helpers import oblique_image

    fixed = oblique_image(smooth_volume((14, 16, 12), 3), (1.2, 1.0, 0.9), (-10.0, -12.0, -8.0), (0.3, -0.2, 0.5))
    itk.imwrite(fixed, str(tmp_path / "fixed.nrrd"))  # NRRD keeps the direction exactly
    matrix = np.array([[1.3, 0.2, 0.0], [0.0, 0.9, 0.3], [0.1, 0.0, 0.7]])
    affine = itk.AffineTransform[itk.D, 3].New()
    affine.SetMatrix(itk.matrix_from_array(matrix))
    affine.SetTranslation([2.0, -1.0, 0.5])
    itk.transformwrite([affine], str(tmp_path / "affine.h5"))
    args = ["jacobian", "--transform", str(tmp_path / "affine.h5"), "--fixed", str(tmp_path / "fixed.nrrd")]
    assert cli.main([*args, "--jacob", str(tmp_path / "physical.nii.gz"), "--physical_jacobian"]) == 0
    assert cli.main([*args, "--jacob", str(tmp_path / "index.nii.gz")]) == 0
    physical, index_axes = (itk.array_from_image(itk.imread(str(tmp_path / f"{name}.nii.gz")))[1:-1, 1:-1, 1:-1]
                            for name in ("physical", "index"))  # central differences only
    np.testing.assert_allclose(physical, np.linalg.det(matrix), rtol=1e-4)
    assert np.abs(index_axes - np.linalg.det(matrix)).min() > 0.05  # ITK's filter's, on an oblique image


@pytest.mark.parametrize("slab_voxels", [2**22, 50])  # one slab; slabs of 2 slices and a last one of 1
def test_log_jacobian_is_the_log_in_double_rounded_to_float(slab_voxels):
    values = np.linspace(-0.5, 3.0, 5 * 4 * 6, dtype=np.float32).reshape(5, 4, 6)
    values[2, 1, 3] = 0.0
    image = itk.image_from_array(values)
    image.SetSpacing((1.5, 1.0, 0.5))
    log_image = cli._log_image(image, slab_voxels)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = np.log(values.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(itk.array_from_image(log_image), expected)  # NaN below 0, -inf at 0
    assert np.isnan(expected).any() and np.isneginf(expected).any()
    assert tuple(log_image.GetSpacing()) == (1.5, 1.0, 0.5)
