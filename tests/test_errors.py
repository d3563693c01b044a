"""Bad inputs raise typed errors from mgr_engine.errors that say what to do, and leave no output behind."""

import os
import re
import shutil
import warnings

import itk
import nibabel
import numpy as np
import pytest
import torch

import mgr_engine
from helpers import random_network, smooth_volume
from mgr_engine import Engine, cli, itk_io
from mgr_engine.errors import (
    CheckpointError,
    ImageReadError,
    InstanceOptimizationError,
    OutputWriteError,
    InvalidImageError,
    InvalidOptionError,
    MaskMismatchError,
    MgrEngineError,
    WeightsNotFoundError,
)
from mgr_engine.model import GradICONNetwork, NetworkConfig, official_state_dict

SHAPE = (72, 72, 72)
IMAGE_SHAPE = (20, 24, 22)


# ------------------------------------------------------------------ helpers


def volume(seed=0):
    return smooth_volume(IMAGE_SHAPE, seed) * 500 + 10


def with_voxel(value):
    array = volume()
    array[5, 6, 7] = value
    return array


def itk_image(array, spacing=None):
    image = itk.image_from_array(np.ascontiguousarray(array, dtype=np.float32))
    if spacing is not None:
        image.SetSpacing(spacing)
    return image


def write_bytes(path, data: bytes):
    path.write_bytes(data)
    return path


def mkdir(path):
    path.mkdir()
    return path


def write_image(path, array):
    itk.imwrite(itk_image(array), str(path))
    return path


