#!/usr/bin/env bash
# Issue 3's GPU checks in ONE device call. A task is lent 15 minutes of device time, the
# machine's start (minutes) included, and a call may run 10 minutes: so one command of about
# 9 minutes, the most valuable stage first, each under its own timeout inside a total budget,
# each writing under $OUT as it goes (a call cut short still returns what was written).
#
# Here, once (the reference's pure-Python wheels travel with the call; the GPU image has torch,
# triton, numpy, tqdm, matplotlib, safetensors and pytest, but no itk):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps -d .whl unigradicon==1.0.6 icon_registration==1.1.9
# On the device: the run tool with carry [".whl"], timeout_s 590, and the command
#   bash benchmarks/gpu_session.sh
# then give_back at once, and copy $OUT's RESULTS-*.md, profile.md and memory.log (logs.tar.gz) into
# benchmarks/RESULTS.md with the device's name. At most 8 files come back from $OUT: the logs
# come packed in logs.tar.gz. SKIP="resample engine-compiled" leaves those stages out (a second
# call, with less device time left).
#
# Stages (seconds at most; the total is BUDGET, default 540):
#   tests    150  the Triton kernel tests compiled on the GPU, 175^3 included (fills Triton's cache),
#                 the regularizer's noise drawn on the GPU, a result's full-resolution resampling there
#   kernels  120  bench_kernels.py without torch.compile: time, memory, bandwidth per kernel (warps
#                 at jittered and smooth maps, MIND-SSC), the warp kernels' BLOCK:warps sweep, the LNCC
#                 kernel's slab sweep (1, 3, 5, 7, 10), IO's BatchNorm backward (torch, Triton),
#                 IO's convolutions by layer in fp32, tf32, tf32x3
#   engine   210  bench_gpu.py: end to end against the reference, TF32/bf16, IO memory, layouts
#   profile   75  profile_gpu.py: where a registration's and an IO step's (fp32, TF32, tf32x3, MIND-SSC) device time goes
#   memory    60  profile_io_memory.py --reference: what an IO step keeps for its backward pass,
#                 by node, against the reference
#   resample  40  bench_resample.py --tensors: a result's warped image, field and Jacobian on the
#                 GPU against the CPU's path (no itk there, so not against ITK)
#   kernels-compiled 120  bench_kernels.py with torch.compile
#   engine-compiled  150  bench_gpu.py --compile-only (CUDA graphs)
# On an H200 (2026-12-04) they took 49, 19, 89, 20, 9, 20 (first run), 29 and 86 s; a machine's
# start about 40 s. In the next session tests 46, kernels 23 (smooth maps added), engine 110 (two
# fresh processes added), engine-compiled 120 s.
#
# A dry run on the CPU, small sizes, the kernels in Triton's interpreter:
#   SMOKE=1 OUT=/tmp/gpu-smoke PATH=.venv/bin:$PATH bash benchmarks/gpu_session.sh
# The GPU image's versions (KINDS.md: Python 3.12, torch 2.11, Triton 3.6, NumPy 2.5, no itk)
# were checked on the CPU on 2026-11-30 and 2026-12-01 (benchmarks/RESULTS.md): every kernel
# compiles with Triton 3.6, and with Python 3.12, torch 2.11, NumPy 2.5 and no itk the dry run's
# engine, profile and memory stages pass. Only the interpreter fails there (Triton < 3.7 with
# NumPy >= 2.4), which a GPU run does not use.
set -uo pipefail
OUT=${OUT:-/tmp/mgr_engine_gpu_session}
BUDGET=${BUDGET:-540}
SMOKE=${SMOKE:-0}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
started=$SECONDS

# stage NAME SECONDS COMMAND...: runs COMMAND for at most SECONDS and what is left of BUDGET,
# its output in $OUT/NAME.log; a failure or a timeout is logged and the next stage runs.
stage() {
    local name=$1 limit=$2 left
    shift 2
    if [[ " ${SKIP:-} " == *" $name "* ]]; then
        echo "== $name: skipped (SKIP)" | tee -a "$OUT/stages.txt"
        return
    fi
    left=$((BUDGET - (SECONDS - started)))
    ((limit > left)) && limit=$left
    if ((limit < 20)); then
        echo "== $name: skipped, ${left} s of the budget left" | tee -a "$OUT/stages.txt"
        return
    fi
    echo "== $name: up to ${limit} s" | tee -a "$OUT/stages.txt"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s$( ((rc == 124)) && echo ' (timed out)')" | tee -a "$OUT/stages.txt"
    tail -n 40 "$OUT/$name.log"
}

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [[ $SMOKE != 1 ]]; then  # the CPU dry run uses the venv's install
    if ! MGR_ENGINE_BUILD_CPP=0 python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1
    then  # a rare session's one call is not lost to the install: the package runs from this tree as it is
        echo "== install failed ($OUT/install.log); mgr_engine runs from the source tree" | tee -a "$OUT/stages.txt"
        tail -n 5 "$OUT/install.log"
        ln -sfn ../kernels mgr_engine/kernels  # where setup.py's package_dir installs them
        ln -sfn ../export mgr_engine/export
        export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    fi
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  python3 -m mgr_engine.cli info  # versions, the GPU as torch sees it, which kernels the ops take
} 2>&1 | tee "$OUT/device.txt"

