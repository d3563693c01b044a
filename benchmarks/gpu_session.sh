#!/usr/bin/env bash
# Issue 3's GPU checks, one stage per device call (each well inside the 10-minute limit of a
# call), everything written under $OUT so that it comes back.
#
# Here, once (the reference's pure-Python wheels travel with the call; the GPU image has torch,
# triton, pybind11, numpy, tqdm, matplotlib, safetensors and pytest, but no itk):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps -d .whl unigradicon==1.0.6 icon_registration==1.1.9
# On the device (run tool, carry [".whl"]), in this order:
#   bash benchmarks/gpu_session.sh tests     # Triton kernels compiled, values and gradients, 175^3 included
#   bash benchmarks/gpu_session.sh kernels   # bench_kernels.py: per-kernel time, memory, bandwidth
#   bash benchmarks/gpu_session.sh engine    # bench_gpu.py: end to end against the reference, TF32/bf16
# then copy $OUT's RESULTS-*.md into benchmarks/RESULTS.md with the device's name.
set -euo pipefail
stage=${1:?usage: gpu_session.sh tests|kernels|engine}
OUT=${OUT:-/tmp/mgr_engine_gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || {
    cat "$OUT/install.log"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
} | tee "$OUT/device-$stage.txt"

case $stage in
    tests)
        # The modules that need no itk: the Triton kernels (test_full_size runs 175^3 on a GPU)
        # and their dispatch in the engine's ops, and the C++ CPU warp when it was built.
        python3 -m pytest -q -p no:cacheprovider tests/test_kernels_warp.py tests/test_kernels_lncc.py \
            tests/test_kernel_dispatch.py tests/test_kernels_warp_cpu.py 2>&1 | tee "$OUT/tests.log"
        ;;
    kernels)
        # Without torch.compile first (minutes of compiling that could reach the call's limit),
        # so that the kernels' own figures come back in any case; then with it.
        python3 benchmarks/bench_kernels.py --no-compile --results "$OUT/RESULTS-kernels.md" 2>&1 | tee "$OUT/kernels.log"
        timeout 400 python3 benchmarks/bench_kernels.py --results "$OUT/RESULTS-kernels.md" 2>&1 | tee -a "$OUT/kernels.log"
        ;;
    engine)
        # The compiled row comes last and is written separately (bench_gpu.py's docstring).
        timeout 540 python3 benchmarks/bench_gpu.py --results "$OUT/RESULTS-gpu.md" 2>&1 | tee "$OUT/engine.log"
        ;;
    *)
        echo "unknown stage $stage: tests, kernels or engine" >&2
        exit 2
        ;;
esac
