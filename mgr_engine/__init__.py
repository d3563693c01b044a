"""mgr_engine: fast inference for multiGradICON, the foundation model for 3-D medical image registration.

    import mgr_engine
    result = mgr_engine.register("fixed.nii.gz", "moving.nii.gz", weights="Step_2_final.trch")
    result.save("transform.h5")
    mgr_engine.write_image(result.warp(), "warped.nii.gz")

    for result in mgr_engine.register_many(pairs, io_iterations=None, batch_size=4):  # a data set
        ...

See :func:`register` and :class:`Engine`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from . import errors

# Loaded on first use (PEP 562): ``mgr-engine warp`` and ``jacobian`` import this package without
# torch, which the engine's modules load (1-2 s).
_LAZY = {  # public name -> (module, attribute)
    "Engine": ("engine", "Engine"), "RegistrationResult": ("engine", "RegistrationResult"),
    "register": ("engine", "register"), "register_many": ("engine", "register_many"),
    "weights_search_path": ("engine", "weights_search_path"),
    "GradICONNetwork": ("model", "GradICONNetwork"), "NetworkConfig": ("model", "NetworkConfig"),
    "export_onnx": ("export", "export_onnx"),  # onnx itself is imported only when a graph is built
    "release_host_memory": ("host_memory", "release_freed_memory"),
    "write_image": ("itk_io", "write_image"),  # atomic; a .nii.gz gzipped on every core, not by ITK on one
    "to_simpleitk": ("itk_io", "to_simpleitk"), "to_nibabel": ("itk_io", "to_nibabel"),
    "transform_points": ("points", "transform_points"), "read_points": ("points", "read_points"),
    "write_points": ("points", "write_points"),
}

if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from .engine import Engine, RegistrationResult, register, register_many, weights_search_path
    from .export import export_onnx
    from .host_memory import release_freed_memory as release_host_memory
    from .itk_io import to_nibabel, to_simpleitk, write_image
    from .model import GradICONNetwork, NetworkConfig
    from .points import read_points, transform_points, write_points

__all__ = ["Engine", "GradICONNetwork", "NetworkConfig", "RegistrationResult", "errors", "export_onnx", "read_points",
           "register", "register_many", "release_host_memory", "to_nibabel", "to_simpleitk", "transform_points",
           "weights_search_path", "write_image", "write_points"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
