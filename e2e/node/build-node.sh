#!/usr/bin/env bash
# Build kubelet, kube-scheduler, kube-proxy (v1.32.0) into ~/.cache/flotilla/node/bin,
# reusing a copy of the controlplane scratch module (src-v1.32.0).
set -euo pipefail
K8S_VERSION=v1.32.0
SRC=$HOME/.cache/flotilla/node/src
BIN=$HOME/.cache/flotilla/node/bin
mkdir -p "$BIN"
[[ -f $SRC/go.mod ]] || cp -r $HOME/.cache/flotilla/controlplane/src-$K8S_VERSION "$SRC"
GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
export GOFLAGS="-p=1 -buildvcs=false" GOMAXPROCS=2 CGO_ENABLED=0
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=32 \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
cd "$SRC"
for b in ${@:-kube-scheduler kube-proxy kubelet}; do
  [[ -x $BIN/$b ]] && { echo "$b present"; continue; }
  start=$(date +%s)
  nice -n 19 "$GO" build -mod=mod -trimpath -ldflags "$ldflags" -o "$BIN/$b.tmp" "k8s.io/kubernetes/cmd/$b"
  mv "$BIN/$b.tmp" "$BIN/$b"
  echo "built $b in $(( $(date +%s) - start ))s"
done
