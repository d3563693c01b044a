"""``mgr-engine info``: what the installation has, as it is (versions from the packages' metadata,
the C++ extensions as they import, the checkpoint each model would load)."""

import importlib.metadata
import json
import os

import torch

import mgr_engine
from mgr_engine import cli
from mgr_engine.engine import BUNDLED_WEIGHTS, CHECKPOINT_NAME
from mgr_engine.kernel_modes import cpp_extensions_built
from mgr_engine.ops import kernel_mode, triton_available


def info(capsys, *options):
    capsys.readouterr()
    assert cli.main(["info", *options]) == 0
    return capsys.readouterr().out


def test_info_reports_the_installation_as_it_is(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MGR_ENGINE_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.delenv("MGR_ENGINE_KERNELS", raising=False)
    checkpoint = tmp_path / "unigradicon1.0" / CHECKPOINT_NAME
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"found by its place, not read")
    report = json.loads(info(capsys, "--json"))
    assert report["mgr_engine"]["version"] == mgr_engine.__version__
    assert report["torch"]["version"] == torch.__version__
    assert report["torch"]["cuda_available"] == torch.cuda.is_available()
    assert len(report["torch"]["devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert set(report["kernels"]["cpp_extensions"].values()) == {cpp_extensions_built()}
    if os.environ.get("MGR_ENGINE_REQUIRE_CPP"):  # make test: built, or the C++ tests fail too
        assert all(report["kernels"]["cpp_extensions"].values())
    assert report["kernels"]["cuda_ops"].startswith("Triton" if triton_available() else "PyTorch")
    assert report["packages"]["itk"] == importlib.metadata.version("itk")
    assert report["weights"]["compact"] == {"found": True, "path": str(BUNDLED_WEIGHTS["compact"])}
    assert report["weights"]["unigradicon"] == {"found": True, "path": str(checkpoint)}
    assert not report["weights"]["multigradicon"]["found"]
    assert report["weights"]["multigradicon"]["looked_in"][0] == str(tmp_path / "multigradicon1.0" / CHECKPOINT_NAME)

    text = info(capsys)
    assert text.startswith(f"mgr_engine {mgr_engine.__version__} (")
    assert f"  compact              {BUNDLED_WEIGHTS['compact']}\n" in text
    assert f"  unigradicon          {checkpoint}\n" in text
    assert f"  multigradicon        not found; looked in {tmp_path / 'multigradicon1.0' / CHECKPOINT_NAME}" in text
    built = "built" if cpp_extensions_built() else "NOT BUILT"
    assert all(f"  {module:<20} {built}" in text for module in report["kernels"]["cpp_extensions"])
    if cpp_extensions_built():  # the width the last convolution's passes run in, which the others' clones match
        from mgr_engine.kernels import last_conv_cpu

        assert report["kernels"]["cpu_vector_bytes"] == last_conv_cpu.vector_bytes() in (16, 32, 64)
        assert f"C++ extensions (vectors of {last_conv_cpu.vector_bytes()} bytes: " in text
    # the mode in force, and where it came from
    monkeypatch.setenv("MGR_ENGINE_KERNELS", "torch")
    with kernel_mode("torch"):
        text = info(capsys)
    assert "kernel mode torch (MGR_ENGINE_KERNELS): ops on the CPU run PyTorch, on CUDA PyTorch\n" in text


def test_weights_search_path_names_where_each_model_is_looked_for(tmp_path, monkeypatch):
    """The bundled model's file for it (the cache folder named before was never looked in); an
    unknown model refused, not given a folder of its name."""
    import pytest

    from mgr_engine.errors import InvalidOptionError

    monkeypatch.setenv("MGR_ENGINE_WEIGHTS_DIR", str(tmp_path))
    assert mgr_engine.weights_search_path("compact") == [BUNDLED_WEIGHTS["compact"]]
    places = mgr_engine.weights_search_path()
    assert places[0] == tmp_path / "multigradicon1.0" / CHECKPOINT_NAME and len(places) == 2
    with pytest.raises(InvalidOptionError, match="unknown model 'multigradicon2': choose one of multigradicon, "):
        mgr_engine.weights_search_path("multigradicon2")
