# Set-up and everyday commands. Every target creates the venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench bench-peers screenshot clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[testing,spatialdata,distributed]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/stlnmf demo --out results --overwrite

# installs Xvfb and Qt's X11 libraries first where missing and possible (root or passwordless sudo);
# without them the napari GUI tests are skipped with the reason
test: $(STAMP)
	@bash scripts/install-gui-deps.sh
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run_benchmarks.py

bench-peers:
	bash benchmarks/peers/install.sh

screenshot: $(STAMP)
	@bash scripts/install-gui-deps.sh
	xvfb-run -a -s "-screen 0 1400x900x24" $(BIN)/python docs/make_screenshot.py

clean:
	rm -rf $(VENV) results build dist src/*.egg-info
