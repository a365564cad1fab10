# Quickstart: `make demo` and `make test` (each builds .venv on first use); also `make bench`.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
NVCC ?= nvcc
NVCC_GENCODE := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90

VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
# Compiled sources are part of what the editable install builds, so they re-trigger it.
EXTENSION_SOURCES := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) 2>/dev/null)

.PHONY: venv demo demo-op test cuda-check cpp-test bench clean distclean mutation

venv: $(VENV)/.installed

# torch first (the pinned CPU/CUDA build already on the machine), then the build tools that
# `--no-build-isolation` needs, then the package itself; the stamp keeps repeated runs fast.
$(VENV)/.installed: pyproject.toml setup.py $(EXTENSION_SOURCES)
	test -x $(VENV_PYTHON) || $(PYTHON) -m venv $(VENV)
	$(VENV_PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(VENV_PYTHON) -m pip install -q "setuptools>=64" wheel pybind11 ninja
	$(VENV_PYTHON) -m pip install -q --no-build-isolation -e ".[test,bench,peft]"
	touch $@

# The main job: synthetic data (generated once into data/synthetic), a tiny LaVIN trained on
# two MLAN mixtures, a results table, run.json files and PNG plots under runs/demo.
DEMO_ARGS ?= --shares 0.5 0.875
demo: venv
	$(VENV_PYTHON) python/train_mixed.py --data data/synthetic --make-data --out runs/demo \
		--compare-backends $(DEMO_ARGS)

# One LLaMA-7B-shaped MM-Adapter on every backend: checked against the reference and timed.
demo-op: venv
	$(VENV_PYTHON) python/demo_mm_adapter.py

# pytest exits 5 when it collects nothing; that is a failure here, not a pass.
test: venv
	@if command -v $(NVCC) >/dev/null 2>&1; then $(MAKE) --no-print-directory cuda-check; fi
	@status=0; $(VENV_PYTHON) -m pytest tests -q || status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests under tests/" >&2; fi; \
	exit $$status
	@if ls benchmarks/test_*.py >/dev/null 2>&1; then \
		status=0; $(VENV_PYTHON) -m pytest benchmarks -q --benchmark-disable || status=$$?; \
		if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests under benchmarks/" >&2; fi; \
		exit $$status; \
	fi

# Compile-only check of every CUDA source for Ampere and Hopper (no GPU needed, only nvcc).
cuda-check:
	@sources="$$(find csrc -type f -name '*.cu' 2>/dev/null | sort)"; \
	if [ -z "$$sources" ]; then echo "cuda-check: no .cu sources under csrc/, nothing to compile"; exit 0; fi; \
	includes="-Icsrc"; \
	if [ -x $(VENV_PYTHON) ]; then includes="$$includes $$($(VENV_PYTHON) -c 'from torch.utils.cpp_extension import include_paths; print(" ".join("-I" + p for p in include_paths()))' 2>/dev/null)"; fi; \
	workdir="$$(mktemp -d)"; trap 'rm -rf "$$workdir"' EXIT; \
	for source in $$sources; do \
		echo "cuda-check: $(NVCC) $$source"; \
		$(NVCC) -std=c++17 $(NVCC_GENCODE) $$includes -c "$$source" -o "$$workdir/$$(echo $$source | tr / _).o" || exit 1; \
	done; \
	echo "cuda-check: compiled $$(echo "$$sources" | wc -l) file(s)"

# CMake build of the CPU kernels against the venv's torch, and their C++ test via ctest.
cpp-test: venv
	cmake -S . -B build/cmake -DMLAN_PYTHON=$(abspath $(VENV_PYTHON))
	cmake --build build/cmake --parallel
	ctest --test-dir build/cmake --output-on-failure

# Kernel benchmark grid (table + JSON + CSV + PNGs under benchmarks/results/), then the
# pytest-benchmark suites (regression tracking) over the same ops.
BENCH_ARGS ?=
bench: venv
	$(VENV_PYTHON) -m benchmarks.run $(BENCH_ARGS)
	$(VENV_PYTHON) -m pytest benchmarks --benchmark-only -q

# Mutation testing (mutmut 3, the `mutation` extra; not part of `make test` or CI): one module at
# a time, e.g. `make mutation MODULE=mlan_kernels/integrations/merge.py`; several modules
# separated by spaces, or MODULE=all for every module in python/mutation.py's table.
# Scores and how long each module took: docs/testing.md.
MODULE ?=
mutation: venv
	@test -n "$(MODULE)" || { echo "make mutation: pass MODULE=mlan_kernels/<path>.py (or all)" >&2; exit 2; }
	@$(VENV_PYTHON) -c "import mutmut" 2>/dev/null || $(VENV_PYTHON) -m pip install -q "mutmut>=3.8,<4"
	$(VENV_PYTHON) python/mutation.py $(MODULE)

clean:
	rm -rf build dist *.egg-info .pytest_cache .benchmarks
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -type d -prune -exec rm -rf {} + \) -o \( -name '*.so' -type f -exec rm -f {} + \)

distclean: clean
	rm -rf $(VENV)
