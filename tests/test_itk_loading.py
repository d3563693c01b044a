"""Image files and a result's ITK outputs load only the ITK modules they use
(mgr_engine.itk_io.wrapped_class).

ITK's lazy loader would load ITKDisplacementField and ITKIOTransformBase with their declared
dependencies (ITKSmoothing, ITKImageIntensity, ...: 8 s), every ImageIO module for a file
(DICOM, TIFF, ...), ITKTransform for an affine transform, ITKImageFunction and ITKImageGrid for a
resampling; the engine imports the classes it uses on their own. Checked in a fresh process (in
this one other tests load everything), and against the lazy loader's way, which is also the
fallback."""

import importlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

itk = pytest.importorskip("itk")

# Builds a result of a random map between oblique images and writes its outputs to OUT (.npz).
OUTPUTS = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    import itk
    from mgr_engine import itk_io
    from mgr_engine.engine import RegistrationResult

    def oblique(array, angle):
        image = itk.image_from_array(np.ascontiguousarray(array, dtype=np.float32))
        image.SetSpacing((1.2, 1.0, 0.9))
        c, s = np.cos(angle), np.sin(angle)
        image.SetDirection(itk.matrix_from_array(np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])))
        return image

    def outputs(folder):
        rng = np.random.default_rng(0)
        moving_array = rng.random((11, 13, 12))
        fixed, moving = oblique(rng.random((12, 14, 10)), 0.2), oblique(moving_array, -0.1)
        grid = np.stack(np.meshgrid(*[np.linspace(0, 1, n) for n in (9, 10, 8)], indexing="ij"))
        phi = torch.from_numpy((grid + 0.03 * rng.standard_normal(grid.shape)).astype(np.float32))[None]
        itk_io.write_image(itk_io.image_like((200 * moving_array).astype(np.int16), moving), f"{folder}/moving.nii.gz")
        moving = itk_io.load_image(f"{folder}/moving.nii.gz")
        result = RegistrationResult(fixed=fixed, moving=moving, phi_ab=phi)
        itk_io.write_transform(result.transform, f"{folder}/transform.h5")
        itk_io.write_transform(itk_io.network_to_physical(fixed, (4, 5, 6)), f"{folder}/affine.tfm")
        read, affine = itk_io.read_transform(f"{folder}/transform.h5"), itk_io.read_transform(f"{folder}/affine.tfm")
        points = [fixed.TransformIndexToPhysicalPoint([i, j, k]) for i, j, k in [(1, 2, 3), (5, 7, 4), (9, 0, 11)]]
        return {
            "at": np.array(points),
            "points": np.array([read.TransformPoint(p) for p in points]),
            "jacobian": itk.array_from_image(result.jacobian_determinant()),
            "field": itk.array_from_image(itk_io.transform_to_displacement_field(read, fixed)),
            "affine": np.array(affine.GetParameters()),  # a view of the transform's own array: keep it alive
            "moving": itk.array_from_image(moving),
            "warped": itk.array_from_image(itk_io.resample(moving, read, fixed)),
            "unmoved": itk.array_from_image(itk_io.resample(moving, itk_io.identity_transform(), fixed, "nearest")),
        }

    if __name__ == "__main__":
        np.savez(f"{sys.argv[1]}/outputs.npz", **outputs(sys.argv[1]))
        print(" ".join(sorted(name for name in sys.modules if name.startswith("itk.ITK") and name.endswith("Python"))))
