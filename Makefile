# variant-autoscaler developer entry points. Every target installs what it needs itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo plan-demo test bench lint system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

## demo: the main job on an embedded default (no cluster needed): simulate the default scenario,
## compare autoscaling policies, write the report folder
demo: venv
	$(VENV)/bin/variant-autoscaler simulate

## plan-demo: plan the bundled example fleet
plan-demo: venv
	$(VENV)/bin/variant-autoscaler plan examples/fleet.yaml

## test: the whole suite (installs the venv and the Debian packages tests need)
test: venv system-deps
	PATH="$(CURDIR)/bin:$$PATH" $(PY) -m pytest -q tests

## system-deps: Debian packages and binaries the tests use (real Prometheus, etcd, helm)
system-deps:
	@bash scripts/install-system-deps.sh

## bench: benchmarks under benchmarks/, figures printed
bench: venv
	$(PY) -m pytest -q benchmarks -o python_files='bench_*.py' --benchmark-columns=min,mean,max,rounds -s

lint: venv
	$(VENV)/bin/ruff check optimizer operator tests benchmarks

.PHONY: live
## live: emulated cluster + Prometheus + emulated model servers + the operator + a load ramp, 5 min (Ctrl-C stops);
## the gateway follows the operator's saturation and weights (GATEWAY=weighted: weights, no holds;
## GATEWAY=least-outstanding: the plain one)
live: venv system-deps
	$(PY) -m variant_autoscaler_testbed.live --duration $(or $(DURATION),300) $(if $(GATEWAY),--gateway $(GATEWAY))

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks reports

# ---- packaging (charts/, deploy/, Dockerfile) --------------------------------------------------
IMAGE ?= variant-autoscaler:$(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}/\1/p' charts/variant-autoscaler/Chart.yaml)
TESTBED_IMAGE ?= $(subst variant-autoscaler:,variant-autoscaler-testbed:,$(IMAGE))
HELM ?= $(if $(wildcard bin/helm),bin/helm,helm)

.PHONY: chart-lint manifests image testbed-image kind-e2e

## chart-lint: `helm lint --strict` and a render of the chart (helm comes from `make system-deps`)
chart-lint: system-deps
	$(HELM) lint --strict charts/variant-autoscaler
	$(HELM) template variant-autoscaler charts/variant-autoscaler --include-crds >/dev/null

## manifests: regenerate the chart's CRD copies and deploy/ (plain manifests, alerts, dashboard) from their sources
manifests: venv system-deps
	HELM=$(HELM) $(PY) deploy/generate.py

## image: build the operator image $(IMAGE) (needs a Docker engine; none runs in CI here)
image:
	docker build -t $(IMAGE) .

## testbed-image: the operator image plus the testbed (emulated vLLM servers), for deploy/samples
testbed-image:
	docker build --target testbed -t $(TESTBED_IMAGE) .

## kind-e2e: kind cluster + image + helm install + samples + a scale-up check (needs Docker and kind; not run in CI)
kind-e2e:
	IMAGE=$(IMAGE) TESTBED_IMAGE=$(TESTBED_IMAGE) bash scripts/kind-e2e.sh
