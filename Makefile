# Two commands do all the set-up: `make test` and `make demo`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The CPU wheel of torch; pyproject keeps a range so that GPU installs elsewhere work.
TORCH  := torch==2.13.0

# Azurite, the Azure Blob emulator of tests/stores.py, from npm into the venv (make clean removes it with the rest).
# 3.35.0: the last release that runs on Node.js 20 (3.36 asks for 21, 3.37 for 22).
AZURITE     := azurite@3.35.0
AZURITE_BIN := $(VENV)/npm/node_modules/.bin/azurite-blob

# nanoVLM's data path for tests/test_presets.py (run by tests/nanovlm_ref.py in its own process): transformers 4.x
# (under 5 nanoVLM's label mask breaks) with the hub client and tokenizers it asks for, and torchvision's pure-Python
# transforms (its wheel's C++ operators do not load beside this torch; nanovlm_ref.py says how it does without);
# and a Hugging Face datasets that works with that hub client, for the VLM benchmark's nanoVLM contender
# (tools/bench/nanovlm_run.py; pyarrow, pandas and the rest come from the main environment).
NANOVLM_ENV := $(VENV)/nanovlm
NANOVLM_STAMP := $(NANOVLM_ENV)/.installed-stamp

# The 224 job's peers in the benchmark suite (tools/bench/peers.py), each in a folder of its own: their pins clash
# with this environment (MosaicML streaming: numpy<2.2 and transformers<5, so huggingface_hub<1; LitData: torchvision,
# whose wheel pulls another torch; Megatron-Energon: s3fs, whose aiobotocore pins an older botocore than boto3's), so
# each goes in with --no-deps, with the modules it imports that the venv lacks; the suite runs each contender in a
# process with its folder first on sys.path. torchvision's wheel: Mosaic imports it; peers.py says how it does
# without the wheel's C++ operators. Not part of `make test`: the suite reports a contender it cannot find as skipped.
PEERS := $(VENV)/peers
PEERS_STAMP := $(PEERS)/.installed-stamp
MOSAIC_DEPS := 'transformers>=4.48,<5' 'huggingface_hub<1' 'tokenizers<0.23' safetensors regex hf-xet xxhash zstd \
	python-snappy cramjam Brotli catalogue
ENERGON_DEPS := multi-storage-client mfusepy filetype rapidyaml xattr lark wcmatch bracex opentelemetry-api psutil \
	deprecation

.PHONY: test demo bench system-deps node-deps clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $(STAMP)

# Debian packages the tests use: nginx serves shards over HTTP on loopback, GNU tar writes interop shards,
# curl is how webdataset reads http:// URLs (the pipeline benchmark's webdataset contender), the Noto CJK and
# colour emoji fonts draw the contact sheet's CJK and emoji text (tests/test_sheet_fonts.py; 57 + 10 MB to download,
# the smallest Debian packages with those glyphs).
NOTO_FONTS := /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf

system-deps:
	@{ command -v nginx || test -x /usr/sbin/nginx; } >/dev/null 2>&1 && command -v tar >/dev/null 2>&1 && \
	  command -v curl >/dev/null 2>&1 && ls $(NOTO_FONTS) >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx tar curl \
	    fonts-noto-cjk fonts-noto-color-emoji >/dev/null; }

# Node.js and npm for Azurite: Debian's, where the machine has none.
node-deps:
	@{ command -v node && command -v npm; } >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; }

$(AZURITE_BIN): Makefile | node-deps
	npm install --prefix $(VENV)/npm --no-save --no-audit --no-fund --loglevel=error $(AZURITE)
	touch $@

$(NANOVLM_STAMP): $(STAMP)
	rm -rf $(NANOVLM_ENV)
	$(BIN)/pip install -q --no-warn-conflicts --target $(NANOVLM_ENV)/deps 'transformers>=4.48,<5' einops
	$(BIN)/pip install -q --no-deps --target $(NANOVLM_ENV)/torchvision 'torchvision>=0.17,<1'
	$(BIN)/pip install -q --no-deps --target $(NANOVLM_ENV)/datasets 'datasets>=4,<5' 'fsspec>=2023.1,<=2026.2.0' \
	  'httpx<1' httpcore anyio h11 sniffio
	touch $@

$(PEERS_STAMP): $(STAMP)
	rm -rf $(PEERS)
	$(BIN)/pip install -q --no-deps --target $(PEERS)/mosaic mosaicml-streaming==0.13.0 $(MOSAIC_DEPS)
	$(BIN)/pip install -q --no-deps --target $(PEERS)/litdata litdata==0.2.76 lightning-utilities
	$(BIN)/pip install -q --no-deps --target $(PEERS)/energon megatron-energon==7.4.1 $(ENERGON_DEPS)
	$(BIN)/pip install -q --no-deps --target $(PEERS)/torchvision 'torchvision>=0.17,<1'
	touch $@

test: $(STAMP) system-deps $(AZURITE_BIN) $(NANOVLM_STAMP)
	$(BIN)/python -m pytest -q tests

# The whole story in a few minutes: pack easy-VQA, serve it with nginx on loopback, stream it into a tiny VLM,
# train, evaluate on the held-out split and print the summary (docs/SMOKE.md).
demo: $(STAMP) system-deps
	$(BIN)/python tools/smoke_train.py

# The benchmark suite behind docs/BENCHMARKS.md (its figures in bench-out/; add --write-docs docs/BENCHMARKS.md).
bench: $(STAMP) system-deps $(PEERS_STAMP)
	$(BIN)/python tools/bench/suite.py

clean:
	rm -rf $(VENV) out .pytest_cache
