# Two commands a new user needs: `make demo` and `make test`.
# Both create (or reuse) a local virtual environment in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and on its own: the pinned release resolves to the
# local CPU wheel where one is provided; set TORCH_INDEX (e.g. the PyTorch CPU
# index) on machines that should not pull the CUDA build.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PIP_TORCH_FLAGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

.PHONY: install test demo report-demo lint bench clean-venv

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_TORCH_FLAGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

# the tests also exercise the optional extras: the dense CRF (pydensecrf2 compiles in about a
# minute where no wheel exists) and the mmsegmentation cross-check of the IoU arithmetic
$(VENV)/.installed-extras: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev,crf,mmseg]"
	@touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed-extras
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q --durations=5

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m elbo_t2ialign.demo

# the offline grid (configs/grid/demo.yaml: 3 shapes splits x template and caption prompts, strengths
# 1/3/5) run cell by cell, evaluated, and reported in runs/grid/demo/report (about 2 min on 2 CPU cores)
report-demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m elbo_t2ialign.testbed.world --ensure
	HF_HUB_OFFLINE=1 $(PY) -m elbo_t2ialign.grid demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check elbo_t2ialign tests scripts setup.py
	$(VENV)/bin/ruff format --check elbo_t2ialign tests scripts setup.py

bench: $(VENV)/.installed
	$(PY) -m elbo_t2ialign.devtools.bench --compare

clean-venv:
	rm -rf $(VENV)
