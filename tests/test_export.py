"""ONNX export and the ONNX Runtime backend against the PyTorch engine, every weight randomized."""

import os

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import mgr_engine  # noqa: E402
from helpers import random_network, smooth_volume  # noqa: E402
from mgr_engine import Engine, cli, export_onnx  # noqa: E402
from mgr_engine.errors import CheckpointError, InvalidOptionError, OnnxError, OutputWriteError  # noqa: E402
from mgr_engine.export import STAGE_FILES, STAGE_OPS, full_graph, load_session, ops_used, stage_graph, stage_network  # noqa: E402
from mgr_engine.model import official_state_dict  # noqa: E402

# Ops of the full graph, as documented in the README (and nothing else).
FULL_OPS = {"Add", "AveragePool", "Concat", "Conv", "ConvTranspose", "Gather", "GridSample", "LeakyRelu", "Mul",
            "Pad", "Reshape", "Resize", "Slice", "Sub", "Transpose"}


def pair(shape, batch=1):
    vols = [torch.from_numpy(smooth_volume(shape, seed)) for seed in range(2 * batch)]
    return torch.stack(vols[:batch])[:, None], torch.stack(vols[batch:])[:, None]


def voxel_error(a, b, shape):
    """Largest coordinate difference between two maps, in voxels of the network grid."""
    scale = (torch.tensor(shape, dtype=torch.float64) - 1).view(1, 3, 1, 1, 1)
    return float(((a.double() - b.double()) * scale).abs().max())


def torch_engine(net):
    return Engine(weights=official_state_dict(net), config=net.config, device="cpu")


@pytest.fixture(scope="module")
def narrow():
    """A narrow randomized network on a non-cubic grid (odd sizes: ceil-mode pooling and crops)."""
    shape = (66, 80, 71)
    net = random_network(shape, narrow=True, seed=4, displacement_scale=0.5)
    moving, fixed = pair(shape)
    expected = torch_engine(net).predict_map(moving, fixed)
    assert voxel_error(expected, net.identity_full, shape) > 1.0, "the random network must move voxels"
    return net, moving, fixed, expected


# ------------------------------------------------------------------ graphs


