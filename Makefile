# Set-up, demo and tests. Every target is idempotent: a second run skips what is done.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# The demo's budgets, chosen on the validation split (docs/results.md, "The demo's budgets"): two
# networks on a 10000-image training subset, FGE from the first one's epoch 20 (so FGE and that
# network cost the same 40 epochs), a Bezier curve between the two, 6 points off it.
DEMO_SUBSET ?= 10000
DEMO_EPOCHS ?= 40
DEMO_FGE_START ?= 20
DEMO_CYCLE ?= 4
DEMO_LR1 ?= 0.05
DEMO_LR2 ?= 0.005
DEMO_CURVE_EPOCHS ?= 40
DEMO_CURVE_POINTS ?= 6
DEMO_DIR ?= runs/demo

.PHONY: setup setup-demo data data-demo demo test test-long lint typecheck clean bench-serving bench-metrics \
  bench-feedback

# pip runs without -q where it downloads gigabytes (torch): its progress bars show the set-up is alive.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Everything: training, serving, the client, and the test and lint tools.
setup: $(STAMP)
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -c constraints.txt -e '.[train,serve,client,dev,timm]'
	touch $(STAMP) $(DEMO_STAMP)

# What the demo runs: training, serving and the client, no test tools.
setup-demo: $(DEMO_STAMP)
$(DEMO_STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -c constraints.txt -e '.[train,serve,client]'
	touch $(DEMO_STAMP)

# $(call apt_install,PACKAGES): one apt-get update, then the Debian packages without their recommends.
apt_install = if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; else \
  echo "missing Debian packages: run 'apt-get install --no-install-recommends $(1)' as root"; exit 1; fi; \
  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(1)

# The tests: the Fashion-MNIST data set, Prometheus (promtool and a real server), qemu-user (INT8 graphs run on an
# emulated CPU without VNNI) and PostgreSQL (the fleet's feedback store; the tests start a throwaway cluster of their
# own). One apt-get for whatever is missing, nothing when all is there.
data:
	@missing=; \
	[ -f $(FASHION_MNIST) ] || missing="$$missing dataset-fashion-mnist"; \
	[ -x /usr/bin/promtool ] || missing="$$missing prometheus"; \
	[ -x /usr/bin/qemu-x86_64 ] || missing="$$missing qemu-user"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	[ -z "$$missing" ] || { $(call apt_install,$$missing); }

# The demo: the data set alone.
data-demo:
	@[ -f $(FASHION_MNIST) ] || { $(call apt_install,dataset-fashion-mnist); }

DEMO_TRAIN := --dataset fashion-mnist --model cnn --subset $(DEMO_SUBSET) --epochs $(DEMO_EPOCHS) \
  --save-epoch $(DEMO_FGE_START) --resume
DEMO_MODELS := fashion-mnist-single fashion-mnist-fge fashion-mnist-curve
demo: setup-demo data-demo
	$(BIN)/valley-train train $(DEMO_TRAIN) --seed 0 --out $(DEMO_DIR)/base
	$(BIN)/valley-train train $(DEMO_TRAIN) --seed 1 --out $(DEMO_DIR)/base-2
	$(BIN)/valley-train fge --from $(DEMO_DIR)/base --start-epoch $(DEMO_FGE_START) --cycle-epochs $(DEMO_CYCLE) \
	  --lr1 $(DEMO_LR1) --lr2 $(DEMO_LR2) --out $(DEMO_DIR)/fge --resume
	$(BIN)/valley-train curve --start $(DEMO_DIR)/base --end $(DEMO_DIR)/base-2 --epochs $(DEMO_CURVE_EPOCHS) \
	  --out $(DEMO_DIR)/curve --resume
	$(BIN)/valley-train curve-eval $(DEMO_DIR)/curve --points 11
	$(BIN)/valley-train export --from $(DEMO_DIR)/base --name fashion-mnist-single --version 1 --overwrite --out $(DEMO_DIR)/ensembles
	$(BIN)/valley-train export --from $(DEMO_DIR)/fge --name fashion-mnist-fge --version 1 --overwrite --out $(DEMO_DIR)/ensembles
	$(BIN)/valley-train export --from $(DEMO_DIR)/curve --num-points $(DEMO_CURVE_POINTS) --name fashion-mnist-curve \
	  --version 1 --overwrite --out $(DEMO_DIR)/ensembles
	$(BIN)/python examples/compare_ensembles.py --serve $(DEMO_DIR)/ensembles $(addprefix --model ,$(DEMO_MODELS)) \
	  --budget fashion-mnist-single=$(DEMO_EPOCHS) --budget fashion-mnist-fge=$(DEMO_EPOCHS) \
	  --budget fashion-mnist-curve=$$(( 2 * $(DEMO_EPOCHS) + $(DEMO_CURVE_EPOCHS) ))
	@echo "plots: $(DEMO_DIR)/fge/plots/ensemble_size.png  $(DEMO_DIR)/curve/plots/curve.png"
	@echo "reports: $(DEMO_DIR)/base/report.json  $(DEMO_DIR)/fge/report.json  $(DEMO_DIR)/curve/report.json"

test: setup data
	$(BIN)/pytest
	$(BIN)/ruff check .
	$(BIN)/mypy

# The long reliability runs (docs/RELIABILITY.md): the full fuzz campaign, many crash points, sustained overload.
test-long: setup data
	$(BIN)/pytest -m long

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

# What the feedback store costs: memory vs the embedded SQLite vs PostgreSQL, every request with an id.
bench-feedback: setup data
	$(BIN)/python benchmarks/feedback_store_cost.py --blocks 4

lint: setup
	$(BIN)/ruff check .

typecheck: setup
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(PYTRITON_VENV) .mypy_cache .ruff_cache .pytest_cache
