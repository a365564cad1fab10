# Quickstart: `make demo` and `make test` (each builds .venv on first use); also `make bench`.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
NVCC ?= nvcc
NVCC_GENCODE := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90

VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
# Exact versions of everything the suite last passed with (refresh: `make lock`, README).
CONSTRAINTS := constraints.txt
# The oldest transformers/peft we support (pyproject.toml's floors), checked by `make test-oldest`.
CONSTRAINTS_OLDEST := constraints-oldest.txt
# The tests that touch transformers or peft: what the floor check runs.
HF_TESTS := tests/test_hf_compat.py tests/test_families.py tests/test_vision_language.py tests/test_integration_llama.py tests/test_integration_lavin.py \
	tests/test_integration_checkpoint.py tests/test_sampling.py tests/test_balance_monitor.py \
	tests/test_data_collate.py tests/test_train_mixed.py
# Compiled sources are part of what the editable install builds, so they re-trigger it.
# csrc/sources.txt is the one source list (setup.py and CMakeLists.txt read it too).
SOURCE_LIST := csrc/sources.txt
EXTENSION_SOURCES := $(SOURCE_LIST) $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) 2>/dev/null)

.PHONY: venv demo demo-op test run-tests test-latest test-oldest lock sdist-check cuda-check cpp-test bench \
	clean distclean mutation mutation-semantic

venv: $(VENV)/.installed

# torch first (the pinned CPU/CUDA build already on the machine), then the build tools that
# `--no-build-isolation` needs, then the package itself, every version from $(CONSTRAINTS);
# the stamp keeps repeated runs fast. $(call install_into,VENV_DIR,PIP_FLAGS,TORCH_FLAGS) does
# the same for the other venvs (PIP_FLAGS: which versions; TORCH_FLAGS: those for torch and its
# own dependencies, none for test-latest: the lock's triton is not the one a newer CUDA torch
# pins). torch is installed first and then held at
# that exact build (torch-pin.txt): an --upgrade would swap the machine's CPU wheel for another.
# The pin is the installed distribution's version (importlib.metadata), not torch.__version__:
# the CUDA wheel of torch 2.14.1 says 2.14.1+cu130 there, a version pip cannot find.
# The suite needs every layer, so the package goes in with the `all` extra.
define install_into
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q $(3) "$(TORCH_SPEC)"
	$(1)/bin/python -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' > $(1)/torch-pin.txt
	$(1)/bin/python -m pip install -q -c $(1)/torch-pin.txt $(2) setuptools wheel pybind11 ninja
	$(1)/bin/python -m pip install -q -c $(1)/torch-pin.txt $(2) --no-build-isolation -e ".[all]"
endef

$(VENV)/.installed: pyproject.toml setup.py $(CONSTRAINTS) $(EXTENSION_SOURCES)
	$(call install_into,$(VENV),-c $(CONSTRAINTS),-c $(CONSTRAINTS))
	touch $@

# The main job, LaVIN's recipe: synthetic data (generated once into data/synthetic), a tiny
# LLaMA and CLIP pretrained once into runs/base (stage 1), then only MM-Adapters, neck and
# modality token trained on them, frozen, 3,000 steps at lr 1e-2 (mlan_train/study.py's
# defaults) on two MLAN mixtures (stage 2), for DEMO_SEEDS seeds, DEMO_JOBS runs at a time, one
# thread each (so results do not depend on the machine's core count): per-task mean ± std over seeds and every seed's numbers (the README's
# table is rendered from such a JSON, benchmarks/results/demo-*.json), run.json files under
# runs/demo. A finished run is reused when its arguments are unchanged (rm -r runs/demo to
# train again). DEMO_ARGS: more options, e.g. --shares 0 0.5 0.875 1 or --seeds 0 1 2 3 4.
DEMO_SEEDS ?= 0 1 2
DEMO_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
DEMO_ARGS ?=
demo: venv
	OMP_NUM_THREADS=1 $(VENV_PYTHON) python/study_balance.py --kind demo --data data/synthetic --make-data \
		--base runs/base --out runs/demo --json runs/demo/demo.json --seeds $(DEMO_SEEDS) --jobs $(DEMO_JOBS) \
		--shares 0.5 0.875 --alphas 0 --aux-weights 0 --steps 3000 $(DEMO_ARGS)

# One LLaMA-7B-shaped MM-Adapter on every backend: checked against the reference and timed.
demo-op: venv
	$(VENV_PYTHON) python/demo_mm_adapter.py

test: venv
	@if command -v $(NVCC) >/dev/null 2>&1; then $(MAKE) --no-print-directory cuda-check; fi
	@$(MAKE) --no-print-directory run-tests TEST_PYTHON=$(VENV_PYTHON)

# pytest exits 5 when it collects nothing; that is a failure here, not a pass.
TEST_PYTHON ?= $(VENV_PYTHON)
TEST_PATHS ?= tests
run-tests:
	@status=0; $(TEST_PYTHON) -m pytest $(TEST_PATHS) -q || status=$$?; \
	if [ $$status -eq 5 ]; then echo "make: pytest collected no tests under $(TEST_PATHS)" >&2; fi; \
	exit $$status
	@if [ "$(TEST_PATHS)" = tests ] && ls benchmarks/test_*.py >/dev/null 2>&1; then \
		status=0; $(TEST_PYTHON) -m pytest benchmarks -q --benchmark-disable || status=$$?; \
		if [ $$status -eq 5 ]; then echo "make: pytest collected no tests under benchmarks/" >&2; fi; \
		exit $$status; \
	fi

