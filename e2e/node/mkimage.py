#!/usr/bin/env python3
"""Make a one-layer OCI image archive (oci-layout + index.json + blobs, as a tar) from a rootfs folder,
for `ctr -n k8s.io images import`. Stdlib only.

usage: mkimage.py ROOTFS NAME:TAG OUT.tar [--entrypoint JSON] [--cmd JSON] [--workdir DIR] [--env K=V ...]
"""
import argparse
import hashlib
import io
import json
import os
import tarfile
import tempfile


def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("rootfs")
    p.add_argument("name")
    p.add_argument("out")
    p.add_argument("--entrypoint", default="null")
    p.add_argument("--cmd", default="null")
    p.add_argument("--workdir", default="/")
    p.add_argument("--env", action="append", default=["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
    p.add_argument("--user", default="")
    a = p.parse_args()

    # the layer: an uncompressed tar of the rootfs, paths relative, numeric owners kept
    with tempfile.TemporaryFile() as layer_f:
        with tarfile.open(fileobj=layer_f, mode="w", format=tarfile.PAX_FORMAT) as t:
            for entry in sorted(os.listdir(a.rootfs)):
                t.add(os.path.join(a.rootfs, entry), arcname=entry, recursive=True)
        layer_f.seek(0)
        h = hashlib.sha256()
        size = 0
        for chunk in iter(lambda: layer_f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
        layer_digest = "sha256:" + h.hexdigest()

        config = {
            "architecture": "amd64", "os": "linux",
            "config": {"Env": a.env, "Entrypoint": json.loads(a.entrypoint), "Cmd": json.loads(a.cmd),
                       "WorkingDir": a.workdir, **({"User": a.user} if a.user else {})},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
            "history": [{"created_by": "mkimage.py"}],
        }
        config_b = json.dumps(config, sort_keys=True).encode()
        manifest = {
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config_b),
                       "size": len(config_b)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest,
                        "size": size}],
        }
        manifest_b = json.dumps(manifest, sort_keys=True).encode()
        tag = a.name.rsplit(":", 1)[1] if ":" in a.name.rsplit("/", 1)[-1] else "latest"
        index = {
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(manifest_b),
                           "size": len(manifest_b), "platform": {"architecture": "amd64", "os": "linux"},
                           "annotations": {"io.containerd.image.name": a.name,
                                           "org.opencontainers.image.ref.name": tag}}],
        }

        def add_bytes(t: tarfile.TarFile, name: str, b: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(b)
            ti.mode = 0o644
            t.addfile(ti, io.BytesIO(b))

        with tarfile.open(a.out, "w") as out:
            add_bytes(out, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            add_bytes(out, "index.json", json.dumps(index).encode())
            add_bytes(out, "blobs/sha256/" + sha(config_b)[7:], config_b)
            add_bytes(out, "blobs/sha256/" + sha(manifest_b)[7:], manifest_b)
            ti = tarfile.TarInfo("blobs/sha256/" + layer_digest[7:])
            ti.size = size
            ti.mode = 0o644
            layer_f.seek(0)
            out.addfile(ti, layer_f)
    print(f"{a.out}: {a.name} manifest {sha(manifest_b)} layer {size} bytes")


if __name__ == "__main__":
    main()
