#!/usr/bin/env bash
# Everything tests/test_node.py needs, each step cached (`make node`; `make test` runs it first):
# Debian packages, kubelet/kube-scheduler/kube-proxy, the pause image, the project's two images.
# The control plane binaries come first (e2e/controlplane/build.sh, `make controlplane`).
# On failure the reason is written to $FLOTILLA_NODE_DIR/build-failed.txt and the script exits 1; `make test`
# goes on with the rest of the suite, and the node tests fail with that reason (they never skip).
set -uo pipefail
S="$(cd "$(dirname "$0")" && pwd)"
D="${FLOTILLA_NODE_DIR:-$HOME/.cache/flotilla/node}"
mkdir -p "$D/logs"
rm -f "$D/build-failed.txt"
fail() { echo "$*" > "$D/build-failed.txt"; echo "make node: $*" >&2; exit 1; }
step() {  # name command...: run, log to logs/build-<name>.log, time it
  local name=$1 t=$SECONDS; shift
  "$@" > "$D/logs/build-$name.log" 2>&1 \
    || fail "$name failed (exit $?); last lines of $D/logs/build-$name.log: $(tail -5 "$D/logs/build-$name.log" | tr '\n' ' ')"
  echo "node: $name ok in $((SECONDS - t))s"
}
[[ $(id -u) == 0 ]] || fail "the node needs root (containerd, kubelet, iptables, podman): run make test as root"

packages() {  # Debian's containerd, runc, CNI plugins, podman (builds the images), debootstrap (their base)
  local missing=()
  for cmd in containerd runc iptables conntrack socat ethtool podman debootstrap; do
    command -v $cmd > /dev/null || missing+=("$cmd")
  done
  [[ -x /usr/lib/cni/bridge ]] || missing+=(containernetworking-plugins)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  local pkgs=(containerd runc containernetworking-plugins iptables conntrack socat ethtool podman debootstrap)
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${pkgs[@]}" || { apt-get update -q && apt-get install -y -q "${pkgs[@]}"; }
}
step packages packages
step kubelet bash "$S/build-node.sh"
step pause-image bash "$S/build-images.sh"
step project-images bash "$S/build-project-images.sh"