# The whole suite on the newest transformers/peft/accelerate (and everything else) that pip
# finds today, in .venv-latest; torch stays $(TORCH_SPEC). Then `make lock` pins what passed.
test-latest:
	$(call install_into,.venv-latest,--upgrade --upgrade-strategy eager)
	.venv-latest/bin/python -m pip list 2>/dev/null | grep -iE '^(transformers|peft|accelerate|tokenizers|safetensors) '
	$(MAKE) --no-print-directory run-tests TEST_PYTHON=.venv-latest/bin/python

# The floor: the transformers/peft versions pyproject.toml declares as the oldest supported,
# in .venv-oldest, running the tests that touch them ($(HF_TESTS)).
test-oldest:
	$(call install_into,.venv-oldest,-c $(CONSTRAINTS_OLDEST),-c $(CONSTRAINTS))
	.venv-oldest/bin/python -m pip list 2>/dev/null | grep -iE '^(transformers|peft|accelerate|tokenizers) '
	$(MAKE) --no-print-directory run-tests TEST_PYTHON=.venv-oldest/bin/python TEST_PATHS="$(HF_TESTS)"

# Rewrite $(CONSTRAINTS) from .venv-latest (run `make test-latest` first; commit if it passed).
lock:
	test -x .venv-latest/bin/python || { echo "make lock: run make test-latest first" >&2; exit 2; }
	{ echo "# Exact versions the suite passed with; written by 'make lock' from .venv-latest."; \
	  echo "# torch comes from TORCH_SPEC (Makefile), so it is not pinned here."; \
	  .venv-latest/bin/python -m pip freeze --all --exclude-editable | grep -viE '^(torch|mlan-kernels|pip)=='; } > $(CONSTRAINTS)

# A source install as a user does it: build the sdist, install it without build isolation into
# a scratch folder, and import the compiled extension from outside the source tree.
sdist-check: venv
	rm -rf build/sdist-check && mkdir -p build/sdist-check
	$(VENV_PYTHON) -c 'from setuptools import build_meta; print(build_meta.build_sdist("build/sdist-check"))'
	MAX_JOBS=2 $(VENV_PYTHON) -m pip install -q --no-build-isolation --no-deps \
		--target build/sdist-check/site build/sdist-check/*.tar.gz
	cd build/sdist-check && PYTHONPATH=site ../../$(VENV_PYTHON) -c 'import os, mlan_kernels, mlan_kernels._C as c; \
		assert c.__file__.startswith(os.getcwd()), c.__file__; size = os.path.getsize(c.__file__); \
		assert b".debug_info" not in open(c.__file__, "rb").read(), "debug info in a release build"; \
		print("sdist-check:", c.__file__, f"{size / 2**20:.1f} MiB")'

# Compile-only check of every "cuda" source of $(SOURCE_LIST) for Ampere and Hopper (no GPU
# needed, only nvcc).
cuda-check:
	@sources="$$(awk '$$1 == "cuda" { print $$2 }' $(SOURCE_LIST) 2>/dev/null)"; \
	if [ -z "$$sources" ]; then echo "cuda-check: no cuda sources in $(SOURCE_LIST), nothing to compile"; exit 0; fi; \
	includes="-Icsrc"; \
	if [ -x $(VENV_PYTHON) ]; then includes="$$includes $$($(VENV_PYTHON) -c 'from torch.utils.cpp_extension import include_paths; print(" ".join("-I" + p for p in include_paths()))' 2>/dev/null)"; fi; \
	workdir="$$(mktemp -d)"; trap 'rm -rf "$$workdir"' EXIT; \
	for source in $$sources; do \
		echo "cuda-check: $(NVCC) $$source"; \
		$(NVCC) -std=c++17 $(NVCC_GENCODE) $$includes -c "$$source" -o "$$workdir/$$(echo $$source | tr / _).o" || exit 1; \
	done; \
	echo "cuda-check: compiled $$(echo "$$sources" | wc -l) file(s)"

# CMake build of the CPU kernels against the venv's torch, and their C++ test via ctest. With a
# CUDA build of torch, CMakeLists.txt finds the CUDA toolkit as setup.py does (cmake/cuda_toolkit.py).
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
# separated by spaces, or MODULE=all for every module in python/mutation.py's table. Some of a
# module's functions: `python/mutation.py MODULE --only '<mutant name pattern>' ...`.
# Scores and how long each module took: docs/testing.md.
MODULE ?=
mutation: venv
	@test -n "$(MODULE)" || { echo "make mutation: pass MODULE=mlan_kernels/<path>.py (or all)" >&2; exit 2; }
	@$(VENV_PYTHON) -c "import mutmut" 2>/dev/null || $(VENV_PYTHON) -m pip install -q "mutmut>=3.8,<4"
	$(VENV_PYTHON) python/mutation.py $(MODULE)

# Semantic mutants (not part of `make test`): the hand-written plausible bugs of
# tests/semantic_mutants.json, each applied in a scratch copy of the tree and its listed tests
# run (pytest -x -q); prints killed/survived and the score (docs/testing.md). Some of them:
# `python/mutation_semantic.py --only ID ...`; `--baseline` runs the selections unmutated.
mutation-semantic: venv
	$(VENV_PYTHON) python/mutation_semantic.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .benchmarks
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -type d -prune -exec rm -rf {} + \) -o \( -name '*.so' -type f -exec rm -f {} + \)

distclean: clean
	rm -rf $(VENV) .venv-latest .venv-oldest