def static_shapes_inferred(model):
    """Every intermediate tensor gets a fully static shape from ONNX shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    typed = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    produced = [name for node in model.graph.node for name in node.output]
    assert produced and all(name in typed for name in produced)
    for name in produced:
        dims = typed[name].type.tensor_type.shape.dim
        assert len(dims) > 0 and all(d.HasField("dim_value") for d in dims), name


def test_full_graph_is_checker_clean_with_static_shapes(narrow):
    net = narrow[0]
    for cpu_rewrites in (True, False):
        model = full_graph(net, cpu_rewrites=cpu_rewrites)
        onnx.checker.check_model(model, full_check=True)
        static_shapes_inferred(model)
        assert set(ops_used(model)) <= FULL_OPS
        assert "GridSample" in ops_used(model) and "BatchNormalization" not in ops_used(model)
        assert model.opset_import[0].version == 20
    assert "Reshape" not in ops_used(full_graph(net, cpu_rewrites=False))


@pytest.mark.parametrize("opset", [13, 17, 20])
def test_stage_graphs_use_only_the_tensorrt_op_set(narrow, opset):
    net = narrow[0]
    for index in range(4):
        model = stage_graph(net, index, opset=opset)
        onnx.checker.check_model(model, full_check=True)
        static_shapes_inferred(model)
        ops = set(ops_used(model))
        assert ops <= STAGE_OPS, f"psi{index + 1} uses {sorted(ops - STAGE_OPS)}"
        assert {"Conv", "ConvTranspose", "Resize", "AveragePool"} <= ops
    assert STAGE_OPS == {"Conv", "ConvTranspose", "LeakyRelu", "AveragePool", "Resize", "Add", "Concat", "Slice", "Pad"}


# ------------------------------------------------------------------ numbers


@pytest.mark.parametrize("cpu_rewrites", [True, False])
def test_full_graph_reproduces_engine_official_channels(tmp_path, cpu_rewrites):
    shape = (72, 72, 72)
    net = random_network(shape, seed=3, displacement_scale=0.5)  # official channel widths
    moving, fixed = pair(shape)
    expected = torch_engine(net).predict_map(moving, fixed)
    path = tmp_path / "full.onnx"
    assert export_onnx(path, weights=official_state_dict(net), config=net.config,
                       cpu_rewrites=cpu_rewrites) == [path]
    engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu", backend="onnxruntime",
                    onnx_model=path)
    ours = engine.predict_map(moving, fixed)
    assert voxel_error(expected, net.identity_full, shape) > 1.0
    assert ours.shape == expected.shape and ours.dtype == torch.float32
    assert voxel_error(ours, expected, shape) < 1e-3
    # the graph's second output is the displacement
    session = load_session(path)
    phi, displacement = session.run(None, {"moving": moving.numpy(), "fixed": fixed.numpy()})
    assert voxel_error(torch.from_numpy(displacement), expected - net.identity_full, shape) < 1e-3
    assert voxel_error(torch.from_numpy(phi), expected, shape) < 1e-3


def test_full_graph_batch_and_narrow(narrow, tmp_path):
    net, moving, fixed, expected = narrow
    shape = net.config.input_shape
    moving2, fixed2 = torch.cat([moving, fixed]), torch.cat([fixed, moving])
    expected2 = torch_engine(net).predict_map(moving2, fixed2)
    assert voxel_error(expected2[:1], expected, shape) < 1e-3
    # a batch-2 graph, and a batch-1 graph run item by item
    for batch in (2, 1):
        path = tmp_path / f"b{batch}.onnx"
        export_onnx(path, weights=official_state_dict(net), config=net.config, batch=batch)
        engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu", backend="onnxruntime",
                        onnx_model=path)
        assert voxel_error(engine.predict_map(moving2, fixed2), expected2, shape) < 1e-3
    # the batch-2 graph on 1 and 3 images: the last chunk padded, its extra output dropped
    assert voxel_error(onnx_maps(net, tmp_path / "b2.onnx", moving, fixed), expected, shape) < 1e-3
    moving3, fixed3 = torch.cat([moving2, fixed]), torch.cat([fixed2, moving])
    expected3 = torch.cat([expected2, expected2[1:]])
    assert voxel_error(onnx_maps(net, tmp_path / "b2.onnx", moving3, fixed3), expected3, shape) < 1e-3


def onnx_maps(net, path, moving, fixed):
    engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu", backend="onnxruntime",
                    onnx_model=path)
    result = engine.predict_map(moving, fixed)
    assert result.shape[0] == moving.shape[0]
    return result


def test_stage_pipeline_equals_full_graph_and_engine(narrow, tmp_path):
    net, moving, fixed, expected = narrow
    shape = net.config.input_shape
    written = export_onnx(tmp_path / "stages", weights=official_state_dict(net), config=net.config, kind="stages")
    assert [p.name for p in written] == list(STAGE_FILES)
    stages = Engine(weights=official_state_dict(net), config=net.config, device="cpu", backend="onnxruntime",
                    onnx_model=tmp_path / "stages").predict_map(moving, fixed)
    export_onnx(tmp_path / "full.onnx", weights=official_state_dict(net), config=net.config)
    full = Engine(weights=official_state_dict(net), config=net.config, device="cpu", backend="onnxruntime",
                  onnx_model=tmp_path / "full.onnx").predict_map(moving, fixed)
    assert voxel_error(stages, full, shape) < 1e-3
    assert voxel_error(stages, expected, shape) < 1e-3
    # each stage graph alone equals its U-Net on the inputs the network gives it
    pipeline = stage_network(net.config, [load_session(p) for p in written])
    with torch.no_grad():
        ours, theirs = pipeline.displacement_fields(moving, fixed), net.displacement_fields(moving, fixed)
    for ours_field, their_field in zip(ours, theirs):
        assert float((ours_field - their_field).abs().max()) < 1e-5
        assert float(their_field.abs().max()) > 1e-3


def test_in_memory_export_and_register_api(tmp_path):
    """backend='onnxruntime' without a file exports the full graph from the weights; register()
    with backend/onnx_model gives the PyTorch engine's transform."""
    itk = pytest.importorskip("itk")
    shape = (72, 72, 72)
    net = random_network(shape, narrow=True, seed=6, displacement_scale=0.5)
    moving, fixed = pair(shape)
    engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu", backend="onnxruntime")
    assert voxel_error(engine.predict_map(moving, fixed), torch_engine(net).predict_map(moving, fixed), shape) < 1e-3

    fixed_image = itk.image_from_array(smooth_volume((40, 44, 36), 1) * 300)
    moving_image = itk.image_from_array(smooth_volume((42, 40, 38), 2) * 300)
    fixed_image.SetSpacing((1.2, 1.0, 0.9))
    results = {}
    for backend in ("torch", "onnxruntime"):
        engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu", backend=backend)
        results[backend] = engine.register(fixed_image, moving_image, io_iterations=None, progress=False)
    points = np.random.default_rng(0).uniform(0, 30, (200, 3))
    a = np.array([results["torch"].transform.TransformPoint(p) for p in points])
    b = np.array([results["onnxruntime"].transform.TransformPoint(p) for p in points])
    assert np.abs(a - points).max() > 0.5 and np.abs(a - b).max() < 5e-3
    # inverse goes through ONNX Runtime too
    assert voxel_error(results["onnxruntime"].phi_ab, results["torch"].phi_ab, shape) < 1e-3


