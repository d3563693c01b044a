"""Synthetic multimodal "patients" for training and evaluating the compact model, with nothing downloaded.

Two kinds of anatomy, both on a cubic grid of the network's input shape:

* **brain**: the MNI ICBM152 2009a symmetric template that ``nilearn`` ships inside its
  wheel (``nilearn/datasets/data/``: the skull-stripped T1 and the grey- and white-matter
  probability maps). The wheel has no CSF map, so CSF is what remains inside the brain
  mask (T1 > 0) after GM and WM: ``clip(mask - GM - WM, 0, 1)``. Each patient is the
  template pulled back through its own random smooth diffeomorphism (a stationary velocity
  field integrated by scaling and squaring) and a small random affine, so two patients form
  an inter-patient pair whose true correspondence is known only through the shared template.
  Labels: 0 background, 1 CSF, 2 GM, 3 WM (:data:`BRAIN_LABELS`).
* **shapes**: label maps in the spirit of SynthMorph (Hoffmann et al.): the argmax of a few
  smooth random fields, one per label, deformed per patient. A *family* seed fixes the base
  label map; patients of one family are deformations of it and pair with each other.

Every patient has several aligned contrasts, all rendered from the same tissue (or label)
partial-volume maps, so one label map is valid for all of them: ``t1`` (the template's own T1
intensities under a random gamma), ``t2``, ``flair`` and ``pd`` (tissue-to-intensity tables
with per-patient jitter) and ``rand0``/``rand1`` (a random intensity per tissue, drawn per
patient); shapes patients have ``rand0``..``rand2``. Each rendered image gets a random
Gaussian blur, a smooth multiplicative bias field and Rician noise, then the paper's MRI
normalization (clip to [minimum, 99th percentile], scale to [0, 1]). On request
(``ct=True``) brain patients also have ``ct`` (Hounsfield units per tissue plus a bone shell,
the paper's CT window) and ``ct_inverted`` (1 - CT), the paper's inversion augmentation.

Everything is deterministic by seed: random numbers are drawn on the CPU from seeded
generators and the arithmetic runs on ``device``. Seeds below :data:`HOLDOUT_START` are for
training; :func:`evaluation_pairs` uses seeds from :data:`HOLDOUT_START` on, which the
training sampler never draws.

``nilearn`` is a training extra (``pip install mgr_engine[train]``), imported only to find its
data folder when a brain patient is first made; ``$MGR_ENGINE_TEMPLATE_DIR`` can name a folder
holding copies of the three template files instead (a GPU machine without nilearn needs only
those 5 MB). The files are read by :func:`read_nifti`, so nibabel is not needed.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import MissingDependencyError
from .losses import gaussian_blur
from .ops import compose_maps, identity_map, warp
from .preprocess import quantile

log = logging.getLogger("mgr_engine.synth")

HOLDOUT_START = 10**12  # training seeds lie in [0, HOLDOUT_START); evaluation seeds from here on
BRAIN_LABELS = {0: "background", 1: "CSF", 2: "GM", 3: "WM"}
BRAIN_CONTRASTS = ("t1", "t2", "flair", "pd", "rand0", "rand1")
SHAPES_CONTRASTS = ("rand0", "rand1", "rand2")
# Opt-in CT-like contrasts of brain patients (``brain_patient(ct=True)``): the CT and its
# inversion 1 - CT, which the paper adds to training because it resembles T1w MRI.
CT_CONTRASTS = ("ct", "ct_inverted")
TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
# Mean intensity of background, CSF, GM, WM before jitter (T1 uses the template's own image).
CONTRAST_TABLES = {
    "t2": (0.0, 1.0, 0.55, 0.35),
    "flair": (0.0, 0.12, 0.72, 0.50),
    "pd": (0.0, 0.85, 0.75, 0.60),
}
TABLE_JITTER = 0.07
# CT: mean Hounsfield units of background (air), CSF, GM, WM; a bone shell around the brain
# (the template has no skull) drawn in BONE_HU; the paper's window, mapped to [0, 1].
CT_HU = (-1000.0, 8.0, 40.0, 28.0)
CT_HU_JITTER = 5.0
BONE_HU = (700.0, 1300.0)
CT_WINDOW = (-1000.0, 1000.0)


def derived_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (a NumPy SeedSequence hash of them)."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def _uniform(gen, low, high, size=()):
    return low + (high - low) * torch.rand(size, generator=gen, dtype=torch.float64)


def smooth_noise(shape, gen, coarse: int, channels: int = 1, device=None) -> torch.Tensor:
    """(1, channels, *shape) smooth random field: unit Gaussian noise on a ``coarse``^3 grid,
    upsampled trilinearly."""
    grid = torch.randn((1, channels, coarse, coarse, coarse), generator=gen).to(device)
    return F.interpolate(grid, size=tuple(shape), mode="trilinear", align_corners=True)


def random_diffeomorphism(shape, gen, *, scale: float, coarse: int = 5, steps: int = 7, device=None,
                          integration_size: int = 32) -> torch.Tensor:
    """Displacement (1, 3, *shape) in [0, 1] coordinates of a random smooth diffeomorphism.

    A stationary velocity field (``scale`` times smooth unit noise on a ``coarse``^3 grid) is
    integrated by scaling and squaring (``steps`` squarings), so the map is invertible. The
    integration runs on a grid of at most ``integration_size`` per axis and the result is
    upsampled: the field varies over ``shape / coarse`` voxels, and at 64^3 the squarings at
    full size took half of a training step's CPU time."""
    small = tuple(min(int(n), integration_size) for n in shape)
    identity = identity_map(small, device=device)
    displacement = smooth_noise(small, gen, coarse, 3, device) * (scale / 2**steps)
    for _ in range(steps):
        displacement = compose_maps(displacement, identity + displacement) - identity
    if small != tuple(shape):
        displacement = F.interpolate(displacement, size=tuple(shape), mode="trilinear", align_corners=True)
    return displacement


