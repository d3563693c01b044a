"""The package's public names load their modules on first use (mgr_engine/__init__.py), so that
the commands that run no network (``mgr-engine warp`` and ``jacobian``) start without torch."""

import subprocess
import sys

import pytest

import mgr_engine


def test_importing_the_package_loads_no_torch_until_a_name_needs_it():
    script = ("import sys, mgr_engine\nprint('torch' in sys.modules)\nmgr_engine.Engine\n"
              "print('torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "True"]


def test_each_public_name_is_its_modules():
    from mgr_engine import engine, export, host_memory, itk_io, model

    assert mgr_engine.register is engine.register and mgr_engine.Engine is engine.Engine
    assert mgr_engine.NetworkConfig is model.NetworkConfig and mgr_engine.export_onnx is export.export_onnx
    assert mgr_engine.release_host_memory is host_memory.release_freed_memory
    assert mgr_engine.write_image is itk_io.write_image
    for name in mgr_engine.__all__:
        assert getattr(mgr_engine, name) is not None
    assert set(mgr_engine.__all__) <= set(dir(mgr_engine))


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'Engin'"):
        mgr_engine.Engin  # noqa: B018
    assert not hasattr(mgr_engine, "Engin")


def test_register_loads_a_checkpoint_again_once_it_is_rewritten_at_its_path(tmp_path):
    """mgr_engine.register caches its engine by its settings: a checkpoint retrained, or another
    copied over it at the same path, went on being served from memory, silently."""
    import numpy as np
    import torch

    pytest.importorskip("itk")  # register() reads its images through ITK (the GPU machine has none)
    from helpers import randomize_
    from mgr_engine import engine
    from mgr_engine.model import GradICONNetwork, official_state_dict

    path = tmp_path / "Step_2_final.trch"
    fixed = np.random.default_rng(0).random((20, 22, 18)).astype(np.float32)
    moving = np.ascontiguousarray(fixed[::-1])

    def saved_and_registered(seed):
        torch.save(official_state_dict(randomize_(GradICONNetwork(engine.MODELS["compact"]), seed)), path)
        return mgr_engine.register(fixed, moving, model="compact", weights=path, io_iterations=None,
                                   progress=False).phi_ab

    first = saved_and_registered(1)
    cached = engine._ENGINE_CACHE[("compact", str(path), None, "torch", None)][1]
    assert torch.equal(mgr_engine.register(fixed, moving, model="compact", weights=path, io_iterations=None,
                                           progress=False).phi_ab, first)
    assert engine._ENGINE_CACHE[("compact", str(path), None, "torch", None)][1] is cached  # unchanged: kept
    second = saved_and_registered(2)
    assert not torch.equal(second, first)
    expected = mgr_engine.Engine(model="compact", weights=path).register(fixed, moving, io_iterations=None,
                                                                         progress=False).phi_ab
    assert torch.equal(second, expected)
