#!/usr/bin/env bash
# The two images the by-hand node runs, with no registry: kubernetes' own pause (pause.c, static) and a Debian
# bookworm rootfs with python3 serving http (debootstrap, ~55 s). Both become one-layer OCI archives in
# $FLOTILLA_NODE_DIR that up.sh imports into containerd. Idempotent.
set -euo pipefail
S="$(cd "$(dirname "$0")" && pwd)"
D="${FLOTILLA_NODE_DIR:-$HOME/.cache/flotilla/node}"
mkdir -p "$D"
if [[ ! -f $D/pause.oci.tar ]]; then
  pause_c="$(go env GOMODCACHE)/k8s.io/kubernetes@v1.32.0/build/pause/linux/pause.c"
  [[ -f $pause_c ]] || { echo "build-images: $pause_c missing: run e2e/controlplane/build.sh first" >&2; exit 1; }
  mkdir -p "$D/pause-rootfs"
  gcc -static -O2 -DVERSION=3.10 -o "$D/pause-rootfs/pause" "$pause_c"
  python3 "$S/mkimage.py" "$D/pause-rootfs" registry.k8s.io/pause:3.10 "$D/pause.oci.tar" --entrypoint '["/pause"]'
fi
if [[ ! -f $D/pyhttp.oci.tar ]]; then
  command -v debootstrap > /dev/null || apt-get install -y debootstrap
  [[ -x $D/py-rootfs/usr/bin/python3 ]] || debootstrap --variant=minbase --include=python3 bookworm "$D/py-rootfs"
  mkdir -p "$D/py-rootfs/srv" && echo "flotilla node ok" > "$D/py-rootfs/srv/index.html"
  python3 "$S/mkimage.py" "$D/py-rootfs" docker.io/local/pyhttp:1 "$D/pyhttp.oci.tar" \
    --cmd '["python3","-m","http.server","8080","--directory","/srv"]'
fi
echo "build-images: $D/pause.oci.tar $D/pyhttp.oci.tar"
