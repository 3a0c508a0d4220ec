# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test bench clean

# The virtual environment with gpugate, ComfyUI's dependencies and the test tools.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[agent,dev]'
	touch $@

# ComfyUI 0.3.75, pinned by hash, into vendor/comfyui (a no-op when already there).
install: $(STAMP)
	$(BIN)/gpugate --log-level WARNING comfy provision

run: install
	$(BIN)/gpugate agent

# pytest's exit code 5 means no test ran: that is a failure here, never a pass.
test: install
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: no tests ran" >&2; exit 1; fi; exit $$rc

bench: install
	$(BIN)/python -m bench.overhead

clean:
	rm -rf $(VENV) vendor data *.egg-info
