# The README's commands. Everything installs itself into .venv on first use (idempotent).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ddpmctl-installed
# A CPU build of torch (this pin lies on the project's machines' disk; an unpinned torch pulls a CUDA build).
TORCH_PIN ?= torch==2.13.0
DEMO_DIR ?= runs/demo

.PHONY: install test test-fast demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test]"
	# torch-fidelity for tests/test_fid_reference.py, without its dependencies: its torchvision would pull another
	# torch (the test needs none of torchvision). Optional: without it that test is skipped.
	$(PY) -m pip install -q --no-deps "torch-fidelity==0.4.0" "tqdm>=4" || echo "note: torch-fidelity not installed"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

# Everything but the torchrun and kill trials (marked slow).
test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

demo: install
	bash examples/demo.sh $(VENV)/bin/ddpmctl $(DEMO_DIR)

bench: install
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info
