"""register_many: a stream of pairs, read ahead in a thread and batched through the network,
gives what register() gives pair by pair, in order; errors name the pair; leaving early stops
the reading thread."""

import logging
import os
import re
import threading
import time

import numpy as np
import pytest
import torch

from helpers import random_network, recorded_io_precisions, smooth_volume
from mgr_engine import Engine, register_many
from mgr_engine.engine import _PreparedPair, _prefetched_batches
from mgr_engine.errors import (ImageReadError, InstanceOptimizationError, InvalidImageError,
                               InvalidOptionError)
from mgr_engine.model import official_state_dict

itk = pytest.importorskip("itk")

SHAPE = (72, 72, 72)


@pytest.fixture(scope="module")
def engine():
    net = random_network(SHAPE, narrow=True, seed=3, displacement_scale=0.5)
    return Engine(weights=official_state_dict(net), config=net.config, device="cpu")


def image(seed, shape=(40, 48, 44), spacing=(1.1, 0.9, 1.3)):
    out = itk.image_from_array(smooth_volume(shape, seed) * 500 + 20)
    out.SetSpacing(spacing)
    out.SetOrigin([float(seed), -3.0, 2.5])
    return out


def pairs(n, start=0):
    return [(image(2 * i + start), image(2 * i + 1 + start, shape=(36, 50, 41))) for i in range(n)]


def loader_threads():
    return [t for t in threading.enumerate() if t.name == "mgr_engine-loader"]


def wait_for_no_loader(timeout=5.0):
    deadline = time.time() + timeout
    while loader_threads() and time.time() < deadline:
        time.sleep(0.01)
    return not loader_threads()


@pytest.mark.parametrize("batch_size", [1, 2, 4, np.int64(2)])  # a size computed with NumPy was refused
def test_same_maps_as_register_in_order(engine, batch_size):
    data = pairs(5)
    one_by_one = [engine.register(f, m, io_iterations=None) for f, m in data]
    streamed = list(engine.register_many(iter(data), batch_size=batch_size, io_iterations=None))
    assert len(streamed) == len(data)
    voxels = torch.tensor(SHAPE).view(1, 3, 1, 1, 1) - 1
    distinct = ((one_by_one[0].phi_ab - one_by_one[1].phi_ab) * voxels).abs().max()
    assert distinct > 0.5  # pairs give different maps, so a swapped order would show
    for ours, expected, (fixed, moving) in zip(streamed, one_by_one, data):
        assert ours.fixed is fixed and ours.moving is moving
        # batched convolutions may sum in another order: float32 rounding, not more
        assert ((ours.phi_ab - expected.phi_ab) * voxels).abs().max() < 1e-4
    # the transform and the lazy inverse work as register()'s do
    point = [10.0, 5.0, 20.0]
    assert np.allclose(streamed[2].transform.TransformPoint(point), one_by_one[2].transform.TransformPoint(point),
                       atol=1e-3)
    assert np.allclose(streamed[2].inverse_transform.TransformPoint(point),
                       one_by_one[2].inverse_transform.TransformPoint(point), atol=1e-3)


def test_relative_paths_are_taken_from_the_directory_of_the_call(engine, tmp_path, monkeypatch):
    """ITK's lazy loader changes the process's working directory while it loads a module, under
    the reading thread as much as under any other: relative paths are joined to the directory
    the call was made in, before that thread starts."""
    (fixed, moving), = pairs(1, start=320)
    itk.imwrite(fixed, str(tmp_path / "f.nii.gz"))
    itk.imwrite(moving, str(tmp_path / "m.nii.gz"))
    monkeypatch.chdir(tmp_path)
    stream = engine.register_many([("f.nii.gz", "m.nii.gz")], io_iterations=None)
    monkeypatch.chdir(tmp_path.parent)  # as ITK's loader does for a while
    [result] = list(stream)
    expected = engine.register(str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), io_iterations=None)
    assert torch.equal(result.phi_ab, expected.phi_ab)


