# Two entry points: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv on first use and install the project with its test extras, torch pinned to the CPU wheel.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean azurite

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(MAKE) azurite
	touch $(STAMP)

# Azurite (the Azure Blob emulator the bucket tests start) into .npm/; without npm those tests skip.
AZURITE := .npm/node_modules/.bin/azurite-blob
azurite: $(AZURITE)
$(AZURITE):
	@if command -v npm >/dev/null; then npm install -s --prefix .npm --no-audit --no-fund azurite@3.35.0; \
	else echo "npm not found: the Azure bucket tests will skip (install Node.js 20 with npm, then make azurite)"; fi

install: $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py --nproc 4

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info .npm
