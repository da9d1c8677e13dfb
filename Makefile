# pymod_push — see README.md. Everything a fresh Debian machine needs is installed here.
SHELL := /bin/bash
PYTHON3 := /usr/bin/python3
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
RUN_DIR := $(CURDIR)/run
APT_PACKAGES := ejabberd erlang-dev python3-venv postgresql prometheus

.PHONY: all deps reach venv test lint unit e2e run stop bench clean test-compat

all: test

# Debian's ejabberd 23.01 and the Erlang headers (and PostgreSQL, Prometheus for the
# tests), when missing.
deps:
	@if ! command -v ejabberdctl >/dev/null || ! command -v erlc >/dev/null \
	    || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
	    || ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null \
	    || ! $(PYTHON3) -c 'import venv, ensurepip' 2>/dev/null; then \
	  echo "installing $(APT_PACKAGES) with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi

# The virtual environment is made with Debian's python3 so that the ejabberd
# user, which runs the port program, can execute it.
$(VENV)/.installed: pyproject.toml | deps
	$(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	chmod -R a+rX $(CURDIR)
	touch $@

venv: deps $(VENV)/.installed

# Before anything else: the ejabberd user must reach the checkout's .venv/bin/python.
reach:
	@devtools/check-reach.sh $(CURDIR)

lint: venv
	$(VENV)/bin/ruff check pymod_push devtools tests bench examples
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports  # the layers: contracts in pyproject.toml, drawn in docs/architecture.md

unit: venv
	$(VENV)/bin/pytest -q -m 'not e2e'

e2e: venv
	$(VENV)/bin/pytest -q -m e2e

# Two workers (TEST_WORKERS), each running whole test files (module fixtures set up once):
# most of an end-to-end test is waiting on ejabberd, the network or a timeout, so two
# share the two cores: 8.6 instead of 13.8 minutes here. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: reach venv lint
	$(VENV)/bin/pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

# The whole suite in a Debian chroot with that release's ejabberd (built once, cached in
# /var/cache/pymod_push-compat; needs root): DIST=bookworm-backports|trixie|sid.
DIST ?= trixie
test-compat:
	devtools/compat.sh $(DIST) test

run: reach venv
	$(PY) -m devtools.instance start $(RUN_DIR)

stop:
	@if [ -x $(PY) ]; then $(PY) -m devtools.instance stop $(RUN_DIR); fi

bench: venv
	$(PY) -m bench.port_events
	$(PY) -m bench.port_events --sessions 20000 --messages 200000 --latency-samples 200  # at scale
	$(PY) -m bench.provider_dispatch
	$(PY) -m bench.versus_builtin
	$(PY) -m bench.appserver_apns
	$(PY) -m bench.appserver_port
	$(PY) -m bench.appserver_port --users 20000 --messages 40000 --rounds 2  # at scale
	$(PY) -m bench.appserver_port --users 1000 --messages 20000 --rate 4000  # as ejabberd sends them
	$(PY) -m bench.groupchat  # 13 minutes: groupchat_pushes' cost per message (docs/benchmarks.md)
	$(PY) -m bench.unifiedpush  # UnifiedPush POSTs/s accepted and delivered, beside a XEP-0357 push (docs/benchmarks.md)
	$(PY) -m bench.pending_memory  # 30 minutes: memory per pending session (docs/security.md)

clean: stop
	rm -rf $(VENV) $(RUN_DIR) .pytest_cache .mypy_cache .ruff_cache .hypothesis