if [[ $SMOKE == 1 ]]; then
    export TRITON_INTERPRET=1
    # no itk, as on the GPU image: what imports it fails here as it would there
    mkdir -p "$OUT/no-itk/itk"
    echo 'raise ModuleNotFoundError("no itk here, as on the GPU image", name="itk")' > "$OUT/no-itk/itk/__init__.py"
    export PYTHONPATH=$OUT/no-itk${PYTHONPATH:+:$PYTHONPATH}
    tests=(-k "gradcheck or 16bit")
    kernels=(--smoke --blocks 128 --lncc-slabs 1 5)
    engine=(--device cpu --shape 72 72 72 --io-steps 1 --repeats 1)
    profile=(--device cpu --shape 72 72 72 --io-steps 1 --rows 10)
    memory=(--device cpu --shape 72 72 72 --reference)
    resample=(--fixed-shape 40 48 40 --moving-shape 36 40 44 --network 32 32 32 --repeats 1)
else
    tests=()
    kernels=()
    engine=()
    profile=()
    memory=(--reference)
    resample=()
fi

stage tests 150 python3 -m pytest -q -p no:cacheprovider "${tests[@]}" tests/test_kernels_warp.py \
    tests/test_kernels_lncc.py tests/test_kernels_norm_crop_concat.py tests/test_kernel_dispatch.py \
    tests/test_instance_optimization.py::test_regularizer_points_on_a_gpu \
    tests/test_instance_optimization.py::test_instance_optimization_steps_do_not_wait_for_the_gpu \
    tests/test_instance_optimization.py::test_finest_levels_and_maps_are_recomputed_by_default_on_a_gpu \
    tests/test_instance_optimization.py::test_io_gradients_in_tf32x3_are_as_accurate_as_float32s \
    tests/test_network.py::test_predict_map_on_gpu_tensors_does_not_wait_for_the_gpu \
    tests/test_network.py::test_io_transposed_convolution_in_subpixel_form \
    tests/test_network.py::test_low_memory_conv_in_tf32x3 \
    tests/test_resample.py::test_resampling_on_the_gpu_matches_the_cpu
# the dry run's kernels run in Triton's interpreter: 80-92 s on 2 cores, alone
stage kernels $((SMOKE == 1 ? 130 : 120)) python3 benchmarks/bench_kernels.py --no-compile "${kernels[@]}" \
    --results "$OUT/RESULTS-kernels.md"
stage engine 210 python3 benchmarks/bench_gpu.py --skip-compile "${engine[@]}" --results "$OUT/RESULTS-gpu.md"
stage profile 75 python3 benchmarks/profile_gpu.py "${profile[@]}" --out "$OUT/profile.md"
stage memory 60 python3 benchmarks/profile_io_memory.py "${memory[@]}"
stage resample 40 python3 benchmarks/bench_resample.py --tensors "${resample[@]}" --results "$OUT/RESULTS-resample.md"
if [[ $SMOKE != 1 ]]; then  # torch.compile of the kernels' references: nothing to check on the CPU
    stage kernels-compiled 120 python3 benchmarks/bench_kernels.py --blocks "${kernels[@]}" --results "$OUT/RESULTS-kernels.md"
fi
# last: mostly torch.compile's own compilation (72 s of 135 on an H200)
stage engine-compiled 150 python3 benchmarks/bench_gpu.py --compile-only "${engine[@]}" --results "$OUT/RESULTS-gpu.md"
echo "== total $((SECONDS - started)) s of ${BUDGET}" | tee -a "$OUT/stages.txt"
# at most 8 files come back: the logs in one archive beside the results
(cd "$OUT" && tar czf logs.tar.gz --remove-files -- *.log)
