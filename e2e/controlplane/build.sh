#!/usr/bin/env bash
# Build kube-apiserver, kube-controller-manager and kubectl from the k8s.io/kubernetes module at one pinned
# release, and etcd from go.etcd.io/etcd, into a cache outside the repo. Idempotent: when every binary is
# already there it does nothing. k8s.io/kubernetes's go.mod points its staging modules at ./staging, which the
# module proxy does not carry, so a scratch module replaces each with the published v0.<minor>.<patch>.
set -euo pipefail

# v1.32.0 because it is the 1.32 release whose every staging module (zip and checksum-database entry) the
# module proxy we can reach serves; later 1.32 patches miss some (k8s.io/kube-controller-manager,
# k8s.io/endpointslice, ...: 403 "This module version is not available", or a sumdb 404).
K8S_VERSION="${K8S_VERSION:-v1.32.0}"
# The etcd minor Kubernetes 1.32 is tested with (it vendors the v3.5 client).
ETCD_VERSION="${ETCD_VERSION:-v3.5.21}"
CACHE="${FLOTILLA_CONTROLPLANE_CACHE:-$HOME/.cache/flotilla/controlplane}"
BIN="$CACHE/$K8S_VERSION/bin"
SRC="$CACHE/src-$K8S_VERSION"
ETCD_SRC="$CACHE/src-etcd-$ETCD_VERSION"
GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
# The machine is shared: build gently unless told otherwise.
NICE="${NICE:-nice -n 15}"
export GOFLAGS="${GOFLAGS:--p=1}"
export GOMAXPROCS="${GOMAXPROCS:-2}"
export CGO_ENABLED=0

BINARIES=(kube-apiserver kube-controller-manager kubectl etcd)
missing=()
for b in "${BINARIES[@]}"; do [[ -x "$BIN/$b" ]] || missing+=("$b"); done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "controlplane: $K8S_VERSION binaries present in $BIN"
  exit 0
fi
echo "controlplane: building ${missing[*]} ($K8S_VERSION, etcd $ETCD_VERSION) into $BIN"

run() {
  echo "+ $*" >&2
  if ! "$@"; then
    echo "controlplane: FAILED: $* (in $PWD)" >&2
    exit 1
  fi
}

mkdir -p "$BIN" "$SRC" "$ETCD_SRC"
staging_version="v0.${K8S_VERSION#v1.}"  # v1.32.13 -> v0.32.13

# --- Kubernetes -------------------------------------------------------------------------------------
cd "$SRC"
if [[ ! -f go.mod ]]; then
  run "$GO" mod download -json "k8s.io/kubernetes@$K8S_VERSION" > download.json
  kmod="$(sed -n 's/^\s*"GoMod": "\(.*\)",\?$/\1/p' download.json)"
  [[ -n "$kmod" && -f "$kmod" ]] || { echo "controlplane: FAILED: no go.mod in $SRC/download.json" >&2; exit 1; }
  {
    echo "module flotilla.local/controlplane"
    echo
    echo "go 1.23.0"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    # k8s.io/kubernetes's own replace lines do not apply to a dependency; mirror them with published versions.
    grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$kmod" | awk -v v="$staging_version" '{print "replace " $1 " => " $1 " " v}'
  } > go.mod.tmp
  mv go.mod.tmp go.mod
  printf 'package main\n\nfunc main() {}\n' > main.go
fi

ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2) \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
for b in kube-apiserver kube-controller-manager; do
  [[ -x "$BIN/$b" ]] && continue
  start=$SECONDS
  run $NICE "$GO" build -mod=mod -trimpath -ldflags "$ldflags" -o "$BIN/$b.tmp" "k8s.io/kubernetes/cmd/$b"
  mv "$BIN/$b.tmp" "$BIN/$b"
  echo "controlplane: built $b in $((SECONDS - start))s"
done

# --- etcd -------------------------------------------------------------------------------------------
if [[ ! -x "$BIN/etcd" ]]; then
  cd "$ETCD_SRC"
  if [[ ! -f go.mod ]]; then
    printf 'module flotilla.local/etcd\n\ngo 1.23.0\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" > go.mod
    printf 'package main\n\nfunc main() {}\n' > main.go
  fi
  start=$SECONDS
  run $NICE "$GO" build -mod=mod -trimpath -ldflags "-s -w" -o "$BIN/etcd.tmp" go.etcd.io/etcd/server/v3
  mv "$BIN/etcd.tmp" "$BIN/etcd"
  echo "controlplane: built etcd in $((SECONDS - start))s"
fi
cd "$SRC"
if [[ ! -x "$BIN/kubectl" ]]; then
  start=$SECONDS
  run $NICE "$GO" build -mod=mod -trimpath -ldflags "$ldflags" -o "$BIN/kubectl.tmp" k8s.io/kubernetes/cmd/kubectl
  mv "$BIN/kubectl.tmp" "$BIN/kubectl"
  echo "controlplane: built kubectl in $((SECONDS - start))s"
fi
echo "controlplane: ready in $BIN"