def test_threads_first_registrations_do_not_see_itk_change_the_working_directory(tmp_path):
    """In a fresh process: ITK's loader changes the working directory while it loads a module;
    threads making their first mgr_engine.register calls at once must not meet that window: the
    module they need is loaded while the engine is made, under its lock, before any of them
    reads an image (before, by the first to convert one, while the others read theirs)."""
    import subprocess
    import sys

    code = """
import os, threading, sys
import numpy as np
import mgr_engine
seen = []
chdir = os.chdir
from mgr_engine import engine
# at each change: whether an engine was made already (then other threads were free to read images)
os.chdir = lambda path: (seen.append(len(engine._ENGINE_CACHE)), chdir(path))
volume = (np.indices((20, 24, 22)).sum(axis=0) % 7).astype(np.float32)
errors = []
def register():
    try:
        mgr_engine.register(volume, volume + 1, model="compact", io_iterations=None, device="cpu", progress=False)
    except Exception as exc:
        errors.append(exc)
threads = [threading.Thread(target=register, name=f"request-{i}") for i in range(3)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(len(seen), sum(seen), errors)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    changes, after_an_engine, errors = out.stdout.split(maxsplit=2)
    assert errors.strip() == "[]"
    # ITK changed it (and back) for each module it loaded, all before the engine was made
    assert int(changes) > 0 and after_an_engine == "0"


def test_an_engine_made_where_itk_is_imported_loads_itks_module_then(tmp_path):
    """In a fresh process that imported itk (a program of images): an Engine made by hand, before
    the threads that use it, makes ITK's loader change the working directory then, not under
    those threads' first registrations; without itk imported the engine does not import it."""
    import subprocess
    import sys

    code = """
import os, sys, threading
import numpy as np
import {first}
import mgr_engine
engine = mgr_engine.Engine(model="compact", device="cpu")
print("itk" in sys.modules)
seen = []
chdir = os.chdir
os.chdir = lambda path: (seen.append(path), chdir(path))
volume = (np.indices((20, 24, 22)).sum(axis=0) % 7).astype(np.float32)
threads = [threading.Thread(target=engine.register, args=(volume, volume + 1), kwargs=dict(io_iterations=None))
           for _ in range(2)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(len(seen))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                        os.environ.get("PYTHONPATH", "")])}
    for first, itk_imported, changes in (("itk", "True", "0"), ("json", "False", None)):
        out = subprocess.run([sys.executable, "-c", code.format(first=first)], capture_output=True, text=True,
                             env=env, cwd=tmp_path, timeout=300)
        assert out.returncode == 0, out.stderr
        imported, seen = out.stdout.split()
        assert imported == itk_imported
        if changes is not None:
            assert seen == changes


def test_fixed_batch_onnx_graph_takes_a_smaller_last_batch(engine, tmp_path):
    """A batch-2 ONNX graph over 3 pairs: the last batch of one is padded, not refused."""
    pytest.importorskip("onnxruntime")
    from mgr_engine import export_onnx

    weights = official_state_dict(engine.network)
    export_onnx(tmp_path / "b2.onnx", weights=weights, config=engine.config, batch=2)
    onnx_engine = Engine(weights=weights, config=engine.config, device="cpu", backend="onnxruntime",
                         onnx_model=tmp_path / "b2.onnx")
    data = pairs(3, start=20)
    streamed = list(onnx_engine.register_many(data, batch_size=2, io_iterations=None))
    assert len(streamed) == len(data)
    voxels = torch.tensor(SHAPE).view(1, 3, 1, 1, 1) - 1
    for ours, (fixed, moving) in zip(streamed, data):
        expected = engine.register(fixed, moving, io_iterations=None)
        assert ((ours.phi_ab - expected.phi_ab) * voxels).abs().max() < 1e-3


def test_instance_optimization_pair_by_pair(engine):
    data = pairs(3, start=20)
    options = dict(io_iterations=1, io_sim="lncc2", seed=5, progress=False)
    expected = [engine.register(f, m, **options) for f, m in data]
    streamed = list(engine.register_many(data, batch_size=2, **options))
    for ours, theirs in zip(streamed, expected):
        assert len(ours.io_losses) == 2
        np.testing.assert_allclose(ours.io_losses, theirs.io_losses, rtol=1e-6)
        torch.testing.assert_close(ours.phi_ab, theirs.phi_ab)


def test_masks_in_mappings(engine):
    fixed, moving = pairs(1, start=40)[0]
    mask_array = np.zeros(itk.array_view_from_image(fixed).shape, np.uint8)
    mask_array[5:30, 8:40, 4:38] = 1
    fixed_mask = itk.image_from_array(mask_array)
    fixed_mask.CopyInformation(fixed)  # scalar onto scalar: the fixed image's grid
    options = dict(io_iterations=None, masking="input")
    expected = engine.register(fixed, moving, fixed_mask=fixed_mask, **options)
    unmasked = engine.register(fixed, moving, **options)
    (ours,) = engine.register_many([{"fixed": fixed, "moving": moving, "fixed_mask": fixed_mask}], **options)
    torch.testing.assert_close(ours.phi_ab, expected.phi_ab)
    assert not torch.allclose(ours.phi_ab, unmasked.phi_ab)


def test_bad_pair_raises_its_typed_error_after_the_pairs_before_it(engine):
    data = pairs(4, start=60)
    data[3] = (data[3][0], np.zeros((30, 30, 30), np.float32))  # a constant moving image
    stream = engine.register_many(data, batch_size=2, io_iterations=None)
    # pair 2 shares its batch with the bad pair 3: it is registered all the same
    assert [next(stream).fixed for _ in range(3)] == [fixed for fixed, _ in data[:3]]
    with pytest.raises(InvalidImageError, match=r"^pair 3: .*moving"):
        next(stream)
    assert wait_for_no_loader()


@pytest.mark.parametrize("batch_size", [1, 2])
def test_on_error_yield_gives_a_bad_pairs_error_in_its_place_and_goes_on(engine, batch_size):
    """A data set's one bad pair stopped the stream: with on_error="yield" its typed error takes
    its place, and the pairs after it are registered as they would be alone."""
    good = pairs(3, start=300)
    data = [good[0], (good[1][0], np.zeros((30, 30, 30), np.float32)), ("/no/such/file.nii.gz", good[1][1]),
            "not a pair", good[1], good[2]]
    streamed = list(engine.register_many(data, batch_size=batch_size, io_iterations=None, on_error="yield"))
    assert len(streamed) == len(data)
    assert isinstance(streamed[1], InvalidImageError) and str(streamed[1]).startswith("pair 1: moving image is constant")
    assert isinstance(streamed[2], ImageReadError) and str(streamed[2]).startswith("pair 2: fixed image")
    assert isinstance(streamed[3], InvalidOptionError) and str(streamed[3]).startswith("pair 3: expected a (fixed")
    for result, (fixed, moving) in zip([streamed[0], *streamed[4:]], good):
        torch.testing.assert_close(result.phi_ab, engine.register(fixed, moving, io_iterations=None).phi_ab)
    assert wait_for_no_loader()


def test_on_error_yield_gives_instance_optimizations_divergence_in_the_pairs_place(engine):
    data = pairs(2, start=320)
    options = dict(io_iterations=1, io_lr=1e6, progress=False)
    with pytest.raises(InstanceOptimizationError, match=r"^pair 0: instance optimization diverged"):
        list(engine.register_many(data, **options))
    streamed = list(engine.register_many(data, on_error="yield", **options))
    assert [type(result) for result in streamed] == [InstanceOptimizationError] * 2
    assert str(streamed[1]).startswith("pair 1: instance optimization diverged")
    assert streamed[1].__cause__.__traceback__ is not None  # where it was raised, for a bug report
    with pytest.raises(InvalidOptionError, match="on_error must be 'raise' or 'yield', got 'skip'"):
        engine.register_many(data, on_error="skip")


def test_error_of_the_pairs_iterable_reaches_the_caller(engine):
    def broken():
        yield pairs(1, start=80)[0]
        raise OSError("the data set's index is unreadable")

    stream = engine.register_many(broken(), io_iterations=None)
    next(stream)
    with pytest.raises(OSError, match="unreadable"):
        next(stream)


def test_leaving_early_stops_the_reading_thread(engine):
    def endless():
        seed = 100
        while True:
            seed += 2
            yield image(seed), image(seed + 1)

    stream = engine.register_many(endless(), batch_size=1, prefetch=1, io_iterations=None)
    next(stream)
    assert loader_threads()
    stream.close()
    assert wait_for_no_loader()


def test_options_are_checked_at_the_call(engine):
    with pytest.raises(InvalidOptionError, match="batch_size"):
        engine.register_many(pairs(1), batch_size=0)
    with pytest.raises(InvalidOptionError, match="whole numbers"):
        engine.register_many(pairs(1), prefetch="2")
    with pytest.raises(InvalidOptionError, match="modality"):
        engine.register_many(pairs(1), fixed_modality="pet")
    with pytest.raises(InvalidOptionError, match="model"):
        register_many(pairs(1), model="nope")
    with pytest.raises(InvalidOptionError, match="pair 0: expected"):
        list(engine.register_many([image(1)], io_iterations=None))
    with pytest.raises(InvalidOptionError, match="pair 0: a mapping"):
        list(engine.register_many([{"fixed": image(1), "moved": image(2)}], io_iterations=None))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_batches_are_pinned_on_cuda():
    net = random_network(SHAPE, narrow=True, seed=3, displacement_scale=0.5)
    gpu = Engine(weights=official_state_dict(net), config=net.config, device="cuda")
    cpu = Engine(weights=official_state_dict(net), config=net.config, device="cpu")
    data = pairs(3, start=120)
    seen = []
    original = gpu.predict_map

    def recording(moving, fixed):
        seen.append(moving.device.type)
        return original(moving, fixed)

    gpu.predict_map = recording
    streamed = list(gpu.register_many(data, batch_size=2, io_iterations=None))
    assert seen == ["cuda", "cuda"]
    volume = torch.rand(1, 1, 4, 4, 4)
    batches = list(_prefetched_batches(range(3), lambda i, item: _PreparedPair(None, None, volume, volume), 2, 1, pin=True))
    assert [len(b.pairs) for b in batches] == [2, 1]
    assert all(b.moving.is_pinned() and b.fixed.is_pinned() for b in batches)
    for ours, (fixed, moving) in zip(streamed, data):
        expected = cpu.register(fixed, moving, io_iterations=None)
        assert (ours.phi_ab - expected.phi_ab).abs().max() < 1e-3


# ---------------------------------------------------------------- mgr-engine register-many


def write_csv(folder, pairs_by_name):
    """Images as .nii.gz files beside a pairs.csv naming them relative to it."""
    lines = ["name,fixed,moving"]
    for name, (fixed, moving) in pairs_by_name.items():
        for role, value in (("fixed", fixed), ("moving", moving)):
            if isinstance(value, np.ndarray):
                value = itk.image_from_array(value)
            itk.imwrite(value, str(folder / f"{name}_{role}.nii.gz"))
        lines.append(f"{name},{name}_fixed.nii.gz,{name}_moving.nii.gz")
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")
    return folder / "pairs.csv"


def add_columns(csv_path, columns, values):
    """Append ``columns`` to a pairs CSV file; ``values(name)`` gives the pair's values of them."""
    rows = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([f"{rows[0]},{','.join(columns)}"] + [
        f"{row},{','.join(values(row.split(',')[0]))}" for row in rows[1:]]) + "\n")


