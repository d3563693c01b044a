# `make demo` and `make test` set up everything they need on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mgr_engine-installed

.PHONY: demo test test-fast bench clean

# torch 2.13 (below) has wheels for Python 3.10 and later: say so before a venv is made for another.
$(PY):
	@python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "make: $$(python3 --version) is too old: the torch==2.13.0 it installs needs Python 3.10 or later (python3 on PATH)"; exit 1; }
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first, pinned to the CPU wheel these machines carry: a bare `torch` requirement
# resolved by pip would pull a multi-GB CUDA build. A torch already in the venv is kept.
# The install also compiles the C++ kernels (kernels/*.cpp), hence their dependency.
$(STAMP): pyproject.toml setup.py kernels/trilinear_cpu.cpp kernels/last_conv_cpu.cpp kernels/gaussian_blur_cpu.cpp kernels/resample_cpu.cpp kernels/jacobian_cpu.cpp kernels/mind_ssc_cpu.cpp kernels/upconv_cpu.cpp kernels/encoder_cpu.cpp kernels/cpu_kernel.h | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,onnx,train]"
	$(PY) -m pip install -q --no-deps "unigradicon==1.0.6" "icon_registration==1.1.9"
	touch $@

demo: $(STAMP)
	$(PY) -m mgr_engine.demo --out demo_output

# MGR_ENGINE_REQUIRE_CPP: a C++ extension that failed to build fails its tests instead of skipping them.
test: $(STAMP)
	MGR_ENGINE_REQUIRE_CPP=1 $(PY) -m pytest -q -ra --tb=short tests

test-fast: $(STAMP)
	MGR_ENGINE_REQUIRE_CPP=1 $(PY) -m pytest -q -ra --tb=short -m "not slow" tests

bench: $(STAMP)
	$(PY) benchmarks/bench_register.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache build mgr_engine/_trilinear_cpu*.so mgr_engine/_last_conv_cpu*.so mgr_engine/_gaussian_blur_cpu*.so mgr_engine/_resample_cpu*.so mgr_engine/_jacobian_cpu*.so mgr_engine/_mind_ssc_cpu*.so mgr_engine/_upconv_cpu*.so mgr_engine/_encoder_cpu*.so
