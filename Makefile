# Set-up, demo and tests. Every target is idempotent: a second run skips what is done.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# The demo's budget: small enough for a laptop CPU; `make demo DEMO_EPOCHS=80 DEMO_CYCLE=2` for the study's.
DEMO_EPOCHS ?= 10
DEMO_CYCLE ?= 1
DEMO_DIR ?= runs/demo

.PHONY: setup data demo test lint typecheck clean bench-serving bench-metrics

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[train,serve,dev]'
	touch $(STAMP)

# Debian packages: the Fashion-MNIST data set, and Prometheus (promtool and a real server for the tests).
DEB_PACKAGES := dataset-fashion-mnist prometheus
data: $(FASHION_MNIST) /usr/bin/promtool

$(FASHION_MNIST) /usr/bin/promtool &:
	@if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; else \
	  echo "missing Debian packages: run 'apt-get install $(DEB_PACKAGES)' as root"; exit 1; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $(DEB_PACKAGES)

demo: setup data
	$(BIN)/valley-train train --dataset fashion-mnist --model cnn --epochs $(DEMO_EPOCHS) --out $(DEMO_DIR)/base --resume
	$(BIN)/valley-train fge --from $(DEMO_DIR)/base --cycle-epochs $(DEMO_CYCLE) --out $(DEMO_DIR)/fge --resume
	$(BIN)/valley-train export --from $(DEMO_DIR)/fge --name fashion-mnist --version 1 --overwrite --out $(DEMO_DIR)/ensembles
	@echo "report: $(DEMO_DIR)/fge/report.json  plot: $(DEMO_DIR)/fge/plots/ensemble_size.png  ensemble: $(DEMO_DIR)/ensembles/fashion-mnist/1"
	$(BIN)/python examples/classify.py --serve $(DEMO_DIR)/ensembles --model fashion-mnist

test: setup data
	$(BIN)/pytest
	$(BIN)/ruff check .
	$(BIN)/mypy

# The serving benchmark's Triton baseline needs PyTriton in a venv made from Debian's own python3.11.
PYTRITON_VENV := .venv-pytriton
$(PYTRITON_VENV)/.installed: benchmarks/pytriton-requirements.txt
	/usr/bin/python3.11 -m venv $(PYTRITON_VENV)
	$(PYTRITON_VENV)/bin/pip install -q -r benchmarks/pytriton-requirements.txt
	touch $@

bench-serving: setup $(PYTRITON_VENV)/.installed
	$(BIN)/python benchmarks/serving_throughput.py --json runs/serving-throughput.json

# What the metrics cost: per call in process, then valley's throughput with metrics on vs off.
bench-metrics: setup
	$(BIN)/python benchmarks/metrics_cost.py
	$(BIN)/python benchmarks/metrics_throughput.py --blocks 4

lint: setup
	$(BIN)/ruff check .

typecheck: setup
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(PYTRITON_VENV) .mypy_cache .ruff_cache .pytest_cache