def truncated(path):
    """``path`` cut to two thirds of its bytes, as an interrupted copy leaves a file."""
    data = path.read_bytes()
    return write_bytes(path, data[:len(data) * 2 // 3])


def sheared_nifti(path):
    """A NIfTI file whose only affine (an sform, no qform) shears its voxel axes: ITK cannot
    read it."""
    image = nibabel.Nifti1Image(volume(3), np.array([[2, 0.5, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1.0]]))
    image.set_qform(None)
    nibabel.save(image, str(path))
    return path


GARBAGE = b"\x00\x01 these bytes are not an image nor a checkpoint \xff\xfe" * 8


def register(engine, fixed=None, moving=None, **options):
    """``engine.register`` on valid images unless given; no IO, so a missed error fails fast."""
    options.setdefault("io_iterations", None)
    options.setdefault("progress", False)
    return engine.register(volume(1) if fixed is None else fixed, volume(2) if moving is None else moving, **options)


def files_in(directory):
    return sorted(p.name for p in directory.iterdir())


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def narrow_net():
    return random_network(SHAPE, narrow=True)


@pytest.fixture(scope="module")
def engine(narrow_net):
    return Engine(weights=official_state_dict(narrow_net), config=narrow_net.config, device="cpu")


@pytest.fixture(scope="module")
def official_state():
    """Official channel widths at 72^3 (what the CLI builds with --network_input_shape 72 72 72)."""
    return official_state_dict(random_network(SHAPE, narrow=False))


# ------------------------------------------------------------------ error classes


@pytest.mark.parametrize(
    "error, builtin",
    [
        (InvalidImageError, ValueError),
        (MaskMismatchError, ValueError),
        (InvalidOptionError, ValueError),
        (CheckpointError, ValueError),
        (ImageReadError, OSError),
        (OutputWriteError, OSError),
        (WeightsNotFoundError, FileNotFoundError),
        (InstanceOptimizationError, ArithmeticError),
    ],
)
def test_error_classes_derive_from_base_and_builtin(error, builtin):
    assert issubclass(error, MgrEngineError) and issubclass(error, builtin)
    with pytest.raises(builtin):  # an existing `except ValueError:` still catches it
        raise error("message")


def test_mask_mismatch_is_an_invalid_image():
    assert issubclass(MaskMismatchError, InvalidImageError)


# ------------------------------------------------------------------ invalid images


@pytest.mark.parametrize("kind", ["array", "itk"])
def test_constant_image(engine, kind):
    constant = np.full(IMAGE_SHAPE, 7.0, np.float32)
    moving = constant if kind == "array" else itk_image(constant)
    with pytest.raises(InvalidImageError, match=r"constant.*Check that the right file"):
        register(engine, moving=moving)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_voxels(engine, value):
    with pytest.raises(InvalidImageError, match=r"1 NaN or infinite voxels; replace them"):
        register(engine, fixed=with_voxel(value))


def test_a_float64_value_beyond_float32s_range_is_told_so(engine):
    """It is finite where it is stored: "NaN or infinite" alone sent the user looking for NaN. And
    the message comes alone, without NumPy's "overflow encountered in cast" before it."""
    fixed = volume(1).astype(np.float64)
    fixed[3, 4, 5] = 1e300
    with pytest.raises(InvalidImageError, match=r"1 NaN or infinite voxels in float32, .*\(a float64 value beyond "
                                                r"\+-3.4e38 is infinite there\); replace them"), \
            warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        register(engine, fixed=fixed)


SLICE_ADVICE = r"mgr_engine registers 3-D volumes.*: pass the whole volume, not one slice"
SERIES_ADVICE = r"mgr_engine registers 3-D volumes.*: split a 4-D series into 3-D frames"


@pytest.mark.parametrize(
    "make_input, advice",
    [
        pytest.param(lambda tmp: volume()[0], SLICE_ADVICE, id="2d-array"),
        pytest.param(lambda tmp: np.stack([volume(), volume(3)]), SERIES_ADVICE, id="4d-array"),
        pytest.param(lambda tmp: itk_image(volume()[0]), SLICE_ADVICE, id="2d-itk-image"),
        pytest.param(lambda tmp: write_image(tmp / "slice.nii.gz", volume()[0]), SLICE_ADVICE, id="2d-nifti-file"),
        pytest.param(lambda tmp: write_image(tmp / "series.nii.gz", np.stack([volume(), volume(3)])), SERIES_ADVICE,
                     id="4d-nifti-file"),
        pytest.param(lambda tmp: nibabel.Nifti1Image(np.stack([volume(), volume(3)], axis=-1), np.eye(4)),
                     SERIES_ADVICE, id="4d-nibabel-image"),
    ],
)
def test_not_3d(engine, tmp_path, make_input, advice):
    with pytest.raises(InvalidImageError, match=advice):
        register(engine, moving=make_input(tmp_path))


@pytest.mark.parametrize(
    "make_path, advice",
    [
        pytest.param(lambda tmp: write_bytes(tmp / "empty.nii.gz", b""), r"empty \(0 bytes\); re-export", id="empty"),
        pytest.param(lambda tmp: tmp / "missing.nii.gz", r"does not exist; check the path", id="missing"),
        pytest.param(lambda tmp: write_bytes(tmp / "garbage.nii.gz", GARBAGE), r"ITK cannot read.*use NIfTI",
                     id="garbage"),
        pytest.param(lambda tmp: truncated(write_image(tmp / "cut.nii.gz", volume(3))),
                     r"is truncated: it ends after \d+ of the \d+ bytes its header announces .*copy or export",
                     id="truncated-nii-gz"),
        pytest.param(lambda tmp: truncated(write_image(tmp / "cut.nii", volume(3))), r"is truncated", id="truncated-nii"),
        # ITK refuses these itself; the message carries its innermost reason
        pytest.param(lambda tmp: truncated(write_image(tmp / "cut.nrrd", volume(3))),
                     r"ITK cannot read .*Error reading .*cut.nrrd: \[nrrd\] .*fread got only", id="truncated-nrrd"),
        pytest.param(lambda tmp: truncated(write_image(tmp / "cut.mha", volume(3))),
                     r"ITK cannot read .*\(RuntimeError: File cannot be read: .*cut.mha for reading.\)",
                     id="truncated-mha"),
        pytest.param(lambda tmp: sheared_nifti(tmp / "sheared.nii.gz"),
                     r"ITK cannot read .*orthonormal.*; its header's axes are sheared .*resample it onto an unsheared",
                     id="sheared-sform-only"),
        pytest.param(lambda tmp: write_bytes(mkdir(tmp / "folder") / "notes.txt", b"no DICOM here").parent,
                     r"folder .* holds no DICOM series ITK can read .*give the folder of one DICOM series",
                     id="folder-without-dicom"),
        pytest.param(lambda tmp: write_image(mkdir(tmp / "niftis") / "t1.nii.gz", volume(3)).parent,
                     r"folder .* holds no DICOM series .* or an image file such as '.*niftis/t1.nii.gz' \(1 there\)",
                     id="folder-of-nifti"),
    ],
)
def test_unreadable_file(engine, tmp_path, make_path, advice):
    path = make_path(tmp_path)
    with pytest.raises(ImageReadError, match=advice) as info:
        register(engine, moving=path)
    assert str(path) in str(info.value)
    assert "moving" in str(info.value)


ITK_MESSAGES = [  # as ITK 5.4's exceptions read, and the reason shown
    ("/ITK/Modules/IO/NRRD/src/itkNrrdImageIO.cxx:935:\nITK ERROR: NrrdImageIO(0x55e91222faa0): Read: Error reading "
     "f.nrrd:\n[nrrd] nrrdLoad: trouble reading \"f.nrrd\"\n[nrrd] _nrrdEncodingRaw_read: fread got only 2 things\n",
     "Read: Error reading f.nrrd: [nrrd] _nrrdEncodingRaw_read: fread got only 2 things"),
    ("/ITK/Modules/IO/Meta/src/itkMetaImageIO.cxx:490:\nITK ERROR: MetaImageIO(0x55e912225430): File cannot be read: "
     "f.mha for reading.\nReason: Success", "File cannot be read: f.mha for reading."),
    ("/ITK/Modules/IO/PNG/src/itkPNGImageIO.cxx:544:\nPNG supports unsigned char and unsigned short",
     "PNG supports unsigned char and unsigned short"),
    ("/ITK/Modules/IO/TransformBase/src/itkTransformFileReader.cxx:128:\nITK ERROR: TransformFileReaderTemplate(0x55): "
     "Could not create Transform IO object for reading file g.nii.gz\n  Tried to create one of the following:\n"
     "    HDF5TransformIOTemplate\n  You probably failed to set a file suffix, or\n    set the suffix to an unsupported type.\n",
     "Could not create Transform IO object for reading file g.nii.gz"),
    ("Could not create IO object for reading file g.nii.gz", "Could not create IO object for reading file g.nii.gz"),
]


@pytest.mark.parametrize("message, reason", ITK_MESSAGES, ids=["nrrd-chain", "meta", "png", "factory-list", "one-line"])
def test_the_reason_taken_from_an_itk_exception(message, reason):
    assert itk_io.itk_reason(RuntimeError(message)) == reason


# ------------------------------------------------------------------ invalid options


def test_unknown_modality(engine):
    with pytest.raises(InvalidOptionError, match=r"unknown modality 'pet'.*use 'ct' or 'mri'"):
        register(engine, fixed_modality="pet")


def test_unknown_similarity_fails_before_any_work(engine, monkeypatch):
    def no_work(*args, **kwargs):
        pytest.fail("an image was loaded before the similarity was checked")

    monkeypatch.setattr(itk_io, "load_image", no_work)
    with pytest.raises(InvalidOptionError, match=r"unknown similarity 'ssd'.*choose one of lncc, lncc2, mind"):
        register(engine, io_iterations=1, io_sim="ssd")


def test_similarity_names_in_any_case_as_modalities():
    from mgr_engine import losses

    assert losses.similarity_by_name("LNCC2") is losses.lncc2_loss
    assert losses.similarity_by_name("Mind") is losses.mind_loss
    with pytest.raises(InvalidOptionError, match=r"unknown similarity 2.*choose one of lncc, lncc2, mind"):
        losses.similarity_by_name(2)


@pytest.mark.parametrize("options, message", [
    pytest.param(dict(quantile_range=(1, 99)), r"quantile_range \(1, 99\) takes quantiles between 0 and 1, not "
                 r"percentiles: 0.01 0.99", id="percentiles"),
    pytest.param(dict(quantile_range=(0, 1.5)), "takes quantiles between 0 and 1", id="quantile-above-1"),
    pytest.param(dict(quantile_range=(0.99, 0.01)), r"\(0.99, 0.01\) needs a lower bound below its upper",
                 id="quantiles-swapped"),
    pytest.param(dict(ct_window=(1000, -1000), fixed_modality="ct"), r"ct_window \(1000, -1000\) needs a lower bound",
                 id="window-swapped"),
    pytest.param(dict(ct_window=(0, float("nan"))), "both finite", id="window-nan"),
    pytest.param(dict(ct_window=(-1000,)), r"ct_window takes two numbers \(lower, upper\), not \(-1000,\)",
                 id="window-one-number"),
    pytest.param(dict(ct_window=(0, "1000"), fixed_modality="ct"), r"ct_window takes two numbers \(lower, upper\), "
                 r"not \(0, '1000'\)", id="window-string"),
    pytest.param(dict(quantile_range=0.99), r"quantile_range takes two numbers \(lower, upper\), not 0.99",
                 id="quantile-one-number"),
    pytest.param(dict(io_iterations=1, io_lr=0), "io_lr must be a positive finite number, got 0", id="io-lr-zero"),
    pytest.param(dict(io_iterations=1, io_lr=float("inf")), "io_lr must be a positive finite number, got inf",
                 id="io-lr-infinite"),
    pytest.param(dict(io_iterations=1, io_precision="bf16"), r"instance optimization precision 'bf16': choose one "
                 r"of fp32, tf32, tf32x3 \(bf16 is for the forward without IO\)", id="io-precision-bf16"),
    *(pytest.param(dict(io_iterations=steps), rf"io_iterations must be a whole number of steps >= 0 \(None or 0: no "
                   rf"instance optimization\), got {re.escape(repr(steps))}", id=f"io-iterations-{steps!r}")
      for steps in (2.5, True, "2", float("nan"), -1)),
    *(pytest.param(dict(io_iterations=1, seed=seed), rf"seed must be a whole number \(a 64-bit integer\) or None, "
                   rf"got {re.escape(repr(seed))}", id=f"seed-{seed!r}") for seed in ("1", 1.5, True, 2**70)),
])
def test_impossible_options_fail_before_any_work(engine, monkeypatch, options, message):
    """Before: a quantile above 1 was clamped to the image's maximum (as the reference does), so
    percentiles given for quantiles failed as an empty intensity range after the images were
    read, or not at all; io_lr was checked after preprocessing; io_iterations 2.5 ran 2 steps, True
    one, "2" two."""
    monkeypatch.setattr(itk_io, "load_image", lambda *a, **k: pytest.fail("an image was loaded before the check"))
    with pytest.raises(InvalidOptionError, match=message):
        register(engine, **options)
    with pytest.raises(InvalidOptionError, match=message):
        engine.register_many([(volume(1), volume(2))], **{"io_iterations": None, **options})


def test_an_mri_whose_quantiles_meet_says_why(engine):
    """A small object in an empty volume: its 99th percentile is its minimum. The error said to
    "choose a wider ct_window/quantile_range or check the modality", for an MRI with neither."""
    sparse = np.zeros(IMAGE_SHAPE, np.float32)
    sparse[8:10, 8:10, 8:10] = 100.0  # 8 of 10560 voxels
    with pytest.raises(InvalidImageError, match=r"fixed image: its 0 and 0.99 quantiles, which the MRI normalization "
                                                r"clips to, are both 0: at least 99 % of its voxels hold that value"):
        register(engine, fixed=sparse)
    with pytest.raises(InvalidImageError, match=r"its 0.5 and 0.9 quantiles.*both 0: at least 40 %.*widen quantile_range"):
        register(engine, fixed=sparse, quantile_range=(0.5, 0.9))
    register(engine, fixed=sparse, quantile_range=(0, 1))


def test_a_numpy_integer_seeds_io_as_a_python_one_does(engine):
    """torch's manual_seed takes Python ints only: a seed drawn by NumPy (rng.integers) raised a
    bare TypeError once the images had been read and preprocessed."""
    seeded = register(engine, io_iterations=1, seed=np.int64(7)).io_losses
    assert seeded == register(engine, io_iterations=1, seed=7).io_losses


def test_the_command_warns_of_an_intensity_range_its_modalities_do_not_use(tmp_path, caplog):
    fixed, moving = (write_image(tmp_path / f"{name}.nii.gz", volume(seed)) for seed, name in ((1, "f"), (2, "m")))
    command = ["register", "--fixed", str(fixed), "--moving", str(moving), "--model", "compact", "--io_iterations",
               "None", "--transform_out", str(tmp_path / "t.h5")]
    for modalities, option, unused in ((("mri", "mri"), ["--ct_window", "-200", "300"], True),
                                       (("ct", "mri"), ["--ct_window", "-200", "300"], False),
                                       (("ct", "ct"), ["--quantile_range", "0.01", "0.99"], True),
                                       (("ct", "mri"), ["--quantile_range", "0.01", "0.99"], False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="mgr_engine"):
            assert cli.main([*command, "--fixed_modality", modalities[0], "--moving_modality", modalities[1],
                             *option]) == 0
        assert (f"{option[0]} is not used" in caplog.text) == unused, (modalities, option)


def test_unknown_model():
    with pytest.raises(InvalidOptionError, match=r"unknown model 'foo'.*choose one of"):
        mgr_engine.register(volume(1), volume(2), model="foo", io_iterations=None)
    with pytest.raises(InvalidOptionError, match=r"unknown model 'foo'.*choose one of"):
        Engine(model="foo")


@pytest.mark.parametrize("device, gpus, cuda_build, message", [
    ("gpu", 0, None, r"unknown device 'gpu': use 'cpu', 'cuda' or 'cuda:N'"),
    ("cuda", 0, None, r"device 'cuda' is not available: this torch \(.*\) is built without CUDA; use device 'cpu'"),
    ("cuda", 0, "12.8", r"device 'cuda' is not available: torch sees no GPU \(check the driver"),
    ("cuda:2", 2, "12.8", r"device 'cuda:2' does not exist: torch sees 2 GPUs \(cuda:0 to cuda:1\)"),
    ("cuda:1", 1, "12.8", r"device 'cuda:1' does not exist: torch sees 1 GPU \(cuda:0\)"),
    ("meta", 0, None, r"device 'meta' is not one this machine can register on: use 'cpu', 'cuda' or 'cuda:N'"),
    ("xpu", 0, None, r"device 'xpu' is not one this machine can register on"),
])
def test_a_device_this_machine_lacks(narrow_net, monkeypatch, device, gpus, cuda_build, message):
    """torch's AssertionError "Torch not compiled with CUDA enabled" (or a RuntimeError listing
    every device type torch knows) came from the first registration, after the weights loaded."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)  # an Intel GPU's machine would have one
    with pytest.raises(InvalidOptionError, match=message):
        Engine(weights=official_state_dict(narrow_net), config=narrow_net.config, device=device)
    with pytest.raises(InvalidOptionError, match=message):
        mgr_engine.register(volume(1), volume(2), model="compact", device=device, io_iterations=None)


@pytest.mark.parametrize("up_channels", [(4, 8, 8, 16, 16), (4, 8, 8), (4,)])
def test_network_input_shape_too_small(up_channels):
    down_channels = (2, *up_channels)
    smallest = 2 ** (len(up_channels) + 1) + 1  # 65 for the official five levels
    with pytest.raises(InvalidOptionError, match=rf"too small for U-Nets {len(up_channels)} levels deep: "
                                                 rf"each axis needs at least {smallest} voxels"):
        NetworkConfig(input_shape=(smallest + 3, smallest - 1, smallest), down_channels=down_channels,
                      up_channels=up_channels)
    # the bound is tight: the smallest size runs
    config = NetworkConfig(input_shape=(smallest, smallest + 1, smallest), down_channels=down_channels,
                           up_channels=up_channels)
    net = GradICONNetwork(config).eval()
    with torch.no_grad():
        assert net(volume_tensor(config), volume_tensor(config)).shape == (1, 3, *config.input_shape)


@pytest.mark.parametrize("shape", [(64, 64), (64, 0, 64), (64.5, 80, 80)])
def test_network_input_shape_not_three_sizes(shape):
    with pytest.raises(InvalidOptionError, match=r"give three positive integers"):
        NetworkConfig(input_shape=shape)


@pytest.mark.parametrize("channels, message", [
    (dict(down_channels=(1, 4, 8, 8), up_channels=(4, 8, 8)), r"starts with 2 \(the moving and fixed images\)"),
    (dict(down_channels=(2, 4, 8), up_channels=(4, 8, 8)), r"one entry more than up_channels \(3 and 3 given\)"),
    (dict(down_channels=(2, 4, -8, 8), up_channels=(4, 8, 8)), "give positive integers"),
    (dict(down_channels=(2, 4.0, 8, 8), up_channels=(4, 8, 8)), "give positive integers"),
    (dict(down_channels=(2,), up_channels=()), "at least one level"),
    (dict(down_channels=2, up_channels=(4, 8, 8)), "network down_channels 2: give a sequence of integers"),
])
def test_network_channels_that_build_no_network(channels, message):
    """Refused where the configuration is made: a first entry of 1 built a network whose first
    forward failed, a negative count was torch's "negative dimension"."""
    with pytest.raises(InvalidOptionError, match=message):
        NetworkConfig(input_shape=(40, 40, 40), **channels)


def test_a_network_configuration_of_lists_is_the_one_of_tuples():
    """A configuration read from JSON (lists) is hashable and equal to the model's own."""
    from mgr_engine.engine import COMPACT_CONFIG

    config = NetworkConfig(*(list(value) for value in (COMPACT_CONFIG.input_shape, COMPACT_CONFIG.down_channels,
                                                       COMPACT_CONFIG.up_channels)))
    assert config == COMPACT_CONFIG and hash(config) == hash(COMPACT_CONFIG)


def volume_tensor(config):
    return torch.rand(1, 1, *config.input_shape)


def test_unknown_masking(engine):
    with pytest.raises(InvalidOptionError, match=r"unknown masking 'inside'.*choose one of input, loss, both"):
        register(engine, masking="inside")


@pytest.mark.parametrize(
    "mask",
    [
        pytest.param(lambda: np.ones((20, 24, 21), np.float32), id="other-size"),
        pytest.param(lambda: itk_image(np.ones(IMAGE_SHAPE), spacing=[2.0, 1.0, 1.0]), id="other-spacing"),
    ],
)
@pytest.mark.parametrize("side", ["fixed", "moving"])
def test_mask_on_another_grid(engine, mask, side):
    with pytest.raises(MaskMismatchError, match=rf"{side} mask does not lie on its image's grid.*resample the {side} mask"):
        register(engine, masking="input", **{f"{side}_mask": mask()})


def mask_with(value, at=(slice(5, 15), slice(6, 18), slice(4, 16))):
    """A binary mask on IMAGE_SHAPE, ``value`` inside a box (None: nothing inside)."""
    mask = np.zeros(IMAGE_SHAPE, np.float32)
    if value is not None:
        mask[at] = value
    return mask


@pytest.mark.parametrize(
    "mask, message",
    [
        pytest.param(lambda: np.where(mask_with(1.0) > 0, 0.8, 0.1).astype(np.float32),
                     r"fixed mask has fractional values \(from 0.1 to 0.8\): a probability map\? Threshold it",
                     id="probabilities"),
        pytest.param(lambda: mask_with(None), r"fixed mask is empty \(no voxel above 0\)", id="empty"),
        pytest.param(lambda: mask_with(-1.0), r"fixed mask has negative values \(down to -1", id="negative"),
        pytest.param(lambda: itk.image_from_array(mask_with(-1.0).astype(np.int16)),
                     r"fixed mask has negative values \(down to -1", id="negative-int16-image"),
        pytest.param(lambda: itk.image_from_array(mask_with(None).astype(np.uint8)), r"fixed mask is empty",
                     id="empty-uint8-image"),
        pytest.param(lambda: mask_with(np.nan), r"fixed mask has NaN or infinite voxels", id="nan"),
    ],
)
@pytest.mark.parametrize("masking, io_iterations", [("input", None), ("loss", 1)])
def test_a_mask_that_is_not_a_binary_mask(engine, mask, message, masking, io_iterations):
    """Input masking keeps positive voxels, loss masking nonzero ones (the reference's rules):
    the two agree only on masks of whole numbers, none negative, and an empty mask or a
    probability map is a wrong file either way."""
    with pytest.raises(InvalidImageError, match=message):
        register(engine, masking=masking, io_iterations=io_iterations, fixed_mask=mask())


def test_a_loss_mask_the_network_grid_misses(engine):
    """A thin mask of a long image (200 slices onto 72) fell between the nearest-neighbour samples
    of the network grid: IO optimized the regularizer alone, the similarity's mask empty."""
    fixed = smooth_volume((200, 24, 22), 1) * 500 + 10
    mask = np.zeros(fixed.shape, np.uint8)
    mask[1, 6:18, 4:16] = 1  # slice 1 of 200 lies between the samples 0 and 2.8
    with pytest.raises(InvalidImageError, match=r"fixed mask's 144 voxels fall between the samples of the network's "
                                                r"72x72x72 grid, so IO's similarity would see none of the image"):
        register(engine, fixed=fixed, masking="loss", io_iterations=1, fixed_mask=mask)
    mask[2] = mask[1]  # slice 2 is sampled
    register(engine, fixed=fixed, masking="loss", io_iterations=1, fixed_mask=mask)


def test_masks_of_labels_and_of_any_integer_type_are_taken(engine):
    labels = mask_with(1.0)
    labels[10:, :, :] *= 3  # two labels inside
    for mask in (labels, labels.astype(np.uint8), labels > 0, itk_image(labels * 85),
                 itk.image_from_array(labels.astype(np.uint8))):
        register(engine, masking="input", fixed_mask=mask)


def test_a_mask_array_lies_on_its_images_grid(engine):
    """An array carries no grid: a mask array of an image with a spacing or origin of its own was
    refused as lying elsewhere (1 mm apart from the origin); it takes its image's grid now, and
    one of another shape is told to come with its grid."""
    fixed = itk_image(volume(1), spacing=[1.5, 0.8, 1.2])
    fixed.SetOrigin([4.0, -2.0, 7.5])
    mask_image = itk_image(mask_with(1.0), spacing=[1.5, 0.8, 1.2])
    mask_image.SetOrigin([4.0, -2.0, 7.5])
    expected = register(engine, fixed=fixed, masking="input", fixed_mask=mask_image).phi_ab
    assert torch.equal(register(engine, fixed=fixed, masking="input", fixed_mask=mask_with(1.0)).phi_ab, expected)
    with pytest.raises(InvalidImageError, match=r"fixed mask array has shape \(20, 24, 21\), not its image's "
                                                r"\(20, 24, 22\) \(z, y, x\), and an array carries no spacing"):
        register(engine, fixed=fixed, masking="input", fixed_mask=mask_with(1.0)[..., 1:])


def test_a_mask_mismatch_names_what_differs_in_plain_numbers(engine):
    """Same size and spacing, another origin: the message says so (it listed size and spacing
    only, equal on both sides, and in NumPy 2's ``np.float64(...)`` form)."""
    mask = itk_image(np.ones(IMAGE_SHAPE))
    mask.SetOrigin([0.0, 5.0, -2.5])
    with pytest.raises(MaskMismatchError) as raised:
        register(engine, masking="input", fixed_mask=mask)
    message = str(raised.value)
    assert "origin (0, 5, -2.5) against (0, 0, 0)" in message
    assert "size" not in message and "spacing" not in message and "np.float64" not in message


# ------------------------------------------------------------------ weights and checkpoints


def test_checkpoint_of_another_architecture(narrow_net, official_state):
    with pytest.raises(CheckpointError, match=r"does not match the network architecture.*wrong shape.*NetworkConfig"):
        Engine(weights=official_state, config=narrow_net.config, device="cpu")


def test_checkpoint_with_nan_weights(narrow_net):
    """A damaged checkpoint, or one saved from a diverged training run, mapped every pair to NaN."""
    state = official_state_dict(narrow_net)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].clone()
    state[key].view(-1)[3] = float("nan")
    with pytest.raises(CheckpointError, match=rf"NaN or infinite weights in 1 tensors, first: {re.escape(key)}; "
                                              "the file is damaged"):
        Engine(weights=state, config=narrow_net.config, device="cpu")


def test_diverging_instance_optimization_is_an_error_not_a_nan_transform(engine, tmp_path, official_checkpoint,
                                                                         capsys, monkeypatch):
    """An io_lr of 1e3 (for 1e-3, say) made NaN weights after the first step: the transform, field
    and warped image came out NaN, and the command wrote them without a word. On the CPU it stops
    at the first NaN loss: it went on through every step (minutes each at full size) first."""
    before = register(engine).phi_ab
    adam_steps = []
    adam_step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: (adam_steps.append(1), adam_step(self, *a, **k))[1])
    with pytest.raises(InstanceOptimizationError, match=r"instance optimization diverged: its loss was nan after "
                                                        r"step 1 of 20 \(io_lr 1000.0\); lower io_lr"):
        register(engine, io_iterations=20, io_lr=1e3)
    assert len(adam_steps) == 1
    assert torch.equal(register(engine).phi_ab, before)  # the checkpoint's weights are back
    out = mkdir(tmp_path / "out")
    args = ["-q", "register", "--fixed", str(write_image(tmp_path / "f.nii.gz", volume(1))),
            "--moving", str(write_image(tmp_path / "m.nii.gz", volume(2))), "--network_weights",
            str(official_checkpoint), "--network_input_shape", *map(str, SHAPE), "--io_iterations", "2",
            "--io_lr", "1000", "--fixed_modality", "mri", "--moving_modality", "mri", "--transform_out",
            str(out / "t.h5"), "--warped_moving_out", str(out / "w.nii.gz")]
    assert cli.main(args) == 2
    assert "error: instance optimization diverged" in capsys.readouterr().err
    assert files_in(out) == []


@pytest.mark.parametrize(
    "save, message",
    [
        pytest.param(lambda path: write_bytes(path, GARBAGE), r"cannot read checkpoint.*expected a torch state dict",
                     id="garbage-bytes"),
        pytest.param(lambda path: torch.save([torch.zeros(3)], path),
                     r"holds a list, not a state dict; pass the regis_net state dict", id="list"),
    ],
)
def test_unusable_checkpoint_file(narrow_net, tmp_path, save, message):
    path = tmp_path / "Step_2_final.trch"
    save(path)
    with pytest.raises(CheckpointError, match=message):
        Engine(weights=path, config=narrow_net.config, device="cpu")


def test_a_path_that_starts_with_a_tilde_is_told_it_is_not_expanded(engine, narrow_net):
    """Python, ITK and mgr_engine do not expand '~' (a shell does): "~/t1.nii.gz" was said not to
    exist, and "~/out/t.h5" to want its folder '~/out' created, a folder named '~'."""
    hint = re.escape("('~' is not expanded: pass os.path.expanduser(path))")
    with pytest.raises(ImageReadError, match=r"fixed image '~/t1.nii.gz' does not exist " + hint):
        register(engine, fixed="~/t1.nii.gz")
    with pytest.raises(WeightsNotFoundError, match=r"weights file '~/w.trch' does not exist " + hint):
        Engine(weights="~/w.trch", config=narrow_net.config, device="cpu")
    with pytest.raises(OutputWriteError, match=r"output directory '~/out' does not exist " + hint):
        mgr_engine.write_image(itk_image(volume()), "~/out/image.nii.gz")
    with pytest.raises(ImageReadError, match=r"transform '~/t.h5' does not exist " + hint):
        mgr_engine.transform_points("~/t.h5", [[0.0, 0.0, 0.0]])
    with pytest.raises(ImageReadError, match=r"points file '~/p.csv' does not exist " + hint):
        mgr_engine.read_points("~/p.csv")
    with pytest.raises(ImageReadError, match=r"fixed image '/nowhere/t1.nii.gz' does not exist; check the path"):
        register(engine, fixed="/nowhere/t1.nii.gz")


def test_missing_weights_path(narrow_net, tmp_path):
    path = tmp_path / "nowhere" / "Step_2_final.trch"
    with pytest.raises(WeightsNotFoundError, match=r"does not exist; check the path") as info:
        Engine(weights=path, config=narrow_net.config, device="cpu")
    assert str(path) in str(info.value)


def test_a_weights_folder_is_told_to_give_the_file_inside(narrow_net, tmp_path):
    """A folder for the checkpoint was told it 'does not exist'; the file it holds (the
    ``<model>1.0/Step_2_final.trch`` layout of the search path, a .safetensors) is named."""
    with pytest.raises(WeightsNotFoundError, match=r"'.*empty' is a directory; give the checkpoint file "
                                                   r"\(Step_2_final.trch or a .safetensors file\), not its folder"):
        Engine(weights=mkdir(tmp_path / "empty"), config=narrow_net.config, device="cpu")
    checkpoint = mkdir(mkdir(tmp_path / "weights") / "multigradicon1.0") / "Step_2_final.trch"
    checkpoint.write_bytes(b"")
    with pytest.raises(WeightsNotFoundError, match=f"give the checkpoint file: {re.escape(repr(str(checkpoint)))}"):
        Engine(weights=tmp_path / "weights", config=narrow_net.config, device="cpu")


def test_no_weights_anywhere(tmp_path, monkeypatch):
    weights_dir, cache_dir = tmp_path / "weights", tmp_path / "cache"
    weights_dir.mkdir()
    cache_dir.mkdir()
    monkeypatch.setenv("MGR_ENGINE_WEIGHTS_DIR", str(weights_dir))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_dir))
    with pytest.raises(WeightsNotFoundError) as info:
        Engine(device="cpu")
    message = str(info.value)
    for searched in (weights_dir / "multigradicon1.0", cache_dir / "mgr_engine" / "multigradicon1.0"):
        assert str(searched / "Step_2_final.trch") in message
    assert "MGR_ENGINE_WEIGHTS_DIR" in message and "weights=PATH" in message