def test_register_function_with_onnx_backend(tmp_path, monkeypatch):
    itk = pytest.importorskip("itk")  # noqa: F841
    from mgr_engine import engine as engine_module

    net = random_network((72, 72, 72), narrow=True, seed=8, displacement_scale=0.5)
    monkeypatch.setitem(engine_module.MODELS, "multigradicon", net.config)  # register() builds MODELS[model]
    weights = tmp_path / "w.trch"
    torch.save(official_state_dict(net), weights)
    export_onnx(tmp_path / "g.onnx", weights=weights)
    fixed, moving = smooth_volume((30, 34, 32), 1) * 100 + 1, smooth_volume((32, 30, 28), 2) * 100 + 1
    results = [mgr_engine.register(fixed, moving, weights=weights, io_iterations=None, device="cpu", progress=False,
                                   **backend) for backend in ({}, {"backend": "onnxruntime", "onnx_model": tmp_path / "g.onnx"})]
    assert voxel_error(results[1].phi_ab, results[0].phi_ab, net.config.input_shape) < 1e-3
    assert voxel_error(results[0].phi_ab, net.identity_full, net.config.input_shape) > 1.0
    # an ONNX model exported for another input shape is refused
    other = random_network((80, 80, 80), narrow=True)
    export_onnx(tmp_path / "small.onnx", weights=official_state_dict(other), config=other.config)
    with pytest.raises(OnnxError, match="does not fit"):
        mgr_engine.register(fixed, moving, weights=weights, io_iterations=None, device="cpu",
                            backend="onnxruntime", onnx_model=tmp_path / "small.onnx")


@pytest.mark.parametrize("kind", ["full", "stages"])
def test_fp16_variants_stay_close_to_fp32(narrow, tmp_path, kind):
    net, moving, fixed, expected = narrow
    shape = net.config.input_shape
    path = tmp_path / kind
    export_onnx(path, weights=official_state_dict(net), config=net.config, kind=kind, dtype="float16")
    fp16 = Engine(weights=official_state_dict(net), config=net.config, device="cpu", backend="onnxruntime",
                  onnx_model=path).predict_map(moving, fixed)
    error = voxel_error(fp16, expected, shape)
    print(f"fp16 {kind}: largest point difference against fp32 {error:.4f} voxel")
    assert 1e-4 < error < 0.25  # float16 does change the result, by a fraction of a voxel here


# ------------------------------------------------------------------ errors


def test_opsets_that_cannot_express_the_graph(narrow, tmp_path):
    state, config = official_state_dict(narrow[0]), narrow[0].config
    with pytest.raises(OnnxError, match="GridSample"):
        export_onnx(tmp_path / "a.onnx", weights=state, config=config, opset=17)
    with pytest.raises(OnnxError, match="opset 13"):
        export_onnx(tmp_path / "s", weights=state, config=config, kind="stages", opset=12)
    with pytest.raises(OnnxError, match="newer than the installed onnx"):
        export_onnx(tmp_path / "a.onnx", weights=state, config=config, opset=onnx.defs.onnx_opset_version() + 1)
    with pytest.raises(OnnxError, match="kind"):
        export_onnx(tmp_path / "a.onnx", weights=state, config=config, kind="tensorrt")
    with pytest.raises(OnnxError, match="dtype"):
        export_onnx(tmp_path / "a.onnx", weights=state, config=config, dtype="bfloat16")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("options, message", [
    (dict(batch=2.5), r"batch must be a whole number of at least 1, got 2.5"),
    (dict(batch="2"), "got '2'"), (dict(batch=True), "got True"), (dict(batch=0), "got 0"),
    (dict(opset=20.5), r"opset must be an integer, got 20.5"), (dict(opset="20"), "got '20'"),
    (dict(cpu_rewrites="no"), r"cpu_rewrites must be True or False, got 'no'"),
])
def test_export_options_of_the_wrong_type(tmp_path, options, message):
    """Refused before anything is written: 2.5 and '2' as a batch were torch's or onnx's
    TypeError midway, opset 20.5 a silent 20, cpu_rewrites='no' a silent True."""
    with pytest.raises((OnnxError, InvalidOptionError), match=message):
        export_onnx(tmp_path / "a.onnx", model="compact", **options)
    assert list(tmp_path.iterdir()) == []


