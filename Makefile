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

.PHONY: book test lint chromium clean

book: $(STAMP)
	$(BIN)/python -m eomlib.runner --profile $(PROFILE)

test: $(STAMP) chromium
	$(BIN)/python -m pytest

# The browser test (tests/test_browser.py) needs Chromium, so `make test` asks for
# it. As root with apt-get (CI), this installs Debian's package when it is missing;
# elsewhere it only says what is missing, and the test skips.
CHROMIUM ?= /usr/bin/chromium
chromium:
	@if [ -x $(CHROMIUM) ]; then \
		echo "Chromium is installed: $(CHROMIUM)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null; then \
		apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends chromium; \
	else \
		echo "Chromium is missing at $(CHROMIUM); install it (as root:" \
			"apt-get install chromium) to run the browser test" >&2; \
	fi

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
