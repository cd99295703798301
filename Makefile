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

.PHONY: demo test install bench info clean

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

test: $(STAMP)
	$(VPY) -m fastcl info
	$(VPY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(VPY) -m pytest -q tests/test_benchmark_baselines.py
	$(VPY) -m pytest -q benchmarks/test_bench_losses.py --benchmark-enable --benchmark-columns=min,median,rounds
	$(VPY) -m benchmarks.report --quick

info: $(STAMP)
	$(VPY) -m fastcl info

clean:
	rm -rf build *.egg-info fastcl/_C*.so $(STAMP)
