# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test bench clean

# install.sh does the work (venv, packages, ComfyUI pinned by hash); the stamp skips it when
# nothing it depends on changed.
$(STAMP): pyproject.toml install.sh agent/comfy/vendor.py agent/chat/build.py
	PYTHON=$(PYTHON) VENV=$(VENV) ./install.sh --dev --yes
	touch $@

# (vendor/ is git-ignored; if it went missing, provision again.)
vendor/comfyui/.gpugate-provisioned: $(STAMP)
	$(BIN)/gpugate --log-level WARNING comfy provision
	@touch $@

# (and llama-server, built once per machine into ~/.cache/gpugate/llama.cpp/, copied from there)
vendor/llama.cpp/llama-server: $(STAMP)
	$(BIN)/gpugate --log-level WARNING llm provision >/dev/null

install: $(STAMP) vendor/comfyui/.gpugate-provisioned vendor/llama.cpp/llama-server

run: install
	$(BIN)/gpugate up

# pytest's exit code 5 means no test ran: that is a failure here, never a pass.
test: install
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: no tests ran" >&2; exit 1; fi; exit $$rc

bench: install
	$(BIN)/python -m bench.overhead
	$(BIN)/python -m bench.router
	$(BIN)/python -m bench.dispatch
	$(BIN)/python -m bench.fairness
	$(BIN)/python -m bench.media
	$(BIN)/python -m bench.chat
	$(BIN)/python -m bench.stores
	$(BIN)/python -m bench.chaos

clean:
	rm -rf $(VENV) vendor data *.egg-info