# ------------------------------------------------------------------ CLI: no partial output


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory, official_state):
    path = tmp_path_factory.mktemp("checkpoint") / "Step_2_final.trch"
    torch.save(official_state, path)
    return path


@pytest.fixture
def cli_files(tmp_path, official_checkpoint):
    """Inputs, a checkpoint of the official widths at 72^3, and an empty output directory.

    The checkpoint (270 MB) is a hard link to one file per module: a copy per test had the
    suite write 4 GB of them, and CI's disk ran out."""
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    write_image(inputs / "fixed.nii.gz", volume(1))
    write_image(inputs / "moving.nii.gz", volume(2))
    try:
        os.link(official_checkpoint, inputs / "Step_2_final.trch")
    except OSError:  # a file system without hard links
        shutil.copyfile(official_checkpoint, inputs / "Step_2_final.trch")
    return inputs, out


def register_args(inputs, out, moving=None):
    return [
        "-q", "register",
        "--fixed", str(inputs / "fixed.nii.gz"), "--moving", str(moving or inputs / "moving.nii.gz"),
        "--fixed_modality", "mri", "--moving_modality", "mri",
        "--transform_out", str(out / "transform.h5"),
        "--io_iterations", "None",
        "--network_input_shape", *map(str, SHAPE),
        "--network_weights", str(inputs / "Step_2_final.trch"),
        "--device", "cpu",
    ]


