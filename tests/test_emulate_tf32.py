"""benchmarks/emulate_tf32.py, whose CPU forecast of TF32's point differences (RESULTS.md) rests
on rounding every convolution's input and weight as TF32 tensor cores do."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import emulate_tf32  # noqa: E402
from helpers import random_network  # noqa: E402
from mgr_engine import ops  # noqa: E402
from mgr_engine.model import inference_network  # noqa: E402


def test_to_tf32_keeps_ten_mantissa_bits():
    ulp = 2.0 ** -10  # of TF32 at 1
    values = torch.tensor([1 + ulp, 1 + ulp / 2, 1 + ulp / 4, -(1 + ulp / 2), 3.0, 2 ** -30 * (1 + ulp / 2)])
    assert emulate_tf32.to_tf32(values).tolist() == [1 + ulp, 1 + ulp, 1, -(1 + ulp), 3.0, 2 ** -30 * (1 + ulp)]
    assert emulate_tf32.to_tf32(values, "truncate").tolist() == [1 + ulp, 1, 1, -1, 3.0, 2 ** -30]
    strided = torch.rand(2, 5, 3, 4, 6).contiguous(memory_format=torch.channels_last_3d)
    assert emulate_tf32.to_tf32(strided).stride() == strided.stride()


def test_every_convolution_computes_on_rounded_inputs_and_weights(monkeypatch):
    network = inference_network(random_network((65, 65, 65), narrow=True, seed=2), subpixel_upconvs=True)
    emulated = emulate_tf32.tf32_emulated(network, "nearest", fp32_last_conv=False)
    seen = []
    conv3d = torch.nn.functional.conv3d

    def spy(x, weight, *args, **kwargs):
        seen.append([torch.equal(t, emulate_tf32.to_tf32(t)) for t in (x, weight)])
        return conv3d(x, weight, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv3d", spy)
    unet = emulated.unets[3]
    image = torch.rand(1, 1, 40, 40, 40)
    with ops.kernel_mode("torch"), torch.no_grad():
        unet(image, image)
    assert len(seen) == len(unet.downConvs) + len(unet.upConvs) + 1
    assert all(x_rounded and weight_rounded for x_rounded, weight_rounded in seen)
    assert not torch.equal(network.unets[3].lastConv.weight, emulated.unets[3].lastConv.weight)  # a copy rounded
