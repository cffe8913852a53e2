# The two commands of the README: `make run` and `make test`. Both build `.venv` themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PORT   ?= 8080
# `make soak`: minutes of mixed and hostile traffic (bench/soak.py); not part of `make test`.
SOAK_MINUTES ?= 10
METRICS_PORT ?= 9464
# promtool and prometheus from Debian's `prometheus` package, unpacked here (not installed as a
# service): `make test` lints metrics and rules with promtool, bench/prometheus_scrape.py runs
# prometheus.
PROMETHEUS_DIR := .cache/prometheus
PROMTOOL       := $(PROMETHEUS_DIR)/usr/bin/promtool
# docker-registry (CNCF distribution 2.8.2) from Debian's `docker-registry` package, unpacked the
# same way: the oci: tests push to and pull from a real registry on 127.0.0.1.
REGISTRY_DIR    := .cache/docker-registry
DOCKER_REGISTRY := $(REGISTRY_DIR)/usr/bin/docker-registry
# nats-server (2.9.10) from Debian's `nats-server` package, unpacked the same way: the
# `--store nats://` tests run a real JetStream server on 127.0.0.1 (tests/nats_server.py).
NATS_DIR    := .cache/nats
NATS_SERVER := $(NATS_DIR)/usr/sbin/nats-server

.PHONY: run test lint format bench bench-prometheus bench-attacks soak clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(PROMTOOL):
	mkdir -p $(PROMETHEUS_DIR)
	cd $(PROMETHEUS_DIR) && \
		{ apt-get download prometheus || { apt-get update -qq && apt-get download prometheus; }; }
	dpkg-deb -x $(PROMETHEUS_DIR)/prometheus_*.deb $(PROMETHEUS_DIR)
	rm -f $(PROMETHEUS_DIR)/prometheus_*.deb

$(DOCKER_REGISTRY):
	mkdir -p $(REGISTRY_DIR)
	cd $(REGISTRY_DIR) && \
		{ apt-get download docker-registry || \
			{ apt-get update -qq && apt-get download docker-registry; }; }
	dpkg-deb -x $(REGISTRY_DIR)/docker-registry_*.deb $(REGISTRY_DIR)
	rm -f $(REGISTRY_DIR)/docker-registry_*.deb

$(NATS_SERVER):
	mkdir -p $(NATS_DIR)
	cd $(NATS_DIR) && \
		{ apt-get download nats-server || { apt-get update -qq && apt-get download nats-server; }; }
	dpkg-deb -x $(NATS_DIR)/nats-server_*.deb $(NATS_DIR)
	rm -f $(NATS_DIR)/nats-server_*.deb

run: $(VENV)/.installed
	PORT=$(PORT) $(VENV)/bin/wasm-supervisor serve --listen 127.0.0.1:$(PORT) \
		--tenants tenants --policies policies --metrics-listen 127.0.0.1:$(METRICS_PORT)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint $(PROMTOOL) $(DOCKER_REGISTRY) $(NATS_SERVER)
	$(PY) -m pytest -q

bench: $(VENV)/.installed $(NATS_SERVER)
	$(PY) bench/run.py
	$(PY) bench/pod_start.py
	$(PY) bench/store_propagation.py
	$(PY) bench/fresh_pod.py

bench-prometheus: $(VENV)/.installed $(PROMTOOL)
	$(PY) bench/prometheus_scrape.py

bench-attacks: $(VENV)/.installed
	$(PY) bench/attacks.py

soak: $(VENV)/.installed
	$(PY) bench/soak.py --minutes $(SOAK_MINUTES)

clean:
	rm -rf $(VENV) build *.egg-info