def test_cli_unreadable_moving_image(cli_files, capsys):
    inputs, out = cli_files
    moving = write_bytes(inputs / "broken.nii.gz", GARBAGE)
    assert cli.main(register_args(inputs, out, moving=moving)) == 2
    stderr = capsys.readouterr().err
    assert re.search(r"^mgr-engine register: error: ITK cannot read the moving image", stderr, re.MULTILINE)
    assert files_in(out) == []  # no transform, no temporary file


def test_cli_network_input_shape_too_small(cli_files, capsys):
    inputs, out = cli_files
    args = register_args(inputs, out)
    shape_at = args.index("--network_input_shape") + 1
    args[shape_at:shape_at + 3] = ["64", "64", "64"]
    assert cli.main(args) == 2
    assert "each axis needs at least 65 voxels" in capsys.readouterr().err
    assert files_in(out) == []


def test_cli_interrupted_write_leaves_nothing(cli_files, capsys, monkeypatch):
    inputs, out = cli_files
    written = []

    def interrupted_write(transform, path):
        with open(path, "wb") as f:
            f.write(b"\x89HDF half a transform")
        written.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(itk_io, "_write_transform_file", interrupted_write)
    assert cli.main(register_args(inputs, out)) == 130
    # the write did start, in a folder beside the target
    assert len(written) == 1 and os.path.dirname(os.path.dirname(written[0])) == str(out)
    assert "interrupted" in capsys.readouterr().err
    assert files_in(out) == []  # neither transform.h5 nor its .partial temporary