def test_wrong_architecture_checkpoint(tmp_path):
    narrow_net = random_network((72, 72, 72), narrow=True)
    official = random_network((72, 72, 72))
    with pytest.raises(CheckpointError, match="wrong shape"):
        export_onnx(tmp_path / "a.onnx", weights=official_state_dict(narrow_net), config=official.config)
    broken = official_state_dict(narrow_net)
    del broken["netPsi.net.lastConv.weight"]
    path = tmp_path / "broken.trch"
    torch.save(broken, path)
    with pytest.raises(CheckpointError, match="netPsi.net.lastConv.weight"):
        export_onnx(tmp_path / "s", weights=path, config=narrow_net.config, kind="stages")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.trch"]


def test_unwritable_output(narrow, tmp_path):
    state, config = official_state_dict(narrow[0]), narrow[0].config
    with pytest.raises(OutputWriteError, match="does not exist"):
        export_onnx(tmp_path / "missing" / "a.onnx", weights=state, config=config)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(OutputWriteError):
        export_onnx(a_file / "a.onnx", weights=state, config=config)
    with pytest.raises(OutputWriteError, match="is a file"):
        export_onnx(a_file, weights=state, config=config, kind="stages")
    with pytest.raises(OutputWriteError, match="is a directory"):
        export_onnx(tmp_path, weights=state, config=config)
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        probe = read_only / "probe"
        try:
            probe.write_text("x")  # root ignores permissions
            pytest.skip("running as root: a read-only directory is writable")
        except PermissionError:
            pass
        with pytest.raises(OutputWriteError, match="cannot write"):
            export_onnx(read_only / "a.onnx", weights=state, config=config)
    finally:
        read_only.chmod(0o700)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "read_only"]


def test_cuda_provider_is_asked_for_float32(monkeypatch):
    """The CUDA provider gets use_tf32=0 (it would run float32 convolutions in TF32), the CPU
    provider no options. onnxruntime-gpu is not installed here: the session is recorded."""
    created = {}
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", lambda model, options, **kwargs: created.update(kwargs))
    load_session(b"model", providers="cuda,cpu")
    assert created == {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                       "provider_options": [{"use_tf32": "0"}, {}]}


