# Two commands for a fresh Linux/macOS machine:  make demo   and   make test
# Both create .venv if it is missing and install motiontune with the pinned dependency set.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned, so nothing pulls a multi-GB CUDA build onto a CPU machine
	$(BIN)/python -m pip install --quiet -c constraints.txt torch
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/motiontune demo --out demo-output

# two test processes (pytest-xdist): the suite's tiny models run one torch thread each (tests/conftest.py);
# loadgroup keeps a module marked xdist_group (the browser tests, which share one session in order) on one worker
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

clean:
	rm -rf $(VENV) demo-output .pytest_cache
