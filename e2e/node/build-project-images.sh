#!/usr/bin/env bash
# The project's own two images, built with podman from Dockerfile.engine (CPU variant, SmolLM2 bundled) and
# Dockerfile.operator, with no registry: BASE_IMAGE is a Debian bookworm rootfs made by debootstrap (cached),
# torch comes from ../shared/wheels when it is there. Each image is tagged with the name the manifests use and
# saved as an archive in $FLOTILLA_NODE_DIR/images/, which up.sh imports into containerd.
# Rebuilds are cheap: podman's layer cache keeps the dependency layers, and an image whose id did not change is
# not saved again.
set -euo pipefail
S="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$S/../.." && pwd)"
D="${FLOTILLA_NODE_DIR:-$HOME/.cache/flotilla/node}"
IMAGES=$D/images
BASE=localhost/flotilla-base:bookworm
ENGINE=ghcr.io/flotilla-dev/flotilla-engine:0.1.0-cpu      # spec.image of manifests/samples/smollm2-cpu.yaml
OPERATOR=ghcr.io/flotilla-dev/flotilla-operator:0.1.0      # manifests/operator.yaml
mkdir -p "$IMAGES"
# crun (Debian's default) fails here: "cgroups in hybrid mode not supported"
PODMAN=(podman --runtime runc)
t0=$SECONDS

if ! "${PODMAN[@]}" image exists $BASE; then
  rootfs=$D/base-rootfs
  if [[ ! -x $rootfs/usr/sbin/useradd ]]; then
    rm -rf "$rootfs" "$rootfs.tmp"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd bookworm "$rootfs.tmp" \
      > "$D/debootstrap.log" 2>&1 || { tail -20 "$D/debootstrap.log" >&2; exit 1; }
    mv "$rootfs.tmp" "$rootfs"
  fi
  tar -C "$rootfs" -c . | "${PODMAN[@]}" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - $BASE > /dev/null
  echo "base image $BASE after $((SECONDS - t0))s"
fi

# torch's CPU wheel from ../shared/wheels (Dockerfile.engine reads ./wheels in its build context)
if [[ -f $REPO/../shared/wheels/constraints.txt ]]; then
  mkdir -p "$REPO/wheels" && cp -u "$REPO"/../shared/wheels/* "$REPO/wheels/"
fi
# Package traffic here may pass a TLS-intercepting proxy whose CA only the host trusts: lend the host's bundle
# to the build steps (a bind mount: nothing of it is baked into the image).
CA=()
[[ -f /etc/ssl/certs/ca-certificates.crt ]] && CA=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)

build() {  # name image dockerfile build-args...
  local name=$1 image=$2 file=$3; shift 3
  local t=$SECONDS
  "${PODMAN[@]}" build --pull=never "${CA[@]}" --build-arg BASE_IMAGE=$BASE "$@" -f "$REPO/$file" -t "$image" \
    "$REPO" > "$D/build-$name.log" 2>&1 || { tail -30 "$D/build-$name.log" >&2; echo "podman build of $file failed: $D/build-$name.log" >&2; exit 1; }
  local id; id=$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$image")
  if [[ $(cat "$IMAGES/$name.id" 2>/dev/null) != "$id" ]]; then
    rm -f "$IMAGES/$name.id"
    "${PODMAN[@]}" save --format docker-archive -o "$IMAGES/$name.tar.tmp" "$image" > /dev/null 2>&1
    mv "$IMAGES/$name.tar.tmp" "$IMAGES/$name.tar" && echo "$id" > "$IMAGES/$name.id"
  fi
  echo "$image (${id:0:12}) in $((SECONDS - t))s"
}
# build-project-images.sh [engine] [operator]: only those (default both)
[[ $# -eq 0 || " $* " == *" engine "* ]] && build engine $ENGINE Dockerfile.engine --build-arg VARIANT=cpu
[[ $# -eq 0 || " $* " == *" operator "* ]] && build operator $OPERATOR Dockerfile.operator
"${PODMAN[@]}" image prune -f > /dev/null   # the previous builds' layers, now untagged
echo "build-project-images: done in $((SECONDS - t0))s"