""")


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory):
    """The outputs computed in a fresh process, and the ITK modules it loaded."""
    folder = tmp_path_factory.mktemp("fresh")
    (folder / "outputs_script.py").write_text(OUTPUTS)
    run = subprocess.run([sys.executable, str(folder / "outputs_script.py"), str(folder)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return dict(np.load(folder / "outputs.npz")), run.stdout.split(), folder


def test_a_results_outputs_load_no_module_they_do_not_use(fresh_process):
    _, modules, _ = fresh_process
    assert "itk.ITKCommonPython" in modules, "the check sees no ITK module at all"
    for unused in ("ITKSmoothing", "ITKImageIntensity", "ITKConvolution", "ITKThresholding", "ITKFFT",
                   "ITKIOGDCM", "ITKIOTIFF", "ITKIOJPEG2000", "ITKIOMINC", "ITKTransform", "ITKImageFunction",
                   "ITKImageGrid"):
        assert f"itk.{unused}Python" not in modules


def test_the_lazy_loaders_way_gives_the_same_outputs(fresh_process, tmp_path, monkeypatch):
    from mgr_engine import itk_io

    fresh, _, folder = fresh_process
    monkeypatch.setattr(itk_io, "wrapped_class", lambda module, name: None)
    monkeypatch.setattr(itk_io, "down_cast", itk.down_cast)
    namespace = {}
    exec(compile(OUTPUTS, str(folder / "outputs_script.py"), "exec"), namespace)
    lazy = namespace["outputs"](str(tmp_path))
    for name, value in lazy.items():
        np.testing.assert_array_equal(value, fresh[name], err_msg=name)
    assert np.std(fresh["jacobian"]) > 0.01 and np.abs(fresh["field"]).max() > 0.1  # not the identity
    assert fresh["moving"].dtype == np.int16 and np.std(fresh["warped"]) > 10
    # the file the fresh process wrote, read by itk.transformread
    written = itk.transformread(str(folder / "transform.h5"))[0]
    np.testing.assert_array_equal(np.array([written.TransformPoint(p) for p in fresh["at"]]), fresh["points"])


def test_the_commands_run_each_in_a_fresh_process(tmp_path):
    """``register`` with a mask, ``jacobian --physical_jacobian``, ``warp`` and
    ``transform-points``, each in its own process as users run them; ``warp`` and ``jacobian``
    without torch where the C++ kernels are built, ``transform-points`` without it anyway.
    ``ImageGrid.of`` read an image's direction with ``itk.array_from_matrix``, which raises
    a KeyError until ITK's lazy loader has loaded ITKCommon: in a fresh process both first
    commands failed (in this one other tests have loaded it). The outputs of the later commands,
    through ITK's filters, match ``register``'s."""
    from helpers import oblique_image, smooth_volume

    from mgr_engine import itk_io
    from mgr_engine.kernel_modes import cpp_extensions_built

    itk_has_torch_switch = hasattr(importlib.import_module("itk.support.helpers"), "_HAVE_TORCH")
    fixed = oblique_image(smooth_volume((30, 34, 28), 1), (1.2, 1.0, 0.9), (-10.0, -12.0, -8.0), (0.1, 0.0, 0.2))
    moving = oblique_image(smooth_volume((32, 30, 33), 2), (1.1, 1.05, 0.95), (-9.0, -14.0, -7.0), (0.15, -0.05, -0.1))
    mask = itk_io.image_like((itk.array_from_image(fixed) > 0.05).astype(np.uint8), fixed)
    paths = {name: str(tmp_path / f"{name}.nrrd") for name in ("fixed", "moving", "mask")}
    for name, image in (("fixed", fixed), ("moving", moving), ("mask", mask)):
        itk.imwrite(image, paths[name])
    out = {name: str(tmp_path / f"{name}.nii.gz") for name in ("warped", "jacobian", "jacobian_cli", "warped_cli")}
    transform = str(tmp_path / "transform.h5")
    landmarks, moved = tmp_path / "landmarks.csv", tmp_path / "moved.csv"
    at = np.array([fixed.TransformIndexToPhysicalPoint(index) for index in ([3, 5, 7], [20, 14, 9], [27, 30, 21])])
    landmarks.write_text("x,y,z\n" + "".join(f"{x!r},{y!r},{z!r}\n" for x, y, z in at.tolist()))
    commands = [
        ["register", "--model", "compact", "--device", "cpu", "--fixed", paths["fixed"], "--moving", paths["moving"],
         "--fixed_modality", "mri", "--moving_modality", "mri", "--fixed_mask", paths["mask"], "--input_masking",
         "--io_iterations", "None", "--transform_out", transform, "--warped_moving_out", out["warped"],
         "--jacobian_out", out["jacobian"], "--physical_jacobian"],
        ["jacobian", "--fixed", paths["fixed"], "--transform", transform, "--jacob", out["jacobian_cli"],
         "--physical_jacobian"],
        ["warp", "--fixed", paths["fixed"], "--moving", paths["moving"], "--transform", transform,
         "--warped_moving_out", out["warped_cli"], "--linear"],
        ["transform-points", "--transform", transform, "--points", str(landmarks), "--points_out", str(moved)],
    ]
    # as the mgr-engine script runs them, then whether torch was loaded
    script = "import sys\nfrom mgr_engine.cli import main\ncode = main(sys.argv[1:])\nprint('torch' in sys.modules)\nsys.exit(code)"
    for command in commands:
        run = subprocess.run([sys.executable, "-c", script, "-q", *command], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"{command[0]}: {run.stderr}"
        # warp and jacobian run the C++ kernels on numpy arrays: torch's import was 1-2 s of them
        # (ITK imports torch too, unless itk_io.keep_itk_from_importing_torch finds its switch)
        # (transform-points runs no kernel: numpy and ITK's transform)
        torch_expected = (command[0] == "register" or not itk_has_torch_switch
                          or (command[0] != "transform-points" and not cpp_extensions_built()))
        assert run.stdout.split()[-1] == str(torch_expected), command[0]
    arrays = {name: itk.array_from_image(itk.imread(path)) for name, path in out.items()}
    assert np.std(arrays["jacobian"]) > 1e-3, "the test wants a transform that moves points"
    np.testing.assert_allclose(arrays["jacobian_cli"], arrays["jacobian"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(arrays["warped_cli"], arrays["warped"], rtol=1e-5, atol=1e-5)
    written = itk_io.read_transform(transform)
    expected = np.array([written.TransformPoint(point) for point in at.tolist()])
    assert np.abs(expected - at).max() > 0.1, "the test wants a transform that moves points"
    np.testing.assert_allclose(np.loadtxt(moved, delimiter=",", skiprows=1), expected, rtol=0, atol=1e-9)
