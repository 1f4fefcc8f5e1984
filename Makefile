# The two commands of the README. Each creates .venv on first use and installs the
# project into it; set PYTHON to choose the interpreter that creates it.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel is enough for the quick profile; on a GPU machine use
# `make book TORCH=torch` (or preinstall the CUDA build of your choice).
TORCH ?= torch==2.13.0
PROFILE ?= quick

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: book test lint clean

book: $(STAMP)
	$(BIN)/python -m eomlib.runner --profile $(PROFILE)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" \
		> $(VENV)/torch-pin.txt
	$(BIN)/python -m pip install --quiet -e ".[book,test,bench]" -c $(VENV)/torch-pin.txt
	touch $(STAMP)

clean:
	rm -rf _build executed figures
