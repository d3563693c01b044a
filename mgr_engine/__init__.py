"""mgr_engine: fast inference for multiGradICON, the foundation model for 3-D medical image registration.

    import mgr_engine
    result = mgr_engine.register("fixed.nii.gz", "moving.nii.gz", weights="Step_2_final.trch")
    result.save("transform.h5")
    mgr_engine.write_image(result.warp(), "warped.nii.gz")

    for result in mgr_engine.register_many(pairs, io_iterations=None, batch_size=4):  # a data set
        ...

See :func:`register` and :class:`Engine`.
"""

from . import errors
from .engine import Engine, RegistrationResult, register, register_many, weights_search_path
from .model import GradICONNetwork, NetworkConfig
from .export import export_onnx  # onnx itself is imported only when a graph is built
from .host_memory import release_freed_memory as release_host_memory
from .itk_io import write_image  # atomic; a .nii.gz gzipped on every core, not by ITK on one

__all__ = ["Engine", "GradICONNetwork", "NetworkConfig", "RegistrationResult", "errors", "export_onnx", "register",
           "register_many", "release_host_memory", "weights_search_path", "write_image"]
__version__ = "0.1.0"
