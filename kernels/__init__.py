"""Fused Triton kernels (installed as ``mgr_engine.kernels``).

One file per op, each with its ``autograd.Function``: ``warp`` (trilinear sampling at a
map), ``compose`` (map composition), ``lncc`` (windowed LNCC / LNCC^2 loss) and ``mind_ssc``
(the MIND-SSC descriptor). Their
PyTorch references are :mod:`mgr_engine.ops` and :mod:`mgr_engine.losses`, which
dispatch here on CUDA tensors (see :func:`mgr_engine.ops.use_triton`). And
``norm_crop_concat``, the backward pass of IO's eval-mode BatchNorm, crop and concatenation,
which :class:`mgr_engine.model._EvalNormCropConcat` (its reference) takes on CUDA.

On the CPU, C++ with OpenMP (``*_cpu.cpp``, built by ``setup.py``): ``warp_cpu``, the
warp forward and backward, taken by :func:`mgr_engine.ops.warp` on CPU tensors (see
:func:`mgr_engine.ops.use_cpp_warp`); ``decoder_cpu``, the U-Net's decoder epilogue
(trilinear 2x upsampling, multiply-add, concatenation; see :func:`mgr_engine.ops.use_cpp_decoder`);
``last_conv_cpu``, the U-Net's last convolution (:func:`mgr_engine.ops.use_cpp_last_conv`);
``gaussian_blur_cpu``, LNCC's window (:func:`mgr_engine.ops.use_cpp_blur`); ``mind_ssc_cpu``, the
MIND-SSC descriptor and loss (:func:`mgr_engine.ops.use_cpp_mind`); ``upconv_cpu``, the
decoder's finest transposed convolutions: their forward in Winograd form
(:func:`mgr_engine.ops.use_cpp_upconv_forward`) and their weight gradient in IO
(:func:`mgr_engine.ops.use_cpp_upconv_weight_grad`); ``encoder_cpu``, the U-Net's first encoder
level (the two images: convolution, pooling, their input gradient;
:func:`mgr_engine.ops.use_cpp_encoder_level`).
"""
