#!/usr/bin/env bash
# The node's pause image with no registry: kubernetes' own pause.c, compiled static, as a one-layer OCI archive
# in $FLOTILLA_NODE_DIR that up.sh imports into containerd. Idempotent. (The project's images:
# build-project-images.sh.)
set -euo pipefail
S="$(cd "$(dirname "$0")" && pwd)"
D="${FLOTILLA_NODE_DIR:-$HOME/.cache/flotilla/node}"
GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
mkdir -p "$D"
if [[ ! -f $D/pause.oci.tar ]]; then
  pause_c="$("$GO" env GOMODCACHE)/k8s.io/kubernetes@v1.32.0/build/pause/linux/pause.c"
  [[ -f $pause_c ]] || { echo "build-images: $pause_c missing: run e2e/controlplane/build.sh first" >&2; exit 1; }
  mkdir -p "$D/pause-rootfs"
  gcc -static -O2 -DVERSION=3.10 -o "$D/pause-rootfs/pause" "$pause_c"
  python3 "$S/mkimage.py" "$D/pause-rootfs" registry.k8s.io/pause:3.10 "$D/pause.oci.tar" --entrypoint '["/pause"]'
fi
echo "build-images: $D/pause.oci.tar"