def test_cli_writes_each_pairs_transform_as_register_does(tmp_path, caplog):
    from mgr_engine import cli
    from mgr_engine.engine import Engine

    data = dict(zip(("a", "b", "c"), pairs(3, start=140)))
    csv_path = write_csv(tmp_path, data)
    out = tmp_path / "out"
    command = ["-q", "register-many", "--pairs", str(csv_path), "--out_dir", str(out), "--model", "compact",
               "--batch_size", "2"]
    assert cli.main([*command, "--warped", "--inverse_transforms"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(["register_many.json", *(
        f"{n}_{kind}" for n in data for kind in ("transform.h5", "inverse_transform.h5", "warped.nii.gz"))])
    engine = Engine(model="compact", device="cpu")
    for name, (fixed, moving) in data.items():
        expected = engine.register(str(tmp_path / f"{name}_fixed.nii.gz"), str(tmp_path / f"{name}_moving.nii.gz"),
                                   io_iterations=None)
        for kind, transform, image in (("transform", expected.transform, fixed),
                                       ("inverse_transform", expected.inverse_transform, moving)):
            written = itk.transformread(str(out / f"{name}_{kind}.h5"))[0]
            for offset in ([12.0, 4.0, 15.0], [30.0, 30.0, 30.0]):  # inside the image the transform starts from
                point = np.array(image.GetOrigin()) + offset
                assert np.allclose(written.TransformPoint(point), transform.TransformPoint(point), atol=1e-3)
                # the network's displacement, not only the images' offset: the backward map is no exact inverse
                back = (expected.transform if kind == "inverse_transform" else expected.inverse_transform
                        ).TransformPoint(transform.TransformPoint(point))
                assert np.abs(np.array(back) - point).max() > 0.1
    # --resume with --inverse_transforms: a pair without its inverse file is registered again
    written = {name: (out / f"{name}_transform.h5").stat().st_mtime_ns for name in data}
    (out / "b_inverse_transform.h5").unlink()
    assert cli.main([*command, "--resume"]) == 0  # no inverse asked: every pair done
    assert not (out / "b_inverse_transform.h5").exists()
    with caplog.at_level(logging.INFO, logger="mgr_engine"):
        assert cli.main([*command, "--resume", "--inverse_transforms"]) == 0
    assert (out / "b_inverse_transform.h5").is_file()
    assert re.search(r"wrote the outputs of 3 pairs \(1 registered, 2 from their transform files\) to .*out in "
                     r"[0-9.]+ s: the first [0-9.]+ s \(start-up included\), then [0-9.]+ s a pair", caplog.text)
    assert [(out / f"{name}_transform.h5").stat().st_mtime_ns == written[name] for name in data] == [True, False, True]


def test_cli_takes_relative_paths_while_itk_changes_the_working_directory(tmp_path, monkeypatch):
    """ITK's lazy loader changes the working directory while it loads a module, in whichever
    thread: here the reading thread does so while it converts each image (for 0.2 s, a module
    loaded slowly), so the CSV's images and the outputs, named relative to the directory the
    command started in, must not be opened through it."""
    from mgr_engine import cli, itk_io

    data = dict(zip(("a", "b", "c"), pairs(3, start=330)))
    write_csv(tmp_path, data)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    voxel_array = itk_io.voxel_array

    def loading_a_module(image):
        back = os.getcwd()
        os.chdir(elsewhere)
        try:
            time.sleep(0.2)
            return voxel_array(image)
        finally:
            os.chdir(back)

    monkeypatch.setattr(itk_io, "voxel_array", loading_a_module)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["-q", "register-many", "--pairs", "pairs.csv", "--out_dir", "out", "--model", "compact",
                     "--warped"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(["register_many.json", *(
        f"{n}_{kind}" for n in data for kind in ("transform.h5", "warped.nii.gz"))])
    assert not any(elsewhere.iterdir())


def test_cli_stops_at_a_bad_pair_with_the_pairs_before_it_written(tmp_path, capsys):
    from mgr_engine import cli

    data = dict(zip(("a", "b", "c"), pairs(3, start=160)))
    data["b"] = (data["b"][0], np.full((30, 30, 30), 7.0, np.float32))  # constant moving image
    csv_path = write_csv(tmp_path, data)
    out = tmp_path / "out"
    assert cli.main(["-q", "register-many", "--pairs", str(csv_path), "--out_dir", str(out), "--model", "compact"]) == 2
    assert "pair 'b' (row 2): " in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["a_transform.h5", "register_many.json"]
    # with landmarks: the table of the pairs before the bad one is kept
    np.savetxt(tmp_path / "f.txt", np.full((2, 3), 10.0))
    add_columns(csv_path, ("fixed_points", "moving_points"), lambda name: ("f.txt", "f.txt"))
    assert cli.main(["-q", "register-many", "--pairs", str(csv_path), "--out_dir", str(out), "--model", "compact"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["a_f.txt", "a_transform.h5", "register_many.json", "tre.csv"]
    assert [line.split(",")[:2] for line in (out / "tre.csv").read_text().splitlines()[1:]] == [["a", "2"]]


def test_cli_keep_going_skips_the_pairs_that_fail_and_names_them(tmp_path, capsys, caplog):
    """--keep_going: a constant image and an unreadable file no longer stop a data set's run; the
    run ends with an error naming them, and --resume registers only them once mended."""
    from mgr_engine import cli

    data = dict(zip("abcd", pairs(4, start=190)))
    data["b"] = (data["b"][0], np.full((30, 30, 30), 7.0, np.float32))
    csv_path = write_csv(tmp_path, data)
    (tmp_path / "c_moving.nii.gz").write_bytes(b"not an image")
    out = tmp_path / "out"
    command = ["register-many", "--pairs", str(csv_path), "--out_dir", str(out), "--model", "compact",
               "--jacobian_stats", "--keep_going"]
    with caplog.at_level("ERROR", logger="mgr_engine"):
        assert cli.main(command) == 2
    assert "pair 'b' (row 2): moving image is constant (7)" in caplog.text
    assert "pair 'c' (row 3): ITK cannot read the moving image" in caplog.text
    assert "2 of 4 pairs failed and were skipped ('b', 'c'; their errors are logged above)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["a_transform.h5", "d_transform.h5", "jacobian.csv",
                                                     "register_many.json"]
    assert [row.split(",")[0] for row in (out / "jacobian.csv").read_text().splitlines()[1:]] == ["a", "d"]
    d_transform = (out / "d_transform.h5").read_bytes()
    itk.imwrite(itk.image_from_array(smooth_volume((30, 30, 30), 1)), str(tmp_path / "b_moving.nii.gz"))
    assert cli.main([*command, "--resume"]) == 2  # b mended, c still unreadable
    assert "1 of 4 pairs failed and were skipped ('c';" in capsys.readouterr().err
    assert (out / "b_transform.h5").is_file() and (out / "d_transform.h5").read_bytes() == d_transform
    assert [row.split(",")[0] for row in (out / "jacobian.csv").read_text().splitlines()[1:]] == ["a", "b", "d"]
    # every pair failing: a folder the run created is not left behind
    write_csv(tmp_path, {"c": data["c"]})
    (tmp_path / "c_moving.nii.gz").write_bytes(b"not an image")
    assert cli.main([*command[:4], str(tmp_path / "new"), *command[5:]]) == 2
    assert "1 of 1 pair failed" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_cli_stopped_at_its_first_pair_leaves_the_folder_as_it_was(tmp_path, capsys):
    """A run whose first pair fails wrote its record (register_many.json) all the same, with its
    options in place of those of the folder's pairs: now the record is written with the first
    pair's outputs, and a folder the run created is removed again."""
    from mgr_engine import cli

    data = dict(zip(("a", "b"), pairs(2, start=170)))
    csv_path = write_csv(tmp_path, data)
    command = ["-q", "register-many", "--pairs", str(csv_path), "--model", "compact", "--out_dir"]
    out = tmp_path / "out"
    assert cli.main([*command, str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_csv(tmp_path, {"a": (data["a"][0], np.full((30, 30, 30), 7.0, np.float32)), "b": data["b"]})
    for folder in (out, tmp_path / "new" / "out"):
        assert cli.main([*command, str(folder), "--moving_modality", "ct"]) == 2
        assert "pair 'a' (row 1): moving image is constant" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not (tmp_path / "new").exists()


def test_cli_resume_registers_only_the_pairs_left_and_tabulates_every_pair(tmp_path, capsys):
    import json

    from mgr_engine import cli

    data = dict(zip(("a", "b", "c"), pairs(3, start=240)))
    csv_path = write_csv(tmp_path, data)
    for name, (fixed, moving) in data.items():
        itk.imwrite(label_map(fixed), str(tmp_path / f"{name}_fl.nii.gz"))
        itk.imwrite(label_map(moving), str(tmp_path / f"{name}_ml.nii.gz"))
    np.savetxt(tmp_path / "points.txt", np.random.default_rng(5).uniform(5.0, 25.0, (4, 3)))
    add_columns(csv_path, ("fixed_points", "moving_points", "fixed_labels", "moving_labels"),
                lambda name: ("points.txt", "points.txt", f"{name}_fl.nii.gz", f"{name}_ml.nii.gz"))
    out = tmp_path / "out"
    command = ["-q", "register-many", "--pairs", str(csv_path), "--out_dir", str(out), "--model", "compact",
               "--warped", "--jacobian_stats"]
    assert cli.main(command) == 0
    tables = {name: (out / name).read_text() for name in ("tre.csv", "dice.csv", "jacobian.csv")}
    assert all(len(text.splitlines()) > 3 for text in tables.values())
    written = {name: (out / f"{name}_transform.h5").stat().st_mtime_ns for name in data}
    warped = {name: (out / f"{name}_warped.nii.gz").stat().st_mtime_ns for name in data}
    (out / "b_transform.h5").unlink()
    (out / "c_warped.nii.gz").unlink()
    for name in tables:
        (out / name).unlink()
    assert cli.main([*command, "--resume"]) == 0
    assert {name: (out / name).read_text() for name in tables} == tables  # a and c from their files: the same rows
    assert [(out / f"{name}_transform.h5").stat().st_mtime_ns == written[name] for name in data] == [True, False, True]
    # a resumed pair's warped image is kept; written where it is missing
    assert [(out / f"{name}_warped.nii.gz").stat().st_mtime_ns == warped.get(name) for name in data] == [
        True, False, False]
    # every pair done: no engine, so a checkpoint that does not exist is never read
    assert cli.main([*command, "--resume", "--network_weights", str(tmp_path / "missing.trch")]) == 0
    assert cli.main([*command, "--network_weights", str(tmp_path / "missing.trch")]) == 2
    # a transform file computed for other images is refused, not evaluated: by the files' SHA-256
    # that register_many.json records, and without a record (an earlier version's) by their grids
    itk.imwrite(data["a"][1], str(tmp_path / "c_moving.nii.gz"))
    capsys.readouterr()
    assert cli.main([*command, "--resume"]) == 2
    assert re.search(r"pair 'c': its moving is not the file .*c_transform.h5' was computed from",
                     capsys.readouterr().err)
    record = json.loads((out / "register_many.json").read_text())
    del record["inputs"]
    (out / "register_many.json").write_text(json.dumps(record))
    assert cli.main([*command, "--resume"]) == 2
    assert re.search(r"pair 'c': .*c_transform.h5' was computed for another moving image", capsys.readouterr().err)


def test_cli_resume_refuses_pairs_registered_with_other_options(tmp_path, capsys, caplog):
    import hashlib
    import json
    import shutil

    import mgr_engine
    from mgr_engine import cli
    from mgr_engine.engine import BUNDLED_WEIGHTS

    csv_path = write_csv(tmp_path, dict(zip(("a", "b"), pairs(2, start=270))))
    out = tmp_path / "out"
    command = ["-q", "register-many", "--pairs", str(csv_path), "--out_dir", str(out), "--model", "compact"]
    assert cli.main(command) == 0
    record = json.loads((out / "register_many.json").read_text())
    assert record["weights_sha256"] == hashlib.sha256(BUNDLED_WEIGHTS["compact"].read_bytes()).hexdigest()
    assert (record["model"], record["io_iterations"], "io_sim" in record) == ("compact", None, False)
    assert record["mgr_engine"] == mgr_engine.__version__  # recorded, not compared

    def resumed(*options):
        (out / "b_transform.h5").unlink(missing_ok=True)
        return cli.main([*command, "--resume", *options])

    other_weights = tmp_path / "other.safetensors"
    other_weights.write_bytes(b"not read: refused by its SHA-256 before it is loaded")
    for options, message in ((["--io_iterations", "2"], "io_iterations=None, not 2 as now"),
                             (["--moving_modality", "ct"], "moving_modality='mri', not 'ct' as now"),
                             (["--match_orientation"], "match_orientation=False, not True as now"),
                             (["--network_weights", str(other_weights)],
                              f"weights_sha256='{record['weights_sha256']}', not '.*' as now \\(their checkpoint: "
                              f"'{BUNDLED_WEIGHTS['compact'].resolve()}'\\)")):
        assert resumed(*options) == 2
        assert re.search(f"--resume: the pairs in '.*out' were registered with {message}", capsys.readouterr().err)
        assert not (out / "b_transform.h5").exists()
    # the same weights elsewhere are the same weights; the record names the file this run read
    moved_weights = tmp_path / "copy.safetensors"
    shutil.copy(BUNDLED_WEIGHTS["compact"], moved_weights)
    assert resumed("--network_weights", str(moved_weights)) == 0
    assert json.loads((out / "register_many.json").read_text())["network_weights"] == str(moved_weights.resolve())
    # without masks, --masking changes no registration: not recorded, not compared
    assert "masking" not in record and resumed("--masking", "input") == 0
    # every pair done: the options are compared, the weights are not read
    assert cli.main([*command, "--resume", "--io_iterations", "2"]) == 2
    assert cli.main([*command, "--resume", "--network_weights", str(other_weights)]) == 0
    # an earlier version's folder, without a record: resumed with a warning, then recorded
    (out / "register_many.json").unlink()
    with caplog.at_level("WARNING", logger="mgr_engine"):
        assert resumed("--io_iterations", "2") == 0
    assert "register_many.json is missing, so that the pairs registered there had the same model" in caplog.text
    assert json.loads((out / "register_many.json").read_text())["io_iterations"] == 2
    (out / "register_many.json").write_text("{")
    assert resumed() == 2
    assert "cannot read" in capsys.readouterr().err
    # with masks, input masking changes the registrations: recorded and compared
    mask = itk.image_from_array(np.ones((40, 48, 44), np.uint8))
    mask.CopyInformation(itk.imread(str(tmp_path / "a_fixed.nii.gz")))
    itk.imwrite(mask, str(tmp_path / "a_mask.nii.gz"))
    add_columns(csv_path, ("fixed_mask",), lambda name: ("a_mask.nii.gz" if name == "a" else "",))
    command[command.index("--out_dir") + 1] = str(out / "masked")
    assert cli.main([*command, "--masking", "input"]) == 0
    out = out / "masked"
    assert json.loads((out / "register_many.json").read_text())["masking"] == "input"
    assert resumed("--masking", "both") == 2
    assert "masking='input', not 'both' as now" in capsys.readouterr().err


def test_cli_io_precision_is_used_recorded_and_compared_on_resume(tmp_path, capsys, monkeypatch):
    """register-many's --io_precision reaches instance optimization and register_many.json; a
    record from before the option (IO options without it) stands for fp32, the only IO then."""
    import json

    from mgr_engine import cli

    asked = recorded_io_precisions(monkeypatch, Engine)
    write_csv(tmp_path, dict(zip(("a", "b"), pairs(2, start=400))))
    out = tmp_path / "out"
    command = ["-q", "register-many", "--pairs", str(tmp_path / "pairs.csv"), "--out_dir", str(out), "--model",
               "compact", "--io_iterations", "1"]
    assert cli.main([*command, "--io_precision", "tf32"]) == 0
    assert asked == ["tf32", "tf32"]
    assert json.loads((out / "register_many.json").read_text())["io_precision"] == "tf32"

    def resumed(*options):
        (out / "b_transform.h5").unlink(missing_ok=True)
        return cli.main([*command, "--resume", *options])

    assert resumed() == 2
    assert "were registered with io_precision='tf32', not 'fp32' as now" in capsys.readouterr().err
    assert resumed("--io_precision", "tf32") == 0 and asked == ["tf32", "tf32", "tf32"]
    record = json.loads((out / "register_many.json").read_text())
    del record["io_precision"]  # as written before --io_precision
    (out / "register_many.json").write_text(json.dumps(record))
    assert resumed("--io_precision", "tf32") == 2
    assert "were registered with io_precision='fp32', not 'tf32' as now" in capsys.readouterr().err
    assert resumed() == 0 and asked == ["tf32", "tf32", "tf32", "fp32"]
    assert json.loads((out / "register_many.json").read_text())["io_precision"] == "fp32"
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--io_precision", "bf16"])
    assert exit_.value.code == 2 and "--io_precision: invalid choice: 'bf16'" in capsys.readouterr().err


def test_cli_resume_refuses_a_transform_computed_from_other_voxels_on_the_same_grid(tmp_path, capsys, monkeypatch):
    """The grid check cannot see an image re-exported (a new skull strip, another reconstruction)
    on the same grid: register_many.json records each pair's input files by SHA-256."""
    import hashlib
    import json

    from mgr_engine import cli

    data = dict(zip(("a", "b"), pairs(2, start=300)))
    csv_path = write_csv(tmp_path, data)
    out = tmp_path / "out"
    command = ["-q", "register-many", "--pairs", str(csv_path), "--out_dir", str(out), "--model", "compact", "--resume"]
    assert cli.main(command) == 0
    inputs = json.loads((out / "register_many.json").read_text())["inputs"]
    assert sorted(inputs) == ["a", "b"] and sorted(inputs["b"]) == ["fixed", "moving"]
    moving = tmp_path / "b_moving.nii.gz"
    assert inputs["b"]["moving"]["sha256"] == hashlib.sha256(moving.read_bytes()).hexdigest()
    transform = (out / "b_transform.h5").read_bytes()
    original = moving.read_bytes()
    other = image(999, shape=(36, 50, 41))  # the same grid as b's moving image, other voxels
    other.SetOrigin(data["b"][1].GetOrigin())
    itk.imwrite(other, str(moving))
    assert cli.main(command) == 2
    assert re.search(r"--resume: pair 'b': its moving is not the file '.*b_transform.h5' was computed from",
                     capsys.readouterr().err)
    assert (out / "b_transform.h5").read_bytes() == transform
    # the same bytes again, with a new modification time (a copy, a touch): compared, taken, and
    # recorded with that time, the rest of the record as it was
    moving.write_bytes(original)
    os.utime(moving, ns=(time.time_ns(), time.time_ns() + 10**9))
    before = json.loads((out / "register_many.json").read_text())
    assert cli.main([*command, "--warped"]) == 0
    after = json.loads((out / "register_many.json").read_text())
    assert after["inputs"]["b"]["moving"] == {**inputs["b"]["moving"], "mtime_ns": moving.stat().st_mtime_ns}
    assert {**after, "inputs": None} == {**before, "inputs": None} and after["inputs"]["a"] == inputs["a"]
    # a file whose size and time match its record is not read again: the next resume hashes nothing
    monkeypatch.setattr(hashlib, "sha256", lambda: pytest.fail("hashed again"))
    assert cli.main(command) == 0
    assert cli._input_digests("b", {"moving": str(moving)}, after["inputs"]["b"]) == {
        "moving": after["inputs"]["b"]["moving"]}


def test_cli_resume_keeps_the_records_of_pairs_its_table_leaves_out(tmp_path):
    """A folder resumed with a table of some of its pairs (and new ones) keeps the input records of
    the others: their transform files are still there, to be resumed, and checked, later."""
    import json

    from mgr_engine import cli

    header, *rows = write_csv(tmp_path, dict(zip(("a", "b", "c"), pairs(3, start=340)))).read_text().splitlines()
    out = tmp_path / "out"
    command = ["-q", "register-many", "--out_dir", str(out), "--model", "compact", "--resume", "--pairs"]
    for table in ((rows[0], rows[1]), (rows[0], rows[2])):  # a and b; then a, resumed, and c
        (tmp_path / "some.csv").write_text("\n".join([header, *table]) + "\n")
        assert cli.main([*command, str(tmp_path / "some.csv")]) == 0
    assert sorted(json.loads((out / "register_many.json").read_text())["inputs"]) == ["a", "b", "c"]


def test_cli_resume_registers_again_what_a_run_with_other_options_left_unrecorded(tmp_path, caplog):
    """A run without --resume replaces the folder's record with its options: the records of the
    pairs it leaves out are kept where they were registered with the same options; otherwise
    they are dropped (logged), and a later --resume registers those pairs again rather than take
    their transforms for this run's."""
    import json

    from mgr_engine import cli

    header, *rows = write_csv(tmp_path, dict(zip(("a", "b"), pairs(2, start=360)))).read_text().splitlines()
    (tmp_path / "a.csv").write_text("\n".join([header, rows[0]]) + "\n")
    out = tmp_path / "out"
    command = ["-q", "register-many", "--out_dir", str(out), "--model", "compact", "--pairs"]

    def recorded_pairs():
        return sorted(json.loads((out / "register_many.json").read_text())["inputs"])

    assert cli.main([*command, str(tmp_path / "pairs.csv")]) == 0
    assert cli.main([*command, str(tmp_path / "a.csv")]) == 0  # the same options: b's record kept
    assert recorded_pairs() == ["a", "b"]
    b_transform = (out / "b_transform.h5").read_bytes()
    with caplog.at_level("INFO", logger="mgr_engine"):
        assert cli.main([*command, str(tmp_path / "a.csv"), "--moving_modality", "ct"]) == 0
        assert re.search(r"1 pair in .*out that this table does not list \(b, \.\.\.\) had been registered with "
                         "other options", caplog.text)
        assert recorded_pairs() == ["a"]
        caplog.clear()
        assert cli.main([*command, str(tmp_path / "pairs.csv"), "--moving_modality", "ct", "--resume"]) == 0
    assert "registering again 1 pair whose transform register_many.json does not list (b, ...;" in caplog.text
    assert "1 of 2 pairs registered by an earlier run" in caplog.text
    assert recorded_pairs() == ["a", "b"] and (out / "b_transform.h5").read_bytes() != b_transform
    # an unreadable record is replaced by a run without --resume (refused by one with it)
    (out / "register_many.json").write_text("{")
    with caplog.at_level("WARNING", logger="mgr_engine"):
        assert cli.main([*command, str(tmp_path / "a.csv")]) == 0
    assert "register_many.json (Expecting property name" in caplog.text and recorded_pairs() == ["a"]


def test_cli_refused_by_the_engine_leaves_the_folder_as_it_was(tmp_path, capsys):
    """An option the engine refuses, or a checkpoint it cannot load, came after the folder's
    record had been replaced with this run's options (and the other pairs' input records
    dropped): the engine is now built and its options checked before anything is written, and a
    folder the run created for its outputs is removed again."""
    import torch

    from mgr_engine import cli

    write_csv(tmp_path, dict(zip(("a", "b"), pairs(2, start=380))))
    out = tmp_path / "out"
    command = ["-q", "register-many", "--pairs", str(tmp_path / "pairs.csv"), "--out_dir", str(out), "--model",
               "compact"]
    assert cli.main(command) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    torch.save({"not": torch.zeros(1)}, tmp_path / "other.trch")
    for options, message in ((["--batch_size", "0"], "batch_size and prefetch must be whole numbers"),
                             (["--io_iterations", "1", "--io_lr", "0"],
                              "io_lr must be a positive finite number, got 0"),
                             (["--network_weights", str(tmp_path / "other.trch")], "checkpoint")):
        assert cli.main([*command, *options]) == 2
        assert message in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before, options
        # into a folder the run would create: none is left behind
        new = tmp_path / "new" / "out"
        assert cli.main([*command[:-3], str(new), *command[-2:], *options]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "new").exists(), options


def test_cli_names_the_pair_whose_input_is_gone_once_registered(tmp_path, capsys, monkeypatch):
    """register-many records the files a pair was registered from after its registration: a file
    gone by then is an ImageReadError naming the pair, and that pair's transform is not written."""
    from mgr_engine import cli, engine

    data = dict(zip(("a", "b"), pairs(2, start=360)))
    csv_path = write_csv(tmp_path, data)
    out = tmp_path / "out"
    register_many = engine.Engine.register_many

    def deleting_b_moving_once_read(self, *args, **kwargs):
        for index, result in enumerate(register_many(self, *args, **kwargs)):
            if index == 1:
                (tmp_path / "b_moving.nii.gz").unlink()
            yield result

    monkeypatch.setattr(engine.Engine, "register_many", deleting_b_moving_once_read)
    assert cli.main(["-q", "register-many", "--pairs", str(csv_path), "--out_dir", str(out), "--model", "compact"]) == 2
    assert re.search(r"error: pair 'b': cannot read '.*b_moving.nii.gz' \(No such file or directory\) to record",
                     capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == ["a_transform.h5", "register_many.json"]


def test_cli_moves_each_pairs_landmarks_and_tabulates_the_error(tmp_path):
    from mgr_engine import cli, points

    data = dict(zip(("a", "b"), pairs(2, start=180)))
    csv_path = write_csv(tmp_path, data)
    rng = np.random.default_rng(3)
    targets = {}
    for name in data:
        at = rng.uniform(3.0, 25.0, (6, 3))  # mm, inside the fixed images
        points.write_points(at, tmp_path / f"{name}_fixed.csv")
        targets[name] = at + rng.normal(size=(6, 3))  # stand-ins for the moving image's landmarks
        points.write_points(targets[name], tmp_path / f"{name}_moving.csv")
    add_columns(csv_path, ("fixed_points", "moving_points"), lambda name: (f"{name}_fixed.csv", f"{name}_moving.csv"))
    out = tmp_path / "out"
    assert cli.main(["-q", "register-many", "--pairs", str(csv_path), "--out_dir", str(out), "--model", "compact"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_a_fixed.csv", "a_transform.h5", "b_b_fixed.csv",
                                                     "b_transform.h5", "register_many.json", "tre.csv"]
    table = np.loadtxt(out / "tre.csv", delimiter=",", skiprows=1, usecols=(1, 2, 3, 4, 5))
    for row, name in zip(table, data):
        fixed = points.read_points(tmp_path / f"{name}_fixed.csv").points
        moved = points.transform_points(out / f"{name}_transform.h5", fixed)
        np.testing.assert_allclose(points.read_points(out / f"{name}_{name}_fixed.csv").points, moved, atol=1e-9)
        assert np.abs(moved - fixed).max() > 0.1, "the test wants transforms that move points"
        after = np.linalg.norm(moved - targets[name], axis=1)
        before = np.linalg.norm(fixed - targets[name], axis=1)
        np.testing.assert_allclose(row, [6, before.mean(), after.mean(), np.median(after), after.max()], atol=1e-9)


def test_cli_takes_landmarks_as_voxel_indices_of_each_pairs_images(tmp_path):
    """--points_in_voxels: fixed_points are indices of the pair's fixed image, moving_points and
    the moved points indices of its moving image (spacings and origins differ); errors in mm."""
    from mgr_engine import cli, points

    csv_path = write_csv(tmp_path, dict(zip(("a",), pairs(1, start=200))))
    rng = np.random.default_rng(4)
    indices = rng.uniform(4.0, 30.0, (5, 3))  # 1-based (i, j, k)
    target_indices = indices + rng.normal(size=(5, 3))
    np.savetxt(tmp_path / "f.txt", indices)
    np.savetxt(tmp_path / "m.txt", target_indices)
    add_columns(csv_path, ("fixed_points", "moving_points"), lambda name: ("f.txt", "m.txt"))
    out = tmp_path / "out"
    assert cli.main(["-q", "register-many", "--pairs", str(csv_path), "--out_dir", str(out), "--model", "compact",
                     "--points_in_voxels", "--index_base", "1"]) == 0
    fixed, moving = tmp_path / "a_fixed.nii.gz", tmp_path / "a_moving.nii.gz"
    moved = points.transform_points(out / "a_transform.h5", points.indices_to_points(indices, fixed, 1))
    np.testing.assert_allclose(np.loadtxt(out / "a_f.txt"), points.points_to_indices(moved, moving, 1), atol=1e-9)
    targets = points.indices_to_points(target_indices, moving, 1)
    before = np.linalg.norm(points.indices_to_points(indices, fixed, 1) - targets, axis=1)
    after = np.linalg.norm(moved - targets, axis=1)
    table = np.loadtxt(out / "tre.csv", delimiter=",", skiprows=1, usecols=(1, 2, 3, 4, 5))
    np.testing.assert_allclose(table, [5, before.mean(), after.mean(), np.median(after), after.max()], atol=1e-9)
    assert np.abs(np.linalg.norm(target_indices - indices, axis=1) - before).max() > 0.5, "indices are not mm here"


def label_map(image_, thresholds=(200.0, 350.0, 500.0)):
    """A segmentation on ``image_``'s grid: its intensities cut into labels 0-3 (uint8)."""
    labels = itk.image_from_array(np.digitize(itk.array_from_image(image_), thresholds).astype(np.uint8))
    labels.CopyInformation(image_)
    return labels


def test_cli_warps_each_pairs_labels_and_tabulates_their_dice(tmp_path):
    from mgr_engine import cli, itk_io
    from mgr_engine.labels import dice_per_label

    data = dict(zip(("a", "b"), pairs(2, start=210)))
    csv_path = write_csv(tmp_path, data)
    for name, (fixed, moving) in data.items():
        itk.imwrite(label_map(fixed), str(tmp_path / f"{name}_fixed_labels.nii.gz"))
        itk.imwrite(label_map(moving), str(tmp_path / f"{name}_moving_labels.nii.gz"))
    add_columns(csv_path, ("fixed_labels", "moving_labels"),
                lambda name: (f"{name}_fixed_labels.nii.gz", f"{name}_moving_labels.nii.gz"))
    out = tmp_path / "out"
    assert cli.main(["-q", "register-many", "--pairs", str(csv_path), "--out_dir", str(out), "--model", "compact"]) == 0
    table = np.genfromtxt(out / "dice.csv", delimiter=",", skip_header=1, dtype=None, encoding="utf-8")
    assert [tuple(row)[:2] for row in table] == [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2), ("b", 3)]
    for name in data:
        fixed = itk_io.read_image(tmp_path / f"{name}_fixed.nii.gz")
        moving_labels = itk_io.read_image(tmp_path / f"{name}_moving_labels.nii.gz")
        reference = itk.array_from_image(itk_io.read_image(tmp_path / f"{name}_fixed_labels.nii.gz"))
        # ITK's ResampleImageFilter (nearest) through the written transform is the oracle of the warp
        expected = itk_io.resample(moving_labels, itk_io.read_transform(out / f"{name}_transform.h5"), fixed, "nearest")
        warped = itk_io.read_image(out / f"{name}_warped_labels.nii.gz")
        assert type(warped) is type(moving_labels)  # uint8 kept
        np.testing.assert_array_equal(itk.array_from_image(warped), itk.array_from_image(expected))
        unregistered = itk_io.resample(moving_labels, itk_io.identity_transform(), fixed, "nearest")
        before = dice_per_label(itk.array_from_image(unregistered), reference)
        after = dice_per_label(itk.array_from_image(warped), reference)
        rows = [tuple(row)[1:] for row in table if row[0] == name]
        np.testing.assert_allclose(rows, [(label, before[label], after[label]) for label in (1, 2, 3)], atol=1e-12)
        assert before != after, "the test wants transforms that move the labels"


def test_cli_names_the_pair_whose_outputs_fail(tmp_path, capsys):
    """An error while a pair's outputs are made (here its moving labels numbered otherwise than
    its fixed ones) named no pair: which of a data set's rows to mend was left to guess."""
    from mgr_engine import cli

    data = dict(zip(("a", "b"), pairs(2, start=220)))
    csv_path = write_csv(tmp_path, data)
    for name, (fixed, moving) in data.items():
        itk.imwrite(label_map(fixed), str(tmp_path / f"{name}_fixed_labels.nii.gz"))
        labels = label_map(moving)
        if name == "b":  # labels 11-13 for 1-3
            view = itk.array_view_from_image(labels)
            view[view > 0] += 10
        itk.imwrite(labels, str(tmp_path / f"{name}_moving_labels.nii.gz"))
    add_columns(csv_path, ("fixed_labels", "moving_labels"),
                lambda name: (f"{name}_fixed_labels.nii.gz", f"{name}_moving_labels.nii.gz"))
    out = tmp_path / "out"
    assert cli.main(["-q", "register-many", "--pairs", str(csv_path), "--out_dir", str(out), "--model",
                     "compact"]) == 2
    assert ("error: pair 'b': the fixed and moving labels share no label (fixed: 1, 2, 3; the moving labels on the "
            "fixed grid: 11, 12, 13)") in capsys.readouterr().err
    assert (out / "a_transform.h5").is_file() and not (out / "b_transform.h5").exists()  # b's outputs: none
    # --keep_going skips it as it skips a pair that fails to register; a third pair after it is written
    data["c"] = data["a"]
    for role in ("fixed", "moving"):
        for kind in ("", "_labels"):
            (tmp_path / f"c_{role}{kind}.nii.gz").write_bytes((tmp_path / f"a_{role}{kind}.nii.gz").read_bytes())
    csv_path.write_text(csv_path.read_text() + "c,c_fixed.nii.gz,c_moving.nii.gz,c_fixed_labels.nii.gz,"
                                               "c_moving_labels.nii.gz\n")
    assert cli.main(["-q", "register-many", "--pairs", str(csv_path), "--out_dir", str(out), "--model", "compact",
                     "--keep_going"]) == 2
    assert "1 of 3 pairs failed and were skipped ('b';" in capsys.readouterr().err
    assert (out / "c_transform.h5").is_file() and not (out / "b_transform.h5").exists()
    assert [row.split(",")[0] for row in (out / "dice.csv").read_text().splitlines()[1:]] == ["a"] * 3 + ["c"] * 3


@pytest.mark.parametrize("physical", [False, True])
def test_cli_tabulates_each_transforms_jacobian(tmp_path, physical):
    from helpers import oblique_image
    from mgr_engine import cli, itk_io, resample

    data = {name: tuple(oblique_image(itk.array_from_image(image), image.GetSpacing(), image.GetOrigin(), angles)
                        for image, angles in zip(pair, ((0.3, -0.2, 0.25), (-0.1, 0.2, 0.1))))
            for name, pair in zip(("a", "b"), pairs(2, start=230))}
    out = tmp_path / "out"
    assert cli.main(["-q", "register-many", "--pairs", str(write_csv(tmp_path, data)), "--out_dir", str(out),
                     "--model", "compact", "--jacobian_stats", *(["--physical_jacobian"] if physical else [])]) == 0
    table = np.genfromtxt(out / "jacobian.csv", delimiter=",", names=True, dtype=None, encoding="utf-8")
    assert table.dtype.names == ("name", "min", "max", "folds_percent", "sd_log_jacobian")
    for row, name in zip(table, data):
        # the jacobian command's computation from the written transform
        grid = itk_io.grid_transform(itk_io.read_transform(out / f"{name}_transform.h5"))
        fixed = itk_io.read_image(tmp_path / f"{name}_fixed.nii.gz")
        summaries = {kind: resample.jacobian_summary(itk.array_from_image(
            itk_io.grid_jacobian_determinant(grid, fixed, kind))) for kind in (False, True)}
        assert row[0] == name
        np.testing.assert_allclose(tuple(row)[1:], summaries[physical], rtol=1e-6, atol=1e-9)
        assert row[4] > 0.0  # the transforms are not the identity
        assert abs(summaries[True][1] - summaries[False][1]) > 1e-4, "oblique grids: the two kinds differ"
    # resumed, the oblique pairs' transform files pass the image check and give the same table
    table_text = (out / "jacobian.csv").read_text()
    assert cli.main(["-q", "register-many", "--pairs", str(tmp_path / "pairs.csv"), "--out_dir", str(out),
                     "--model", "compact", "--jacobian_stats", "--resume",
                     *(["--physical_jacobian"] if physical else [])]) == 0
    assert (out / "jacobian.csv").read_text() == table_text


def test_cli_writes_each_pairs_field_and_jacobian_in_the_format_asked(tmp_path, capsys, monkeypatch):
    nibabel = pytest.importorskip("nibabel")
    from mgr_engine import cli, itk_io

    data = dict(zip(("a", "b"), pairs(2, start=250)))
    csv_path = write_csv(tmp_path, data)
    out = tmp_path / "out"
    command = ["-q", "register-many", "--pairs", str(csv_path), "--out_dir", str(out), "--model", "compact"]
    assert cli.main([*command, "--displacement_fields", "--jacobians", "--image_format", "nrrd"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(["register_many.json", *(
        f"{n}_{kind}" for n in data for kind in ("transform.h5", "displacement.nrrd", "jacobian.nrrd"))])
    written = {}
    for name in data:
        transform = itk_io.read_transform(out / f"{name}_transform.h5")
        field = itk_io.read_image(out / f"{name}_displacement.nrrd")
        array = itk.array_from_image(field)
        fixed = itk_io.read_image(tmp_path / f"{name}_fixed.nii.gz")
        assert field.GetSpacing() == fixed.GetSpacing() and field.GetOrigin() == fixed.GetOrigin()
        for index in ((0, 0, 0), (30, 17, 5), (43, 47, 39)):  # (i, j, k); the array is (k, j, i)
            point = np.array(field.TransformIndexToPhysicalPoint(index))
            np.testing.assert_allclose(array[index[::-1]], np.array(transform.TransformPoint(point)) - point, atol=1e-4)
        assert np.abs(array).max() > 0.1, "the test wants transforms that move points"
        jacobian = itk.array_from_image(itk_io.read_image(out / f"{name}_jacobian.nrrd"))
        np.testing.assert_array_equal(jacobian, itk.array_from_image(
            itk_io.grid_jacobian_determinant(itk_io.grid_transform(transform), fixed, False)))
        written[name] = array, jacobian
    # resumed: a missing field is computed from the transform file, the same voxels
    (out / "a_displacement.nrrd").unlink()
    kept = (out / "b_displacement.nrrd").stat().st_mtime_ns
    assert cli.main([*command, "--displacement_fields", "--image_format", "nrrd", "--resume"]) == 0
    np.testing.assert_array_equal(itk.array_from_image(itk_io.read_image(out / "a_displacement.nrrd")),
                                  written["a"][0])
    assert (out / "b_displacement.nrrd").stat().st_mtime_ns == kept
    # both missing: the Jacobian of the field just computed, not of a second one computed slab by slab
    for kind in ("displacement", "jacobian"):
        (out / f"a_{kind}.nrrd").unlink()
    with monkeypatch.context() as patch:
        patch.setattr(itk_io, "grid_jacobian_determinant", lambda *args, **kwargs: pytest.fail("a second field"))
        assert cli.main([*command, "--displacement_fields", "--jacobians", "--image_format", "nrrd", "--resume"]) == 0
    for index, kind in enumerate(("displacement", "jacobian")):
        np.testing.assert_array_equal(itk.array_from_image(itk_io.read_image(out / f"a_{kind}.nrrd")),
                                      written["a"][index])
    # FreeSurfer's format through nibabel (its array's axes: i, j, k); no displacement field there
    assert cli.main([*command, "--jacobians", "--image_format", "mgz", "--resume"]) == 0
    for name in data:
        np.testing.assert_array_equal(np.asarray(nibabel.load(out / f"{name}_jacobian.mgz").dataobj).transpose(),
                                      written[name][1])
    capsys.readouterr()
    assert cli.main([*command, "--displacement_fields", "--image_format", "mgz", "--resume"]) == 2
    assert "--image_format mgz cannot hold --displacement_fields" in capsys.readouterr().err
    assert cli.main([*command, "--physical_jacobian"]) == 2
    assert "--physical_jacobian needs --jacobian_stats or --jacobians" in capsys.readouterr().err


def assert_refused_before_registering(csv_path, capsys, cases):
    """For each ``(columns, values, message)``: the one-pair CSV with those columns appended to its
    header and values to its row makes register-many exit 2 with ``message`` (a regex) before it
    creates its output folder."""
    from mgr_engine import cli

    rows = csv_path.read_text().splitlines()
    out = csv_path.parent / "out"
    for columns, values, message in cases:
        csv_path.write_text(f"{rows[0]}{columns}\n{rows[1]}{values}\n")
        assert cli.main(["register-many", "--pairs", str(csv_path), "--out_dir", str(out), "--model", "compact"]) == 2
        assert re.search(message, capsys.readouterr().err)
        assert not out.exists()


def test_cli_checks_the_label_maps_before_registering(tmp_path, capsys):
    from mgr_engine import itk_io

    fixed, moving = pairs(1, start=220)[0]
    csv_path = write_csv(tmp_path, {"a": (fixed, moving)})
    itk.imwrite(label_map(moving), str(tmp_path / "moving_labels.nii.gz"))  # not on the fixed grid
    for role, value in (("fixed", fixed), ("moving", moving)):
        itk_io.write_image(value, tmp_path / f"a_{role}.mgz")  # FreeSurfer's, which ITK does not read
    assert_refused_before_registering(csv_path, capsys, (
        (",fixed_labels,moving_labels", ",moving_labels.nii.gz,moving_labels.nii.gz", "pair 'a': fixed labels .* size"),
        (",fixed_labels", ",moving_labels.nii.gz", "fixed_labels without moving_labels"),
        (",moving_labels", ",nothing.nii.gz", "pair 'a': moving labels image .* does not exist"),
        # the images themselves in the label columns: float intensities, not labels
        (",fixed_labels,moving_labels", ",a_fixed.nii.gz,a_moving.nii.gz", "pair 'a': moving labels .* whole"),
        (",fixed_labels,moving_labels", ",a_fixed.mgz,a_moving.mgz", "pair 'a': moving labels .* whole")))


def test_label_maps_as_freesurfer_files_are_checked_as_nifti_ones(tmp_path):
    """FreeSurfer's .mgz label maps (aseg, aparc+aseg) pass the check before registering, and an
    .mgz of intensities is refused as a NIfTI one is (ITK, which typed the voxels, reads no MGH)."""
    from mgr_engine import cli, itk_io

    fixed, moving = pairs(1, start=220)[0]
    for name, value in (("fixed_labels", label_map(fixed)), ("moving_labels", label_map(moving)),
                        ("fixed_float_labels", itk.cast_image_filter(label_map(fixed), ttype=(
                            type(label_map(fixed)), itk.Image[itk.F, 3]))), ("intensities", moving)):
        itk_io.write_image(value, tmp_path / f"{name}.mgz")
    itk_io.write_image(fixed, tmp_path / "fixed.nii.gz")
    pair = {"fixed": str(tmp_path / "fixed.nii.gz")}
    for fixed_labels in ("fixed_labels", "fixed_float_labels"):  # whole numbers as float32: labels too
        cli._check_labels(["a"], [pair], [(str(tmp_path / f"{fixed_labels}.mgz"), str(tmp_path / "moving_labels.mgz"))])
    with pytest.raises(InvalidImageError, match="pair 'a': moving labels .*intensities.mgz.* whole"):
        cli._check_labels(["a"], [pair], [(str(tmp_path / "fixed_labels.mgz"), str(tmp_path / "intensities.mgz"))])


def test_cli_checks_the_landmarks_before_registering(tmp_path, capsys):
    from mgr_engine import points

    csv_path = write_csv(tmp_path, dict(zip(("a",), pairs(1, start=190))))
    points.write_points(np.ones((4, 3)), tmp_path / "f.csv")
    points.write_points(np.ones((3, 3)), tmp_path / "m.csv")
    assert_refused_before_registering(csv_path, capsys, (
        (",fixed_points,moving_points", ",f.csv,m.csv", "pair 'a': 4 points against 3"),
        (",moving_points", ",m.csv", "moving_points without fixed_points"),
        (",fixed_points", ",nothing.csv", "pair 'a': points file .* does not exist")))


def test_cli_finds_a_missing_input_before_registering_any_pair(tmp_path, capsys, monkeypatch):
    from mgr_engine import cli, engine

    csv_path = write_csv(tmp_path, dict(zip(("a", "b"), pairs(2, start=380))))
    add_columns(csv_path, ("moving_mask",), lambda name: ("" if name == "a" else "b_mask.nii.gz",))
    monkeypatch.setattr(engine, "Engine", lambda *a, **k: pytest.fail("the engine was built"))
    assert cli.main(["-q", "register-many", "--pairs", str(csv_path), "--out_dir", str(tmp_path / "out"),
                     "--model", "compact"]) == 2
    assert re.search(r"error: pair 'b' \(row 2\): moving mask '.*b_mask.nii.gz' does not exist; check the path",
                     capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_cli_reads_a_pairs_file_as_spreadsheets_save_it(tmp_path):
    """UTF-8 with a byte order mark, semicolons (where the comma is the decimal mark), CRLF line
    ends, a space after each separator, and a folder name beyond ASCII."""
    from mgr_engine import cli

    folder = tmp_path / "Patient Müller"
    folder.mkdir()
    write_csv(folder, dict(zip(("a",), pairs(1, start=280))))
    (tmp_path / "pairs.csv").write_bytes("\ufeffname; fixed; moving\r\na; Patient Müller/a_fixed.nii.gz; "
                                         "Patient Müller/a_moving.nii.gz\r\n".encode("utf-8"))
    out = tmp_path / "out"
    assert cli.main(["-q", "register-many", "--pairs", str(tmp_path / "pairs.csv"), "--out_dir", str(out),
                     "--model", "compact"]) == 0
    assert (out / "a_transform.h5").is_file()
    tabs = "fixed\tmoving\nPatient Müller/a_fixed.nii.gz\tPatient Müller/a_moving.nii.gz\n"
    (tmp_path / "pairs.tsv").write_text(tabs, encoding="utf-8")
    assert cli._read_pairs_csv(tmp_path / "pairs.tsv")[1][0]["moving"] == str(folder / "a_moving.nii.gz")
    # rows of empty cells, as spreadsheets export below a table, are not pairs
    (tmp_path / "pairs.csv").write_text("name,fixed,moving\na,x,y\n,,\n,,\n")
    assert cli._read_pairs_csv(tmp_path / "pairs.csv")[0] == ["a"]


@pytest.mark.parametrize("text,message", [("fixed,target\nx,y\n", "columns fixed and moving"),
                                          ("fixed,moving\n", "at least one pair"),
                                          ("name,fixed,moving\na,x,y\na,z,w\n", "repeats 'a'"),
                                          ("name,fixed,moving\nSub01,x,y\nb,u,v\nsub01,z,w\n",
                                           "the names 'Sub01' and 'sub01' differ only in case; on macOS"),
                                          ("name,fixed,moving\n../a,x,y\n", "without directories"),
                                          ("name,fixed,moving\na,x,y\nb,,y\n",
                                           "pair 'b' (row 2): no fixed image; each row names both"),
                                          ("fixed,moving\nx,\n", "pair 'pair_0000' (row 1): no moving image"),
                                          ("name,fixed,moving\n,,\n, ,\n", "at least one pair"),
                                          ("fixed,moving\nM\xfcller.nii,x\n".encode("latin-1"), "not UTF-8 text")])
def test_cli_refuses_a_malformed_pairs_file(tmp_path, capsys, text, message):
    from mgr_engine import cli

    (tmp_path / "pairs.csv").write_bytes(text if isinstance(text, bytes) else text.encode())
    assert cli.main(["register-many", "--pairs", str(tmp_path / "pairs.csv"), "--out_dir", str(tmp_path / "out"),
                     "--model", "compact"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def count_image_reads(monkeypatch) -> list:
    """The roles ("fixed", "moving", "fixed mask", ...) of the images read from now on, in order."""
    from mgr_engine import itk_io

    reads = []
    load_image = itk_io.load_image

    def counted_load_image(image, name, **options):
        reads.append(name)
        return load_image(image, name, **options)

    monkeypatch.setattr(itk_io, "load_image", counted_load_image)
    return reads


def test_pairs_with_one_fixed_file_read_it_once(engine, tmp_path, monkeypatch):
    """An atlas registered to a data set: consecutive pairs naming the same fixed file (and mask)
    read and preprocess it once, with the maps of pairs read one by one; another file between
    them, or an image in memory, is read each time."""
    fixed_a, fixed_b = image(300), image(301)
    movings = [image(302 + k, shape=(36, 50, 41)) for k in range(3)]
    for name, value in (("a", fixed_a), ("b", fixed_b)):
        itk.imwrite(value, str(tmp_path / f"{name}.nii.gz"))
    fixed_paths = [str(tmp_path / name) + ".nii.gz" for name in ("a", "a", "b", "a")]
    data = [(path, movings[k % 3]) for k, path in enumerate(fixed_paths)]
    expected = [engine.register(path, moving, io_iterations=None) for path, moving in data]
    reads = count_image_reads(monkeypatch)
    streamed = list(engine.register_many(data, io_iterations=None))
    assert reads.count("fixed") == 3  # a, a (kept), b, a
    assert streamed[0].fixed is streamed[1].fixed and streamed[1].fixed is not streamed[3].fixed
    for ours, theirs in zip(streamed, expected):
        assert torch.equal(ours.phi_ab, theirs.phi_ab)
    reads.clear()
    list(engine.register_many([(fixed_a, moving) for moving in movings], io_iterations=None))
    assert reads.count("fixed") == 3
    # with masks: kept while the mask file is the same too
    mask = itk.image_from_array(np.ones(itk.array_view_from_image(fixed_a).shape, np.uint8))
    mask.CopyInformation(fixed_a)  # a scalar image onto a scalar image
    itk.imwrite(mask, str(tmp_path / "m.nii.gz"))
    reads.clear()
    masked = [{"fixed": fixed_paths[0], "moving": moving, "fixed_mask": str(tmp_path / "m.nii.gz")} for moving in movings]
    list(engine.register_many([*masked, {"fixed": fixed_paths[0], "moving": movings[0]}], io_iterations=None,
                              masking="input"))
    assert reads.count("fixed") == 2 and reads.count("fixed mask") == 1


def test_fixed_file_kept_by_identity_not_by_path_string(engine, tmp_path, monkeypatch):
    """The kept fixed side follows the file, not how its path is spelled: a relative path and
    an absolute one name one file (read once); a file rewritten between pairs is read again,
    and its pairs get the new image's maps."""
    fixed_a, fixed_b = image(310), image(311)
    movings = [image(312 + k, shape=(36, 50, 41)) for k in range(3)]
    path = tmp_path / "atlas.nii.gz"
    itk.imwrite(fixed_a, str(path))
    monkeypatch.chdir(tmp_path)
    reads = count_image_reads(monkeypatch)
    spelled = list(engine.register_many([("atlas.nii.gz", movings[0]), (str(path), movings[1]),
                                         (tmp_path / "." / "atlas.nii.gz", movings[2])], io_iterations=None))
    assert reads.count("fixed") == 1
    assert spelled[0].fixed is spelled[2].fixed

    def rewritten_between_pairs():
        yield str(path), movings[0]
        itk.imwrite(fixed_b, str(path))
        stat = os.stat(path)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a coarse clock's tick
        yield str(path), movings[0]

    reads.clear()
    rewritten = list(engine.register_many(rewritten_between_pairs(), io_iterations=None, prefetch=1))
    assert reads.count("fixed") == 2
    assert torch.equal(rewritten[0].phi_ab, spelled[0].phi_ab)
    assert torch.equal(rewritten[1].phi_ab, engine.register(fixed_b, movings[0], io_iterations=None).phi_ab)
    assert not torch.equal(rewritten[0].phi_ab, rewritten[1].phi_ab)


def test_fixed_dicom_folder_is_read_again_once_one_of_its_files_is_rewritten(tmp_path):
    """A folder (a DICOM series) keeps its own modification time when one of its files is
    rewritten in place: the kept fixed side follows its files too (1.4 ms for 300 files)."""
    from mgr_engine.engine import _files_key

    folder = tmp_path / "series"
    folder.mkdir()
    for k in range(3):
        (folder / f"slice{k}.dcm").write_bytes(bytes(100))
    key = _files_key(str(folder), None)
    assert _files_key(folder, None) == key
    folder_time = os.stat(folder).st_mtime_ns
    (folder / "slice1.dcm").write_bytes(bytes(range(100)))  # same size, new voxels
    stat = os.stat(folder / "slice1.dcm")
    os.utime(folder / "slice1.dcm", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a coarse clock's tick
    assert os.stat(folder).st_mtime_ns == folder_time
    assert _files_key(str(folder), None) != key


@pytest.mark.parametrize("header, data", [("image.mhd", "image.raw"), ("image.hdr", "image.img")])
def test_fixed_header_file_is_read_again_once_its_voxel_file_is_rewritten(tmp_path, header, data):
    """MetaImage and Analyze keep the voxels in a file of their own, which can be rewritten while
    the header stays as it was: the kept fixed side follows that file too."""
    from mgr_engine.engine import _files_key

    itk.imwrite(image(1), str(tmp_path / header))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([header, data])
    key = _files_key(tmp_path / header, None)
    voxels = (tmp_path / data).read_bytes()
    (tmp_path / data).write_bytes(voxels[::-1])  # same size, other voxels
    info = os.stat(tmp_path / data)
    os.utime(tmp_path / data, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))  # a coarse clock's tick
    assert _files_key(tmp_path / header, None) != key


def test_quiet_commands_show_no_progress_bars(tmp_path, monkeypatch):
    """``-q`` turns off IO's progress bar in ``register`` and the pairs' bar in ``register-many``
    (bars on stderr clutter the logs of scripts that asked for quiet)."""
    import mgr_engine.engine
    import tqdm.auto
    from mgr_engine import cli
    from mgr_engine.errors import MgrEngineError

    asked = []

    class RecordingEngine:
        def __init__(self, *args, **kwargs):
            pass

        def register(self, *args, progress=True, **kwargs):
            asked.append(("register", progress))
            raise MgrEngineError("recorded")  # main() returns 2; no output is computed

    monkeypatch.setattr(mgr_engine.engine, "Engine", RecordingEngine)
    bars = tqdm.auto.tqdm

    def recording_tqdm(*args, disable=False, **kwargs):
        asked.append(("register-many", not disable))
        return bars(*args, disable=disable, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", recording_tqdm)
    monkeypatch.setattr(cli, "_registrations", lambda *args, **kwargs: iter(()))  # no pair is registered
    csv_path = write_csv(tmp_path, dict(zip(("a",), pairs(1, start=290))))
    for quiet in (False, True):
        flag = ["-q"] * quiet
        assert cli.main([*flag, "register", "--fixed", str(tmp_path / "a_fixed.nii.gz"), "--moving",
                         str(tmp_path / "a_moving.nii.gz"), "--fixed_modality", "mri", "--moving_modality", "mri",
                         "--transform_out", str(tmp_path / "t.h5")]) == 2
        assert cli.main([*flag, "register-many", "--pairs", str(csv_path), "--out_dir", str(tmp_path / "out"),
                         "--model", "compact"]) == 0
    assert asked == [("register", True), ("register-many", True), ("register", False), ("register-many", False)]