def random_affine(gen, *, rotation_deg: float, scaling: float, translation: float) -> torch.Tensor:
    """A (3, 4) affine of [0, 1] coordinates about the centre: rotation up to ``rotation_deg``
    about each axis, per-axis scaling in 1 +- ``scaling``, translation up to ``translation``."""
    angles = torch.deg2rad(_uniform(gen, -rotation_deg, rotation_deg, (3,)))
    rotation = torch.eye(3, dtype=torch.float64)
    for axis in range(3):
        c, s = torch.cos(angles[axis]), torch.sin(angles[axis])
        i, j = [a for a in range(3) if a != axis]
        r = torch.eye(3, dtype=torch.float64)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rotation = r @ rotation
    matrix = rotation @ torch.diag(1 + _uniform(gen, -scaling, scaling, (3,)))
    centre = torch.full((3,), 0.5, dtype=torch.float64)
    offset = centre - matrix @ centre + _uniform(gen, -translation, translation, (3,))
    return torch.cat([matrix, offset[:, None]], 1).float()


def apply_affine(affine: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """``A x + b`` for a (3, 4) affine and coordinates (B, 3, ...)."""
    affine = affine.to(coords.device)
    flat = coords.flatten(2)
    return (affine[:, :3] @ flat + affine[:, 3:]).view_as(coords)


def normalize_mri(volume: torch.Tensor) -> torch.Tensor:
    """The paper's MRI normalization as the engine applies it at inference: clip to
    [minimum, 99th percentile] (:func:`mgr_engine.preprocess.quantile`), scale to [0, 1]."""
    low, high = float(volume.min()), quantile(volume, 0.99)
    if not high > low:
        high = low + 1.0
    return ((volume.clamp(low, high) - low) / (high - low)).float()


# ---------------------------------------------------------------- template

def template_dir() -> Path:
    """The folder of the template files: ``$MGR_ENGINE_TEMPLATE_DIR`` if set, else nilearn's
    bundled data folder; :class:`MissingDependencyError` when neither has them."""
    if os.environ.get("MGR_ENGINE_TEMPLATE_DIR"):
        folder, source = Path(os.environ["MGR_ENGINE_TEMPLATE_DIR"]), "$MGR_ENGINE_TEMPLATE_DIR"
    else:
        try:
            import nilearn
        except ImportError as exc:
            raise MissingDependencyError(
                "synthetic brain patients need the MNI template shipped with nilearn: pip install "
                "'mgr_engine[train]' (or pip install nilearn), or set MGR_ENGINE_TEMPLATE_DIR to a folder with "
                f"{', '.join(TEMPLATE_FILES.values())}") from exc
        folder = Path(nilearn.__file__).parent / "datasets" / "data"
        source = f"nilearn {getattr(nilearn, '__version__', '?')}"
    missing = [name for name in TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise MissingDependencyError(
            f"{source} at {folder} lacks {', '.join(missing)}; install a nilearn release that bundles the MNI "
            "ICBM152 2009 templates (0.10 or later)")
    return folder


_NIFTI_DTYPES = {2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32, 64: np.float64, 256: np.int8, 512: np.uint16}


def read_nifti(path) -> np.ndarray:
    """The voxel array of a NIfTI-1 file (``.nii`` or ``.nii.gz``), axes as stored (x, y, z),
    scaled by ``scl_slope``/``scl_inter`` when set: enough for the template files."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    endian = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    if struct.unpack(endian + "i", raw[:4])[0] != 348 or raw[344:347] not in (b"n+1", b"ni1"):
        raise ValueError(f"{path} is not a NIfTI-1 file")
    dims = struct.unpack(endian + "8h", raw[40:56])
    shape = tuple(int(n) for n in dims[1:1 + dims[0]])
    datatype = struct.unpack(endian + "h", raw[70:72])[0]
    if datatype not in _NIFTI_DTYPES:
        raise ValueError(f"{path}: NIfTI datatype {datatype} is not supported")
    offset = int(struct.unpack(endian + "f", raw[108:112])[0])
    slope, intercept = struct.unpack(endian + "2f", raw[112:120])
    dtype = np.dtype(_NIFTI_DTYPES[datatype]).newbyteorder(endian)
    data = np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape, order="F")
    if slope not in (0.0, 1.0) or intercept != 0.0:
        return data * np.float32(slope) + np.float32(intercept)
    return data


@functools.lru_cache(maxsize=4)
def load_template(shape: tuple) -> dict:
    """The template at ``shape`` (CPU tensors): ``tissue`` (1, 4, *shape) probabilities of
    background, CSF, GM, WM summing to 1, ``t1`` (1, 1, *shape) in [0, 1], and ``side_mm``,
    the physical side of the cube they cover.

    The 1 mm template (197 x 233 x 189) is cropped to the brain's bounding box plus a
    margin, padded to a cube, and area-averaged to ``shape``. Array axes are (z, y, x), the
    order ITK's arrays use.
    """
    folder = template_dir()
    arrays = {}
    for key, name in TEMPLATE_FILES.items():
        data = np.asarray(read_nifti(folder / name), dtype=np.float32) / 255.0
        arrays[key] = np.ascontiguousarray(data.transpose(2, 1, 0))  # (x, y, z) -> (z, y, x)
    mask = (arrays["t1"] > 0).astype(np.float32)
    inside = np.argwhere(mask > 0)
    low, high = inside.min(0), inside.max(0) + 1
    side = int((high - low).max()) + 8  # 4 voxels of margin each side
    centre = (low + high) // 2
    start = centre - side // 2

    def crop(volume):
        out = np.zeros((side, side, side), np.float32)
        src_lo = np.maximum(start, 0)
        src_hi = np.minimum(start + side, volume.shape)
        dst_lo = src_lo - start
        out[tuple(slice(a, b) for a, b in zip(dst_lo, dst_lo + (src_hi - src_lo)))] = \
            volume[tuple(slice(a, b) for a, b in zip(src_lo, src_hi))]
        return out

    gm, wm, mask = crop(arrays["gm"]), crop(arrays["wm"]), crop(mask)
    csf = np.clip(mask - gm - wm, 0, 1)
    background = 1.0 - mask
    tissue = torch.from_numpy(np.stack([background, csf, gm * mask, wm * mask]))[None]
    t1 = torch.from_numpy(crop(arrays["t1"]))[None, None]
    tissue = F.interpolate(tissue, size=tuple(shape), mode="area")
    tissue = tissue.clamp_min(0)
    tissue = tissue / tissue.sum(1, keepdim=True).clamp_min(1e-6)
    t1 = F.interpolate(t1, size=tuple(shape), mode="area")
    return {"tissue": tissue, "t1": t1 / t1.max(), "side_mm": float(side)}  # template voxels are 1 mm


# ---------------------------------------------------------------- patients

@dataclass
class Patient:
    """One synthetic subject: an anatomy and its aligned contrasts, rendered on demand.

    ``tissue``: (1, K, *shape) partial-volume maps (brain: background, CSF, GM, WM);
    ``labels``: (*shape) uint8 argmax of ``tissue``, valid for every contrast;
    ``contrasts``: the names :meth:`image` accepts.
    """

    kind: str
    seed: int
    tissue: torch.Tensor
    labels: torch.Tensor
    contrasts: tuple
    t1: torch.Tensor | None = None
    family: int = 0
    _images: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple:
        return tuple(self.labels.shape)

    def image(self, contrast: str) -> torch.Tensor:
        """The contrast ``contrast`` (1, 1, *shape), float32 in [0, 1]; the same on every call."""
        if contrast not in self.contrasts:
            raise ValueError(f"{self.kind} patients have contrasts {', '.join(self.contrasts)}, not {contrast!r}")
        if contrast not in self._images:
            if contrast == "ct_inverted":
                self._images[contrast] = 1.0 - self.image("ct")
            else:
                gen = derived_generator(0x1AA6E, self.seed, self.family, self.contrasts.index(contrast))
                self._images[contrast] = render_ct(self, gen) if contrast == "ct" else render_contrast(self, contrast, gen)
        return self._images[contrast]


def _tissue_means(contrast: str, channels: int, gen) -> torch.Tensor:
    if contrast in CONTRAST_TABLES:
        base = torch.tensor(CONTRAST_TABLES[contrast], dtype=torch.float64)
        jitter = _uniform(gen, -TABLE_JITTER, TABLE_JITTER, (channels,))
        jitter[0] = 0.0  # MRI background stays dark
        return (base + jitter).clamp(0, 1)
    means = _uniform(gen, 0.0, 1.0, (channels,))  # "rand*": SynthMorph-style random intensities
    means[0] = _uniform(gen, 0.0, 0.3)
    return means


def render_contrast(patient: Patient, contrast: str, gen: torch.Generator) -> torch.Tensor:
    """Render one image of ``patient``: tissue-to-intensity map (or the template T1 under a
    random gamma), smooth texture, blur, bias field, Rician noise, MRI normalization."""
    tissue = patient.tissue
    device, shape = tissue.device, patient.shape
    if contrast == "t1":
        gamma = float(_uniform(gen, 0.8, 1.25))
        image = patient.t1.clamp_min(0) ** gamma
    else:
        means = _tissue_means(contrast, tissue.shape[1], gen).float().to(device)
        image = (tissue * means.view(1, -1, 1, 1, 1)).sum(1, keepdim=True)
    texture = float(_uniform(gen, 0.0, 0.08))
    image = image * (1 + texture * smooth_noise(shape, gen, 12, device=device))
    sigma = float(_uniform(gen, 0.0, 1.0))
    if sigma > 0.3:
        taps = 2 * int(np.ceil(3 * sigma)) + 1
        image = gaussian_blur(image, taps=taps, sigma=sigma)
    bias = float(_uniform(gen, 0.0, 0.3))
    image = image * torch.exp(bias * smooth_noise(shape, gen, 4, device=device))
    level = float(_uniform(gen, 0.005, 0.03)) * float(image.max())
    noise = torch.randn((2, 1, *shape), generator=gen).to(device) * level
    image = torch.sqrt((image + noise[:1]) ** 2 + noise[1:] ** 2)
    return normalize_mri(image)


def render_ct(patient: Patient, gen: torch.Generator) -> torch.Tensor:
    """Render a CT-like image of a brain ``patient``: jittered Hounsfield units per tissue, a
    bone shell about 3 % of the field of view thick outside the brain, blur, Gaussian noise;
    clipped to [-1000, 1000] HU and scaled to [0, 1] as the paper preprocesses CT. Inside the
    brain the tissues differ by only a few HU, so at this window the image is mostly head
    outline and skull, as real CT is."""
    tissue = patient.tissue
    device, shape = tissue.device, patient.shape
    hu = torch.tensor(CT_HU, dtype=torch.float64)
    hu[1:] += _uniform(gen, -CT_HU_JITTER, CT_HU_JITTER, (len(CT_HU) - 1,))
    image = (tissue * hu.float().to(device).view(1, -1, 1, 1, 1)).sum(1, keepdim=True)
    brain = 1.0 - tissue[:, :1]
    thickness = max(1, round(0.03 * max(shape)))
    shell = (F.max_pool3d(brain, 2 * thickness + 1, stride=1, padding=thickness) - brain).clamp(0, 1)
    image = image + shell * (float(_uniform(gen, *BONE_HU)) - CT_HU[0])
    sigma = float(_uniform(gen, 0.3, 1.0))
    image = gaussian_blur(image, taps=2 * int(np.ceil(3 * sigma)) + 1, sigma=sigma)
    level = float(_uniform(gen, 2.0, 20.0))
    image = image + torch.randn((1, 1, *shape), generator=gen).to(device) * level
    low, high = CT_WINDOW
    return ((image.clamp(low, high) - low) / (high - low)).float()


def _deform(volumes: torch.Tensor, gen, *, deformation: float, rotation_deg: float, scaling: float,
            translation: float) -> torch.Tensor:
    """``volumes`` (1, C, *shape) pulled back through a random affine o diffeomorphism."""
    shape = volumes.shape[2:]
    device = volumes.device
    affine = random_affine(gen, rotation_deg=rotation_deg, scaling=scaling, translation=translation)
    displacement = random_diffeomorphism(shape, gen, scale=deformation, device=device)
    coords = apply_affine(affine, identity_map(shape, device=device) + displacement)
    return warp(volumes, coords, padding="border")


def brain_patient(seed: int, shape=(96, 96, 96), *, device=None, deformation: float = 0.045,
                  rotation_deg: float = 6.0, scaling: float = 0.06, translation: float = 0.03,
                  ct: bool = False) -> Patient:
    """A brain patient: the template deformed by the random diffeomorphism and affine of ``seed``.

    ``deformation``: scale of the velocity field in [0, 1] coordinates (0.045 gives displacements
    of about 3 voxels on average and 9 at most at 96^3); ``rotation_deg``/``scaling``/
    ``translation``: bounds of the random affine. ``ct``: the patient also has the contrasts
    ``CT_CONTRASTS`` (a CT-like image and 1 - CT); the other contrasts stay the same images.
    """
    template = load_template(tuple(int(n) for n in shape))
    gen = derived_generator(0xB2A1, seed)
    volumes = torch.cat([template["tissue"], template["t1"]], 1).to(device)
    warped = _deform(volumes, gen, deformation=deformation, rotation_deg=rotation_deg, scaling=scaling,
                     translation=translation)
    tissue, t1 = warped[:, :4], warped[:, 4:]
    tissue = tissue / tissue.sum(1, keepdim=True).clamp_min(1e-6)
    labels = tissue[0].argmax(0).to(torch.uint8)
    contrasts = BRAIN_CONTRASTS + CT_CONTRASTS if ct else BRAIN_CONTRASTS
    return Patient("brain", int(seed), tissue, labels, contrasts, t1=t1)


def shapes_patient(seed: int, shape=(96, 96, 96), *, family: int = 0, device=None, deformation: float = 0.06,
                   rotation_deg: float = 8.0, scaling: float = 0.08, translation: float = 0.04) -> Patient:
    """A SynthMorph-style patient: the base label map of ``family`` (argmax of 8-16 smooth random
    fields, the outer shell background) deformed by the random transform of ``seed``."""
    shape = tuple(int(n) for n in shape)
    base_gen = derived_generator(0x5BA9E, family)
    count = int(torch.randint(8, 17, (), generator=base_gen))
    coarse = int(torch.randint(4, 9, (), generator=base_gen))
    fields = smooth_noise(shape, base_gen, coarse, count, device)
    # A smooth random blob keeps a background margin, as around a body part.
    radius = torch.linalg.vector_norm(identity_map(shape, device=device) - 0.5, dim=1, keepdim=True)
    outside = radius + 0.08 * smooth_noise(shape, base_gen, 4, device=device) > 0.42
    labels = torch.where(outside[0, 0], 0, fields[0].argmax(0) + 1)
    onehot = F.one_hot(labels.long(), count + 1).permute(3, 0, 1, 2)[None].float()
    gen = derived_generator(0x5BA9F, family, seed)
    tissue = _deform(onehot, gen, deformation=deformation, rotation_deg=rotation_deg, scaling=scaling,
                     translation=translation)
    tissue = tissue / tissue.sum(1, keepdim=True).clamp_min(1e-6)
    labels = tissue[0].argmax(0).to(torch.uint8)
    return Patient("shapes", int(seed), tissue, labels, SHAPES_CONTRASTS, family=int(family))


def training_pair(gen: torch.Generator, shape, *, shapes_fraction: float = 0.25, device=None, ct: bool = False):
    """Two patients for one training pair, drawn from training seeds only (< HOLDOUT_START):
    brain/brain (with the CT contrasts when ``ct``), or (with probability ``shapes_fraction``)
    two members of one shapes family."""
    use_shapes = float(torch.rand((), generator=gen)) < shapes_fraction
    seeds = torch.randint(0, HOLDOUT_START, (3,), generator=gen).tolist()
    if use_shapes:
        return (shapes_patient(seeds[0], shape, family=seeds[2], device=device),
                shapes_patient(seeds[1], shape, family=seeds[2], device=device))
    return brain_patient(seeds[0], shape, device=device, ct=ct), brain_patient(seeds[1], shape, device=device, ct=ct)


def evaluation_pairs(count: int, shape=(96, 96, 96), *, device=None, start: int = 0, ct: bool = False):
    """``count`` held-out brain pairs (moving, fixed): patients ``HOLDOUT_START + 2 i`` and ``+ 2 i + 1``
    (with the CT contrasts when ``ct``)."""
    for i in range(start, start + count):
        yield (brain_patient(HOLDOUT_START + 2 * i, shape, device=device, ct=ct),
               brain_patient(HOLDOUT_START + 2 * i + 1, shape, device=device, ct=ct))