@pytest.mark.parametrize("outputs, message", [
    (["--transform_out", "{out}/t.xyz"], r"--transform_out: ITK has no transform writer for 't.xyz'; name the output .h5"),
    (["--transform_out", "{out}/t.nii.gz"], r"--transform_out: 't.nii.gz' names an image, not a transform file: name "
     r"the transform .h5 or .tfm/.txt; the dense displacement field as an image .* is --displacement_field_out"),
    (["--transform_out", "{out}/t.H5"],
     r"--transform_out: ITK writes transforms only with a lowercase extension; name the output 't.h5'"),
    (["--transform_out", "{out}/t.mat"],
     r"--transform_out: ITK's Matlab transform files cannot hold a registration's transform .*Name the output \.h5"),
    (["--transform_out", "{out}/missing/t.h5"], r"--transform_out: output directory .*missing' does not exist"),
    (["--warped_moving_out", "{out}"], r"--warped_moving_out: output .* is a directory; give a file name"),
    (["--warped_moving_out", "{out}/w.foo"], r"--warped_moving_out: ITK has no image writer for 'w.foo'"),
    (["--displacement_field_out", "{out}/d.tfm"], r"--displacement_field_out: ITK has no image writer for 'd.tfm'"),
    (["--warped_moving_out", "{out}/w.NII.GZ"],
     r"--warped_moving_out: ITK writes NIfTI only with a lowercase extension; name the output 'w.nii.gz'"),
    (["--warped_moving_out", "{out}/w.nii.gz", "--jacobian_out", "{out}/./w.nii.gz"],
     r"--warped_moving_out and --jacobian_out name the same file"),
    (["--warped_moving_out", "{out}/w.mgz", "--displacement_field_out", "{out}/d.mgz"],
     r"--displacement_field_out: an MGH file holds scalar volumes, not a displacement field; name the output "
     r"'d.nii.gz'"),
], ids=["extension", "image-for-transform", "uppercase-transform", "matlab-transform", "missing-directory", "directory", "image-extension",
        "transform-for-image", "uppercase-nifti", "same-file", "mgz-field"])
