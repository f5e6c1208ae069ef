# Two commands do all the set-up: `make test` and `make demo`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The CPU wheel of torch; pyproject keeps a range so that GPU installs elsewhere work.
TORCH  := torch==2.13.0

.PHONY: test demo bench system-deps clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $(STAMP)

# Debian packages the tests use: nginx serves shards over HTTP on loopback, GNU tar writes interop shards,
# curl is how webdataset reads http:// URLs (the pipeline benchmark's webdataset contender).
system-deps:
	@{ command -v nginx || test -x /usr/sbin/nginx; } >/dev/null 2>&1 && command -v tar >/dev/null 2>&1 && \
	  command -v curl >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx tar curl >/dev/null; }

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q tests

# The whole story in a few minutes: pack easy-VQA, serve it with nginx on loopback, stream it into a tiny VLM,
# train, evaluate on the held-out split and print the summary (docs/SMOKE.md).
demo: $(STAMP) system-deps
	$(BIN)/python tools/smoke_train.py

bench: $(STAMP) system-deps
	$(BIN)/python tools/bench/tar.py
	$(BIN)/python tools/bench/pipeline.py
	$(BIN)/python tools/bench/pipeline.py --memory

clean:
	rm -rf $(VENV) out .pytest_cache
