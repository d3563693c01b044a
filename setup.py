"""Package layout: ``kernels/`` and ``export/`` sit at the top of the repository (one folder per
concern, as the project's layout asks) but install as ``mgr_engine.kernels`` and
``mgr_engine.export`` so that users import a single package.

The C++ kernels (``kernels/trilinear_cpu.cpp`` -> ``mgr_engine._trilinear_cpu``: the warp and
the decoder's epilogue; ``kernels/last_conv_cpu.cpp`` -> ``mgr_engine._last_conv_cpu``: the
U-Net's last convolution; ``kernels/gaussian_blur_cpu.cpp`` -> ``mgr_engine._gaussian_blur_cpu``:
LNCC's window; ``kernels/resample_cpu.cpp`` -> ``mgr_engine._resample_cpu``: the result's
warped image and displacement field at full resolution; ``kernels/jacobian_cpu.cpp`` ->
``mgr_engine._jacobian_cpu``: their Jacobian determinant; ``kernels/mind_ssc_cpu.cpp`` ->
``mgr_engine._mind_ssc_cpu``: the MIND-SSC descriptor of IO's similarity; ``kernels/upconv_cpu.cpp``
-> ``mgr_engine._upconv_cpu``: the transposed convolutions' forward (Winograd) and weight gradient;
``kernels/encoder_cpu.cpp`` -> ``mgr_engine._encoder_cpu``: the U-Nets' first encoder level) are built
through pybind11 (a build requirement in pyproject.toml)
with OpenMP. They are optional: where they do not compile, the install goes on and the engine
uses PyTorch's ops. ``MGR_ENGINE_BUILD_CPP=0`` skips them (a GPU session's install, where the
CPU kernels are unused).
"""

import os
import sys

import setuptools
from setuptools import setup
from setuptools.command.build_ext import build_ext


def cpp_extensions():
    if os.environ.get("MGR_ENGINE_BUILD_CPP", "1") == "0":
        print("mgr_engine: MGR_ENGINE_BUILD_CPP=0, the C++ warp is not built", file=sys.stderr)
        return []
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:  # building without pybind11 (e.g. --no-build-isolation): PyTorch path only
        print("mgr_engine: pybind11 not found, the C++ warp is not built", file=sys.stderr)
        return []
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]  # Apple clang has no -fopenmp
    # -fno-trapping-math: no kernel relies on floating-point traps, and with them GCC keeps a
    # float-to-int conversion behind its branch, which stops the warp's point loops vectorizing.
    # -ffp-contract=off for the Jacobian: it reproduces ITK's float arithmetic, which fused
    # multiply-adds would round differently.
    flags = {"trilinear_cpu": [], "last_conv_cpu": [], "gaussian_blur_cpu": [], "resample_cpu": [],
             "jacobian_cpu": ["-ffp-contract=off"], "mind_ssc_cpu": [], "upconv_cpu": [], "encoder_cpu": []}
    return [Pybind11Extension(f"mgr_engine._{name}", [f"kernels/{name}.cpp"], cxx_std=17, optional=True,
                              extra_compile_args=["-O3", "-fno-trapping-math", *extra, *openmp],
                              extra_link_args=openmp)
            for name, extra in flags.items()]


# The extensions whose point loops read their image at a map's corners: vectorized, each corner
# is a gather. GCC's generic tuning emits no gather instructions (GCC 12.2 here; gathers are slow
# on some CPUs: older AMD cores, Intel ones with the Downfall microcode), and the loops then load
# the corners lane by lane. These flags turn gathers on: the first set the compiler takes (newer
# GCCs name the one of 8 or more elements use_gather_8parts, GCC 12 use_gather); clang takes
# neither. On a 2-core Intel Xeon (Sapphire Rapids) the warp's forward ran 1.75-2x faster, the
# result's resampling 1.2-1.5x (benchmarks/RESULTS.md, forty-fourth session).
GATHER_EXTENSIONS = ("mgr_engine._trilinear_cpu", "mgr_engine._resample_cpu")
GATHER_FLAGS = ("-mtune-ctrl=use_gather_2parts,use_gather_4parts,use_gather_8parts",
                "-mtune-ctrl=use_gather_2parts,use_gather_4parts,use_gather")


class ParallelBuildExt(build_ext):
    """Compiles the C++ extensions side by side, one per core, unless ``-j`` says otherwise: on
    the 2-core CI machine 100-111 s instead of 177 s one after another (trilinear_cpu alone
    takes 100 s). Adds the first of GATHER_FLAGS the compiler takes to GATHER_EXTENSIONS."""

    def finalize_options(self):
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1
        super().finalize_options()

    def build_extensions(self):
        from pybind11.setup_helpers import has_flag

        gather = next((flag for flag in GATHER_FLAGS if has_flag(self.compiler, flag)), None)
        for extension in self.extensions:
            if gather and extension.name in GATHER_EXTENSIONS:
                extension.extra_compile_args.append(gather)
        super().build_extensions()


def license_metadata():
    """PEP 639's License-Expression where setuptools writes it (77 and later), else the License field."""
    major = int(setuptools.__version__.split(".")[0])
    return {"license_expression": "Apache-2.0"} if major >= 77 else {"license": "Apache-2.0"}


setup(
    **license_metadata(),
    # the two data folders are listed so that setuptools does not warn about folders it would skip
    packages=["mgr_engine", "mgr_engine.kernels", "mgr_engine.export", "mgr_engine.weights", "mgr_engine.data.sample_pair"],
    package_dir={"mgr_engine": "mgr_engine", "mgr_engine.kernels": "kernels", "mgr_engine.export": "export"},
    ext_modules=cpp_extensions(),
    cmdclass={"build_ext": ParallelBuildExt},
)