def test_engine_option_errors(narrow, tmp_path):
    state, config = official_state_dict(narrow[0]), narrow[0].config
    with pytest.raises(InvalidOptionError, match="backend"):
        Engine(weights=state, config=config, device="cpu", backend="tensorrt")
    with pytest.raises(InvalidOptionError, match="need backend"):
        Engine(weights=state, config=config, device="cpu", onnx_model=tmp_path / "x.onnx")
    for torch_only in (dict(compile=True), dict(precision="bf16"), dict(precision="tf32")):
        with pytest.raises(InvalidOptionError, match="apply to backend='torch'"):
            Engine(weights=state, config=config, device="cpu", backend="onnxruntime", **torch_only)
    with pytest.raises(InvalidOptionError, match="not available"):
        Engine(weights=state, config=config, device="cpu", backend="onnxruntime", onnx_providers=["nosuch"])
    with pytest.raises(OnnxError, match="does not exist"):
        Engine(weights=state, config=config, device="cpu", backend="onnxruntime", onnx_model=tmp_path / "x.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OnnxError, match="lacks the stage graphs"):
        Engine(weights=state, config=config, device="cpu", backend="onnxruntime", onnx_model=tmp_path / "empty")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(OnnxError, match="cannot load"):
        Engine(weights=state, config=config, device="cpu", backend="onnxruntime", onnx_model=tmp_path / "junk.onnx")
    # a stage graph where the full graph is expected: no 'map' output
    export_onnx(tmp_path / "stages", weights=state, config=config, kind="stages")
    with pytest.raises(OnnxError, match="no output 'map'"):
        Engine(weights=state, config=config, device="cpu", backend="onnxruntime",
               onnx_model=tmp_path / "stages" / "psi4.onnx")


# ------------------------------------------------------------------ command line


def test_cli_export_and_register_with_onnxruntime(tmp_path, capsys):
    itk = pytest.importorskip("itk")
    shape = [72, 72, 72]
    net = random_network(shape, seed=9, displacement_scale=0.5)  # the CLI builds official channel widths
    weights = tmp_path / "Step_2_final.trch"
    torch.save(official_state_dict(net), weights)
    for name, seed in (("fixed", 1), ("moving", 2)):
        image = itk.image_from_array(smooth_volume((40, 46, 42), seed) * 800)
        image.SetSpacing((1.1, 0.9, 1.3))
        itk.imwrite(image, str(tmp_path / f"{name}.nii.gz"))
    size = ["--network_input_shape", *map(str, shape)]
    assert cli.main(["-q", "export-onnx", "--out", str(tmp_path / "g.onnx"), "--network_weights", str(weights), *size]) == 0
    assert cli.main(["-q", "export-onnx", "--out", str(tmp_path / "g.onnx"), "--network_weights", str(weights),
                     "--opset", "18"]) == 2
    assert "GridSample" in capsys.readouterr().err
    common = ["register", "--fixed", str(tmp_path / "fixed.nii.gz"), "--moving", str(tmp_path / "moving.nii.gz"),
              "--fixed_modality", "mri", "--moving_modality", "mri", "--network_weights", str(weights),
              "--io_iterations", "None", *size]
    assert cli.main(["-q", *common, "--transform_out", str(tmp_path / "torch.h5")]) == 0
    assert cli.main(["-q", *common, "--backend", "onnxruntime", "--onnx_model", str(tmp_path / "g.onnx"),
                     "--onnx_providers", "cpu", "--transform_out", str(tmp_path / "ort.h5")]) == 0
    assert cli.main(["-q", *common, "--onnx_model", str(tmp_path / "g.onnx"), "--transform_out", str(tmp_path / "x.h5")]) == 2
    a, b = itk.transformread(str(tmp_path / "torch.h5"))[0], itk.transformread(str(tmp_path / "ort.h5"))[0]
    points = np.random.default_rng(1).uniform(0, 40, (200, 3))
    moved = np.array([a.TransformPoint(p) for p in points])
    assert np.abs(moved - points).max() > 0.5
    assert max(np.linalg.norm(np.array(a.TransformPoint(p)) - np.array(b.TransformPoint(p))) for p in points) < 5e-3
    assert not (tmp_path / "x.h5").exists()


def test_a_safetensors_file_is_exported_with_its_own_network(narrow, tmp_path):
    """The bundled compact model (``export-onnx --model compact``) and a ``mgr-engine train``
    file of another configuration are exported with the network their file declares (was: the
    official one, refused as another architecture), their graphs the PyTorch engine's maps, each
    written with the mode the umask gives (was 0600: unreadable by the user's group)."""
    from mgr_engine.engine import BUNDLED_WEIGHTS
    from mgr_engine.model import save_safetensors

    net, moving, fixed, expected = narrow
    trained = save_safetensors(net, tmp_path / "trained.safetensors", half=False)
    compact = Engine(model="compact", device="cpu")
    compact_pair = pair(compact.input_shape)
    umask = os.umask(0)
    os.umask(umask)
    assert cli.main(["-q", "export-onnx", "--model", "compact", "--out", str(tmp_path / "compact.onnx")]) == 0
    for graph, engine, inputs, reference in (
            (tmp_path / "compact.onnx", compact, compact_pair, compact.predict_map(*compact_pair)),
            (export_onnx(tmp_path / "trained.onnx", weights=trained)[0], torch_engine(net), (moving, fixed), expected)):
        assert (graph.stat().st_mode & 0o777) == 0o666 & ~umask
        session = Engine(model="compact" if engine is compact else "multigradicon",
                         weights=BUNDLED_WEIGHTS["compact"] if engine is compact else trained, device="cpu",
                         backend="onnxruntime", onnx_model=graph)
        shape = engine.input_shape
        assert voxel_error(session.predict_map(*inputs), reference, shape) < 1e-3
        assert voxel_error(reference, torch.zeros_like(reference), shape) > 1.0


@pytest.mark.slow
def test_official_configuration_at_175(tmp_path):
    shape = (175, 175, 175)
    net = random_network(shape, seed=11, displacement_scale=0.3)
    moving, fixed = pair(shape)
    expected = torch_engine(net).predict_map(moving, fixed)
    export_onnx(tmp_path / "full.onnx", weights=official_state_dict(net))
    ours = Engine(weights=official_state_dict(net), device="cpu", backend="onnxruntime",
                  onnx_model=tmp_path / "full.onnx").predict_map(moving, fixed)
    assert voxel_error(expected, net.identity_full, shape) > 1.0
    assert voxel_error(ours, expected, shape) < 1e-3
