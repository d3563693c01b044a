"""Typed errors raised by mgr_engine.

Every error says what went wrong and what to do about it. All derive from
:class:`MgrEngineError`, and each also derives from the closest built-in
exception (``ValueError``, ``FileNotFoundError``, ...) so existing ``except``
clauses keep working.
"""


class MgrEngineError(Exception):
    """Base class of every error mgr_engine raises on purpose."""


def tilde_hint(path) -> str:
    """What to add to "does not exist" for a path that starts with ``~``: Python's file functions,
    ITK's and these do not expand it (a shell does, unquoted), so ``"~/t1.nii.gz"`` names a
    folder called ``~``."""
    return " ('~' is not expanded: pass os.path.expanduser(path))" if str(path).startswith("~") else ""


def with_message(error: MgrEngineError, message: str) -> MgrEngineError:
    """``error`` again with ``message``: the same type, caused by ``error``, so that one yielded
    rather than raised (``register_many``'s ``on_error="yield"``) keeps its traceback too."""
    renamed = type(error)(message)
    renamed.__cause__ = error
    return renamed


class InvalidImageError(MgrEngineError, ValueError):
    """An input image cannot be registered (constant, NaN/Inf, wrong dimension, empty)."""


class ImageReadError(MgrEngineError, OSError):
    """An image file is missing, empty or not readable by ITK."""


class OutputWriteError(MgrEngineError, OSError):
    """An output cannot be written where it was asked for."""


class MaskMismatchError(InvalidImageError):
    """A mask does not lie on the grid of the image it belongs to."""


class InvalidOptionError(MgrEngineError, ValueError):
    """An option has a value mgr_engine does not know (modality, similarity, model, ...)."""


class InvalidPointsError(MgrEngineError, ValueError):
    """Points (landmarks) that cannot be transformed: not (N, 3) finite numbers, or a points file
    whose rows or columns cannot be read."""


class CheckpointError(MgrEngineError, ValueError):
    """A checkpoint does not match the network architecture it is loaded into."""


class InstanceOptimizationError(MgrEngineError, ArithmeticError):
    """Instance optimization diverged: its loss became NaN or infinite (a learning rate too large)."""


class WeightsNotFoundError(MgrEngineError, FileNotFoundError):
    """No weights file where mgr_engine looked for one."""


class OnnxError(MgrEngineError, ValueError):
    """An ONNX graph cannot be exported as asked (an opset too old for its operators, an unknown
    kind or dtype), or an ONNX model does not fit the engine that should run it."""


class MissingDependencyError(MgrEngineError, ImportError):
    """An optional dependency (``onnx``, ``onnxruntime``) is not installed."""
