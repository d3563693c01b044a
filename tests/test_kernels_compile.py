"""Every Triton kernel specialization compiles for a real GPU (sm_90: H100/H200), on a machine
without one: the other kernel tests run in Triton's interpreter here, which accepts programs
that the compiler rejects (see mgr_engine.kernels.compile_check). And torch.compile captures
the kernels in the engine's compiled network as it would on a GPU, which the interpreter's
kernels cannot show (Dynamo traces into them)."""

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend (ptxas)")


@pytest.mark.parametrize("arch", [90])
def test_every_kernel_compiles_for_the_gpu(arch, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # interpreted kernels do not compile
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    run = subprocess.run([sys.executable, "-m", "mgr_engine.kernels.compile_check", "--arch", str(arch),
                          "--sass", "warp_fwd"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    print(run.stdout)
    table, sass = run.stdout.split("| kernel | float | constexprs |")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "_kernel |" in line]
    # nine kernels in float32 and float64, each row with its count of specializations
    assert len(rows) == 18, run.stdout
    assert all(int(row.split("|")[3]) > 0 for row in rows)
    # the warp's image-gradient scatter and LNCC's loss sums: acquire-release atomics (Triton's
    # default) would fence every add
    orders = {row.split("|")[1].strip() + " " + row.split("|")[2].strip(): row.split("|")[7].strip() for row in rows}
    with_atomics = ("warp_bwd_kernel", "blur_axis_kernel")
    assert {name: order for name, order in orders.items() if order != "-"} == {
        f"{kernel} {dtype}": "relaxed" for kernel in with_atomics for dtype in ("fp32", "fp64")}, run.stdout
    # --sass: the warp forward's memory instructions in each of its 8 specializations, at least
    # its three coordinates and eight corners read, one channel written (a composition: three)
    counts = [[int(cell) for cell in line.split("|")[5:8]]
              for line in sass.splitlines() if "| warp_fwd_kernel |" in line]
    assert len(counts) == 8 and all(loads >= 11 and stores in (1, 3) and atomics == 0
                                    for loads, stores, atomics in counts), sass


def test_interpreter_is_refused(monkeypatch):
    from mgr_engine.kernels import compile_check

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        compile_check.compile_all()


def test_compiled_network_runs_every_warp_as_a_triton_kernel_in_one_graph():
    """What ``Engine(compile=True)`` gives torch.compile on a GPU: the folded inference network,
    whole (``fullgraph=True``, as the engine compiles it), every warp and composition in it a
    Triton kernel launch that Dynamo captures into the graph. Checked without a GPU in a child
    process with compiled (not interpreted) kernels: Dynamo only captures, nothing runs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    counts = dict(line.split(": ", 1) for line in run.stdout.splitlines() if line.startswith(("triton: ", "torch: ")))
    # the torch path's count of grid_sample calls is the number of warps and compositions
    assert int(counts["triton"]) == int(counts["torch"]) > 0, run.stdout


def _count_warps_in_captured_graphs() -> None:
    """Print ``mode: count`` for Dynamo's capture of the inference network (72^3, randomized
    weights), "triton" counting Triton kernel launches and "torch" grid_sample calls."""
    import collections

    import torch
    import torch.utils._triton

    from helpers import random_network, smooth_volume
    from mgr_engine import Engine
    from mgr_engine.model import official_state_dict
    from mgr_engine.ops import kernel_mode

    # Without a GPU, torch reports no Triton and Dynamo would trace into triton.jit's Python
    # launcher (and stop) instead of capturing the launch as a kernel, as it does on a GPU.
    torch.utils._triton.has_triton = lambda: True
    net = random_network((72, 72, 72), narrow=True, seed=3, displacement_scale=0.5)
    engine = Engine(weights=official_state_dict(net), config=net.config, device="cpu")
    moving, fixed = (torch.from_numpy(smooth_volume((72, 72, 72), seed))[None, None] for seed in (1, 2))

    class Captured(Exception):
        pass

    graphs = []

    def capture_only(graph_module, example_inputs):
        graphs.append(graph_module)
        raise Captured

    wanted = {"triton": "triton_kernel_wrapper_mutation", "torch": "grid_sample"}
    for mode, target in wanted.items():
        torch._dynamo.reset()
        graphs.clear()
        with torch.no_grad(), kernel_mode(mode):
            try:
                torch.compile(engine.inference_network, backend=capture_only, fullgraph=True)(moving, fixed)
            except torch._dynamo.exc.BackendCompilerFailed as error:
                if not isinstance(error.inner_exception, Captured):
                    raise
        assert len(graphs) == 1
        calls = collections.Counter(getattr(node.target, "__name__", str(node.target))
                                    for node in graphs[0].graph.nodes if node.op == "call_function")
        print(f"{mode}: {calls[target]}")


if __name__ == "__main__":
    _count_warps_in_captured_graphs()
