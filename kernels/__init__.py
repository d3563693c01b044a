"""Fused kernels (installed as ``mgr_engine.kernels``).

Empty so far: the Triton kernels for warping, map composition and windowed LNCC^2
are the work of a later issue. Their PyTorch references, which the engine uses
today, live in :mod:`mgr_engine.ops` and :mod:`mgr_engine.losses`.
"""
