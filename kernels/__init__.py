"""Fused Triton kernels (installed as ``mgr_engine.kernels``).

One file per op, each with its ``autograd.Function``: ``warp`` (trilinear sampling at a
map), ``compose`` (map composition) and ``lncc`` (windowed LNCC / LNCC^2 loss). Their
PyTorch references are :mod:`mgr_engine.ops` and :mod:`mgr_engine.losses`, which
dispatch here on CUDA tensors (see :func:`mgr_engine.ops.use_triton`).

``warp_cpu`` is the CPU counterpart of the warp's forward, in C++ with OpenMP
(``trilinear_cpu.cpp``, built by ``setup.py``), taken by :func:`mgr_engine.ops.warp` on CPU
tensors when no gradient is wanted (see :func:`mgr_engine.ops.use_cpp_warp`).
"""
