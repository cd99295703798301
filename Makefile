# fastcl: `make demo` and `make test` set everything up in .venv on a fresh machine.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.14.1 torchvision==0.29.1
# The CUDA toolkit used to compile the CUDA extension (needs no GPU). Empty: a CPU-only build.
CUDA_HOME   ?= $(firstword $(wildcard /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-1*))
MAX_JOBS    ?= 2
PYTEST_ARGS ?=

VPY   := $(VENV)/bin/python
STAMP := $(VENV)/.fastcl-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.cuh)

.PHONY: demo test install bench info clean triton-compat

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel

$(STAMP): $(VPY) $(SOURCES)
	$(VPY) -m pip install -q $(TORCH_SPEC)
	$(VPY) -m pip install -q pybind11 ninja numpy
	CUDA_HOME=$(CUDA_HOME) MAX_JOBS=$(MAX_JOBS) FASTCL_WERROR=1 \
		$(VPY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VPY) -m fastcl info
	$(VPY) -m fastcl.train

# The main suite, then the CUDA backend under the CUDA emulation (tests/cuda_emulation), built
# once with AddressSanitizer where the compiler has it: the emulation's self-tests, then the GPU
# suites of the CUDA backend (tests/gpu_tests_on_cpu.py).
test: $(STAMP)
	$(VPY) -m fastcl info
	$(VPY) -m pytest -q --ignore=tests/test_cuda_emulation.py $(PYTEST_ARGS)
	preload="$$(PYTHONPATH=tests $(VPY) -c 'import _cuda_emulation as e; print(e.asan_preload())')"; \
	  export ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 LD_PRELOAD="$$preload" \
	    PYTHONPATH=tests; \
	  $(VPY) -m pytest -q tests/test_cuda_emulation.py \
	  && $(VPY) -m pytest -q -p gpu_tests_on_cpu $${preload:+--cuda-sanitize} \
	    tests/test_cuda_contrastive.py tests/test_cuda_siglip.py

bench: $(STAMP)
	$(VPY) -m pytest -q tests/test_benchmark_baselines.py
	$(VPY) -m pytest -q benchmarks/test_bench_losses.py --benchmark-enable --benchmark-columns=min,median,rounds
	$(VPY) -m benchmarks.report --quick

# The Triton kernels under other Triton releases than torch's own (the GPU image's 3.6, the
# newest): each is installed beside .venv's torch into build/triton-<version> (with a NumPy its
# interpreter accepts) and put first on the path; then every kernel is compiled for sm_80 and
# sm_90 and run under the interpreter.
TRITON_VERSIONS ?= 3.6.0 3.9.0
triton-compat: $(STAMP)
	for v in $(TRITON_VERSIONS); do \
	  $(VPY) -m pip install -q --no-deps --target build/triton-$$v "triton==$$v" "numpy<2.3" \
	  && PYTHONPATH=build/triton-$$v $(VPY) -m pytest -q $(PYTEST_ARGS) tests/test_triton_compile.py \
	     tests/test_triton_contrastive.py tests/test_triton_siglip.py tests/test_triton_topk.py \
	  || exit 1; \
	done

info: $(STAMP)
	$(VPY) -m fastcl info

clean:
	rm -rf build *.egg-info fastcl/_C*.so $(STAMP)
