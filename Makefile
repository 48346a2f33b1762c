# Two commands a new user needs: `make demo` and `make test`.
# Both create (or reuse) a local virtual environment in .venv with the exact tested set of
# requirements/current.txt. `make test-floor` runs the suite again in .venv-floor at the oldest
# supported versions (requirements/floor.txt, the lower bounds of pyproject.toml).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FLOOR_VENV ?= .venv-floor
FLOOR_PY := $(FLOOR_VENV)/bin/python
# tests run in the floor environment (CI: all of them; FLOOR_TESTS="tests/test_aligner.py" for a quick look)
FLOOR_TESTS ?= tests
# torch is installed first and on its own: the pinned release resolves to the local CPU wheel
# where one is provided; set TORCH_INDEX (e.g. the PyTorch CPU index) on machines that should not
# pull the CUDA build. The floor's torch is the same release unless TORCH_FLOOR says otherwise
# (2.5.1 was run by hand: a CUDA build of several GB from PyPI).
TORCH_SPEC ?= torch==2.13.0
TORCH_FLOOR ?= $(TORCH_SPEC)
TORCH_INDEX ?=
PIP_TORCH_FLAGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1

.PHONY: install test test-floor demo report-demo app lint bench lock clean-venv

$(VENV)/.installed: pyproject.toml requirements/current.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_TORCH_FLAGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c requirements/current.txt -e ".[dev,spacy-model]"
	@touch $@

# the tests also exercise the optional extras: the dense CRF (pydensecrf2 compiles in about a
# minute where no wheel exists), the mmsegmentation cross-check of the IoU arithmetic and the
# explorer page (gradio; its browser test drives the system's Chromium, see .ci/run)
$(VENV)/.installed-extras: $(VENV)/.installed
	$(PY) -m pip install -q -c requirements/current.txt -e ".[dev,spacy-model,crf,mmseg,app]"
	@touch $@

$(VENV)/.installed-app: $(VENV)/.installed
	$(PY) -m pip install -q -c requirements/current.txt -e ".[dev,spacy-model,app]"
	@touch $@

$(FLOOR_VENV)/.installed: pyproject.toml requirements/floor.txt
	@test -x $(FLOOR_PY) || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_PY) -m pip install -q --upgrade pip
	$(FLOOR_PY) -m pip install -q $(PIP_TORCH_FLAGS) "$(TORCH_FLOOR)"
	grep -v '^torch==' requirements/floor.txt > $(FLOOR_VENV)/constraints.txt
	$(FLOOR_PY) -m pip install -q -c $(FLOOR_VENV)/constraints.txt -e ".[dev,spacy-model]"
	@touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed-extras
	$(OFFLINE) $(PY) -m pytest -q --durations=5

test-floor: $(FLOOR_VENV)/.installed
	$(FLOOR_PY) -m pip list --format=freeze 2>/dev/null | grep -i -E '^(torch|diffusers|transformers|accelerate|huggingface.hub|compel|numpy)=='
	$(OFFLINE) $(FLOOR_PY) -m pytest -q -p no:cacheprovider $(FLOOR_TESTS)

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m elbo_t2ialign.demo

# the offline grid (configs/grid/demo.yaml: 3 shapes splits x template and caption prompts, strengths
# 1/3/5) run cell by cell, evaluated, and reported in runs/grid/demo/report (about 2 min on 2 CPU cores)
report-demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m elbo_t2ialign.testbed.world --ensure
	HF_HUB_OFFLINE=1 $(PY) -m elbo_t2ialign.grid demo

# the explorer page on the bundled testbed model, offline, on http://127.0.0.1:7860 (this machine
# only); run folders under runs/ can be opened (APP_ARGS="model=sd15 elbo=default" for a real model)
APP_ARGS ?=
app: $(VENV)/.installed-app
	mkdir -p runs
	HF_HUB_OFFLINE=1 $(PY) -m elbo_t2ialign.app runs=runs $(APP_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check elbo_t2ialign tests scripts setup.py
	$(VENV)/bin/ruff format --check elbo_t2ialign tests scripts setup.py

bench: $(VENV)/.installed
	$(PY) -m elbo_t2ialign.devtools.bench --compare

# after an upgrade that passes `make test`: write the environment's exact versions
lock: $(VENV)/.installed
	{ sed -n '1,2p' requirements/current.txt; $(PY) -m pip freeze --all --exclude-editable | grep -v '^pip==' | sed 's/+cpu$$//'; } > requirements/current.lock.tmp
	mv requirements/current.lock.tmp requirements/current.txt

clean-venv:
	rm -rf $(VENV) $(FLOOR_VENV)