def test_cli_refuses_unwritable_outputs_before_registering(cli_files, capsys, monkeypatch, outputs, message):
    inputs, out = cli_files
    monkeypatch.setattr(mgr_engine.engine, "Engine", lambda *a, **k: pytest.fail("the engine was built"))
    assert cli.main(register_args(inputs, out) + [arg.format(out=out) for arg in outputs]) == 2
    assert re.search(r"^mgr-engine register: error: " + message, capsys.readouterr().err, re.MULTILINE)
    assert files_in(out) == []


def test_cli_warp_and_jacobian_refuse_unwritable_outputs_before_reading(cli_files, capsys, monkeypatch):
    inputs, out = cli_files
    monkeypatch.setattr(itk_io, "load_image", lambda *a, **k: pytest.fail("an image was read"))
    monkeypatch.setattr(itk_io, "read_transform", lambda *a, **k: pytest.fail("the transform was read"))
    fixed, moving = str(inputs / "fixed.nii.gz"), str(inputs / "moving.nii.gz")
    assert cli.main(["warp", "--fixed", fixed, "--moving", moving, "--warped_moving_out", str(out / "w.xyz"),
                     "--linear"]) == 2
    assert "--warped_moving_out: ITK has no image writer for 'w.xyz'" in capsys.readouterr().err
    assert cli.main(["jacobian", "--fixed", fixed, "--transform", str(inputs / "t.h5"),
                     "--jacob", str(out / "j.nii.gz"), "--log_jacob", str(out / "missing" / "l.nii.gz")]) == 2
    assert re.search(r"--log_jacob: output directory .*missing' does not exist", capsys.readouterr().err)
    assert files_in(out) == []


