# Two commands: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PRESET ?= demo

.PHONY: demo test test-quality test-avx2 lint format install bench-data bench-models clean

install: $(STAMP)

# Re-install only when a dependency file changes. pip (not uv) so the local CPU torch wheel is used.
$(STAMP): requirements.txt requirements-nodeps.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt -c constraints.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pipelines.run --config $(PRESET)

test: $(STAMP)
	$(PY) -m pytest -q tests

# Ranking quality on real data (MovieLens, a few minutes): like AUC above a bound set from measured
# seeds (tests/quality). Apart from `make test`, which deselects it; .ci/run calls both.
test-quality: $(STAMP)
	$(PY) -m pytest -q -s -m quality tests/quality

# The CPU-sensitive tests again with ATen and oneDNN held to AVX2: an AVX-512 machine then makes
# the kernel choices (models/capability.py reads both variables) and runs the kernels an AVX2-only
# CPU would, so CI on any machine catches what an AVX2 laptop or runner would hit.
CPU_SENSITIVE := tests/models tests/pipelines/test_bench_perf.py tests/pipelines/test_bench_models.py \
	tests/pipelines/test_train_perf.py
test-avx2: $(STAMP)
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest -q $(CPU_SENSITIVE)

# ruff lint + format check (configured in pyproject.toml); `make format` rewrites in place.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench-data: $(STAMP)
	$(PY) -m pipelines.bench data --events 5000000 --json bench/data.json

bench-models: $(STAMP)
	$(PY) -m pipelines.bench models --json bench/models.json

# Outputs of local runs; bench results only where git does not track them (the committed ones are
# README's figures), and only inside a git checkout (elsewhere every bench file is kept).
clean:
	rm -rf lake wandb .pytest_cache .hypothesis
	if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
		git ls-files -z --others -- 'bench/*.json' | xargs -0r rm -f; fi