@pytest.mark.parametrize("given", ["missing", "directory"])
def test_a_transform_that_is_not_a_file_is_a_typed_error_without_itks_diagnostics(cli_files, capfd, given):
    """ITK's HDF5 library printed a page of diagnostics, then a message about IO objects."""
    inputs, out = cli_files
    transform = str(inputs / "nothing.h5") if given == "missing" else str(inputs)
    (out / "p.csv").write_text("1,2,3\n")
    fixed = str(inputs / "fixed.nii.gz")
    commands = [["warp", "--fixed", fixed, "--moving", fixed, "--transform", transform, "--linear",
                 "--warped_moving_out", str(out / "w.nii.gz")],
                ["jacobian", "--fixed", fixed, "--transform", transform, "--jacob", str(out / "j.nii.gz")],
                ["transform-points", "--transform", transform, "--points", str(out / "p.csv"),
                 "--points_out", str(out / "moved.csv")]]
    for command in commands:
        assert cli.main(command) == 2
        err = capfd.readouterr().err
        assert f"mgr-engine {command[0]}: error: transform {transform!r} " in err, err
        assert ("does not exist" if given == "missing" else "is a directory") in err
        assert "HDF5-DIAG" not in err
    assert sorted(f.name for f in out.iterdir()) == ["p.csv"]


def test_an_image_itk_cannot_write_is_an_output_write_error(tmp_path):
    """Past the extension check (ITK has a PNG writer), ITK's own refusal comes as a typed error
    with its reason, and nothing is left behind."""
    with pytest.raises(OutputWriteError, match=r"cannot write '.*image.png': .*PNG supports unsigned char"):
        itk_io.write_image(itk_image(volume()), tmp_path / "image.png")
    # a pixel type ITK's Python wrapping holds but its writers do not: its TemplateTypeError came as it was
    with pytest.raises(OutputWriteError, match=r"cannot write '.*labels.nii.gz': ITK's file writers take no image of "
                                               r"this pixel type \(TemplateTypeError: .*UL,3.*cast it"):
        itk_io.write_image(itk.image_from_array(np.ones(IMAGE_SHAPE, np.uint64)), tmp_path / "labels.nii.gz")
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("value, advice", [
    pytest.param(lambda path: str(path), r"not a str: an image file is read first", id="path"),
    pytest.param(lambda path: volume(), r"not a ndarray: an array carries no spacing, origin or direction", id="array"),
    pytest.param(lambda path: torch.from_numpy(volume()), r"not a Tensor: an array carries no spacing", id="tensor"),
    pytest.param(lambda path: None, r"not a NoneType: a result's outputs \(warp, displacement_field", id="none"),
])
def test_outputs_of_what_is_not_an_itk_image(tmp_path, value, advice):
    """write_image of a path wrote the path's own text into the .nii.gz (12 bytes, no error); an
    array or a tensor raised an AttributeError from ITK's writer, and to_simpleitk and
    to_nibabel "RuntimeError: No suitable template parameter can be found"."""
    source = write_image(tmp_path / "source.nii.gz", volume())
    with pytest.raises(InvalidImageError, match=r"write_image takes an itk.Image, " + advice):
        mgr_engine.write_image(value(source), tmp_path / "copy.nii.gz")
    assert files_in(tmp_path) == ["source.nii.gz"]
    for function in ("to_simpleitk", "to_nibabel"):
        with pytest.raises(InvalidImageError, match=rf"{function} takes an itk.Image, " + advice):
            getattr(mgr_engine, function)(value(source))


def test_cli_writes_its_outputs_all_or_none(cli_files, capsys):
    """ITK refuses the warped image only once it is written (a float image as PNG passes the
    extension check): the transform, computed and staged before it, is not left behind, and the
    files of an earlier run with the same names are kept as they were."""
    inputs, out = cli_files
    args = register_args(inputs, out) + ["--jacobian_out", str(out / "j.nii.gz")]
    (out / "transform.h5").write_bytes(b"an earlier run's")
    assert cli.main(args + ["--warped_moving_out", str(out / "w.png")]) == 2
    assert re.search(r"error: cannot write '.*w.png': .*PNG supports unsigned char", capsys.readouterr().err)
    assert files_in(out) == ["transform.h5"] and (out / "transform.h5").read_bytes() == b"an earlier run's"
    assert cli.main(args + ["--warped_moving_out", str(out / "w.nii.gz")]) == 0
    assert files_in(out) == ["j.nii.gz", "transform.h5", "w.nii.gz"]


def test_write_outputs_writes_each_kind_or_none(tmp_path):
    transform = itk_io.identity_transform()
    image = itk_image(volume())
    outputs = [(transform, tmp_path / "t.h5"), (image, tmp_path / "i.mhd"), ("a,b\n", tmp_path / "table.csv")]
    with pytest.raises(OutputWriteError, match=r"cannot write '.*bad.png'"):
        itk_io.write_outputs(outputs + [(image, tmp_path / "bad.png")])
    assert files_in(tmp_path) == []
    itk_io.write_outputs(outputs)
    assert files_in(tmp_path) == ["i.mhd", "i.raw", "t.h5", "table.csv"]  # .mhd with its voxel file
    assert (tmp_path / "table.csv").read_text() == "a,b\n"
    np.testing.assert_array_equal(itk.array_from_image(itk.imread(str(tmp_path / "i.mhd"))), volume())
    assert itk_io.read_transform(tmp_path / "t.h5").TransformPoint([1.0, 2.0, 3.0]) == (1.0, 2.0, 3.0)


# ------------------------------------------------------------------ atomic output


def test_staged_output_into_missing_directory(tmp_path):
    target = tmp_path / "missing" / "transform.h5"
    with pytest.raises(OutputWriteError, match=r"output directory .* does not exist; create it first"):
        with itk_io.staged_outputs() as stage:
            stage(target)
            pytest.fail("staged_outputs gave a path in a missing directory")
    assert not target.parent.exists()


def test_an_itk_error_names_the_output_not_its_staging_folder(tmp_path, monkeypatch):
    """ITK's messages name the file it was given: the staged one, in a hidden folder the user
    never asked for."""
    def failing(transform, path):
        raise RuntimeError(f"Could not create Transform IO object for writing file {path}")

    monkeypatch.setattr(itk_io, "_write_transform_file", failing)
    with pytest.raises(OutputWriteError) as raised:
        itk_io.write_transform(itk_io.identity_transform(), tmp_path / "t.h5")
    assert str(raised.value) == (f"cannot write {str(tmp_path / 't.h5')!r}: Could not create Transform IO object for "
                                 f"writing file {tmp_path / 't.h5'}")
    assert files_in(tmp_path) == []


def test_saving_a_result_under_a_name_no_writer_takes(engine, tmp_path):
    with pytest.raises(OutputWriteError, match=r"^ITK has no transform writer for 't.xyz'; name the output .h5"):
        register(engine).save(tmp_path / "t.xyz")
    assert files_in(tmp_path) == []


def test_flags_given_as_strings_are_refused(engine, tmp_path):
    """ "no" is truthy: ``inverse="no"`` moved points the other way, ``match_orientation="no"``
    reordered the moving image, each without a word."""
    with pytest.raises(InvalidOptionError, match="match_orientation must be True or False, got 'no'"):
        engine.register(tmp_path / "not read.nii.gz", volume(2), io_iterations=None, match_orientation="no")
    result = register(engine)
    points = np.array([[5.0, 6.0, 7.0]])
    with pytest.raises(InvalidOptionError, match="inverse must be True or False, got 'no'"):
        result.transform_points(points, inverse="no")
    with pytest.raises(InvalidOptionError, match="physical must be True or False, got 'yes'"):
        result.jacobian_determinant(physical="yes")
    # NumPy's booleans are booleans
    np.testing.assert_array_equal(result.transform_points(points, inverse=np.False_), result.transform_points(points))


def ct_like(seed=0):
    """A CT-like volume in Hounsfield units: a body of soft tissue (about 40 HU, some fat at -100)
    in air (-1000), z, y, x."""
    volume = np.full((24, 28, 26), -1000.0, np.float32)
    volume[4:20, 5:23, 5:21] = 40.0 + 60.0 * smooth_volume((16, 18, 16), seed=seed) - 100.0 * (
        smooth_volume((16, 18, 16), seed=seed + 1) > 0.6)
    return volume


@pytest.mark.parametrize("fixed, fixed_modality, warned", [
    pytest.param(ct_like(), "mri", "% of its voxels lie at or below -500", id="ct-as-mri"),
    pytest.param(smooth_volume((24, 28, 26), seed=2) * 900, "ct", "no voxel lies below 0", id="mri-as-ct"),
    pytest.param(ct_like(), "ct", None, id="ct"),
    pytest.param(smooth_volume((24, 28, 26), seed=2) * 900, "mri", None, id="mri"),
    pytest.param(ct_like()[4:20, 5:23, 5:21], "mri", None, id="ct-inside-the-body-as-mri"),  # no air: nothing to tell
])
def test_an_image_that_looks_like_another_modality_is_warned_about_once(fixed, fixed_modality, warned, caplog):
    import logging

    engine = Engine(model="compact", device="cpu")
    moving = smooth_volume((24, 28, 26), seed=3) * 900
    with caplog.at_level(logging.WARNING, logger="mgr_engine"):
        for _ in range(2):
            engine.register(fixed, moving, fixed_modality=fixed_modality, io_iterations=None)
    messages = [record.getMessage() for record in caplog.records]
    if warned is None:
        assert messages == []
    else:
        assert len(messages) == 1 and messages[0].startswith("the fixed image looks like another modality") and \
            warned in messages[0]


def test_a_ct_window_of_the_images_own_units_is_not_warned_about(caplog):
    import logging

    stored_without_intercept = ct_like() + 1024.0  # 0 to 4095, air at 24
    with caplog.at_level(logging.WARNING, logger="mgr_engine"):
        Engine(model="compact", device="cpu").register(stored_without_intercept, smooth_volume((24, 28, 26), seed=3),
                                                       fixed_modality="ct", ct_window=(24.0, 2024.0),
                                                       io_iterations=None)
    assert not caplog.records
