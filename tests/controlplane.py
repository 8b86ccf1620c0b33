"""A real Kubernetes control plane for tests: etcd, kube-apiserver and kube-controller-manager on loopback
ports, as controller-runtime's envtest starts them (self-signed serving certs, a service-account key pair,
static-token authentication), with crds/ installed and a kubeconfig written.

The binaries come from `e2e/controlplane/build.sh` (run by `make test`, cached in
~/.cache/flotilla/controlplane/<version>/bin). Where they are missing the tests skip — except in CI
(CI=true), where a control plane that cannot start fails the suite.

Use it through the session-scoped `control_plane` fixture (import it into a test module).
"""
from __future__ import annotations

import base64
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "e2e" / "controlplane" / "build.sh"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager")
START_TIMEOUT_SECONDS = 90.0


def pinned_version() -> str:
    """The Kubernetes release build.sh pins (K8S_VERSION overrides it, as it does for the script)."""
    match = re.search(r'K8S_VERSION="\$\{K8S_VERSION:-(v[0-9.]+)\}"', BUILD_SCRIPT.read_text())
    assert match, f"no pinned K8S_VERSION in {BUILD_SCRIPT}"
    return os.environ.get("K8S_VERSION", match.group(1))


def binary_dir() -> Path:
    if os.environ.get("FLOTILLA_CONTROLPLANE_BIN"):
        return Path(os.environ["FLOTILLA_CONTROLPLANE_BIN"])
    cache = Path(os.environ.get("FLOTILLA_CONTROLPLANE_CACHE", Path.home() / ".cache" / "flotilla" / "controlplane"))
    return cache / pinned_version() / "bin"


class BinariesMissing(Exception):
    """The control plane is not built on this machine."""


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- certificates -----------------------------------------------------------------------------------

def _write_pki(folder: Path, extra_ips: tuple[str, ...] = ()) -> None:
    """A CA, a serving cert for 127.0.0.1/localhost (and `extra_ips`) signed by it, and the service-account key
    pair (with the openssl command line: the test environment need not carry a crypto package)."""
    def openssl(*args: str) -> None:
        done = subprocess.run(["openssl", *args], cwd=folder, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"openssl {' '.join(args)} failed: {done.stderr}")

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=flotilla-test-ca", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "apiserver.key", "-out", "apiserver.csr",
            "-subj", "/CN=kube-apiserver")
    (folder / "apiserver.ext").write_text(
        f"subjectAltName=DNS:localhost,DNS:kubernetes.default.svc,IP:127.0.0.1{''.join(',IP:' + ip for ip in extra_ips)}\n"
        "extendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n")
    openssl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "apiserver.crt", "-days", "2", "-extfile", "apiserver.ext")
    openssl("genrsa", "-out", "sa.key", "2048")
    openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")


def write_kubeconfig(path: Path, server: str, ca_file: Path, user: str, token: str) -> None:
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "flotilla-test",
        "clusters": [{"name": "flotilla-test", "cluster": {
            "server": server, "certificate-authority-data": base64.b64encode(ca_file.read_bytes()).decode()}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "flotilla-test", "context": {"cluster": "flotilla-test", "user": user}}],
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll until `check()` returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as e:  # noqa: BLE001  (an object not there yet reads as 'not yet')
            last = e
        else:
            if last:
                return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


# --- processes --------------------------------------------------------------------------------------

def die_with_parent() -> None:
    """Linux: SIGKILL this child when the test process dies (even by SIGKILL): nothing outlives it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class ControlPlane:
    """A running etcd + kube-apiserver + kube-controller-manager; `kubeconfig` is an admin's."""

    workdir: Path
    bin_dir: Path
    server: str = ""
    kubeconfig: Path = field(default_factory=Path)
    token: str = ""
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def log(self, component: str) -> str:
        path = self.workdir / f"{component}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        out = open(self.workdir / f"{name}.log", "wb")
        # Its own process group, so that stop() reaches anything it forks, and a dying test run's
        # Ctrl-C does not race our orderly shutdown.
        proc = subprocess.Popen([str(self.bin_dir / name), *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
        out.close()
        self.processes[name] = proc
        return proc

    def _wait(self, name: str, probe, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            proc = self.processes[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} before {what}:\n{self.log(name)[-4000:]}")
            try:
                if probe():
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{name} not {what} after {START_TIMEOUT_SECONDS:.0f}s:\n{self.log(name)[-4000:]}")

    def start(self) -> None:
        w = self.workdir
        _write_pki(w)
        self.token = secrets.token_hex(16)
        kcm_token = secrets.token_hex(16)
        # envtest's static token file: token,user,uid,"group1,group2"
        (w / "tokens.csv").write_text(f'{self.token},admin,admin,"system:masters"\n'
                                      f'{kcm_token},system:kube-controller-manager,kcm,"system:masters"\n')

        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self._spawn("etcd", [
            "--name=default", f"--data-dir={w / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
            "--unsafe-no-fsync=true", "--log-level=warn"])
        self._wait("etcd", lambda: urllib.request.urlopen(f"{etcd_url}/health", timeout=1).status == 200,
                   "healthy")

        self.server = f"https://127.0.0.1:{api_port}"
        self._spawn("kube-apiserver", [
            f"--etcd-servers={etcd_url}", "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}",
            f"--tls-cert-file={w / 'apiserver.crt'}", f"--tls-private-key-file={w / 'apiserver.key'}",
            f"--client-ca-file={w / 'ca.crt'}", f"--token-auth-file={w / 'tokens.csv'}",
            f"--service-account-key-file={w / 'sa.pub'}",
            f"--service-account-signing-key-file={w / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range=10.0.0.0/24", "--allow-privileged=true",
            "--authorization-mode=RBAC",
            # No kubelets and no token controller here: pods need no service-account token.
            "--disable-admission-plugins=ServiceAccount",
            f"--cert-dir={w / 'certs'}", "--v=1"])
        ctx = ssl.create_default_context(cafile=str(w / "ca.crt"))

        def ready() -> bool:
            req = urllib.request.Request(f"{self.server}/readyz",
                                         headers={"Authorization": f"Bearer {self.token}"})
            try:
                return urllib.request.urlopen(req, timeout=2, context=ctx).status == 200
            except urllib.error.HTTPError:
                return False  # 500 while post-start hooks run
        self._wait("kube-apiserver", ready, "ready")

        self.kubeconfig = w / "kubeconfig"
        write_kubeconfig(self.kubeconfig, self.server, w / "ca.crt", "admin", self.token)
        write_kubeconfig(w / "kcm.kubeconfig", self.server, w / "ca.crt", "kcm", kcm_token)
        self._spawn("kube-controller-manager", [
            f"--kubeconfig={w / 'kcm.kubeconfig'}",
            # What the operator's children need: garbage collection, Deployments and their ReplicaSets,
            # and namespace deletion for test clean-up.
            "--controllers=garbagecollector,deployment,replicaset,namespace",
            "--leader-elect=false", "--secure-port=0",
            f"--root-ca-file={w / 'ca.crt'}", f"--service-account-private-key-file={w / 'sa.key'}",
            "--concurrent-gc-syncs=5", "--v=1"])
        # Nothing to poll: the controller manager serves nothing here. A crash shows up at once.
        time.sleep(0.5)
        if self.processes["kube-controller-manager"].poll() is not None:
            raise RuntimeError(f"kube-controller-manager exited:\n{self.log('kube-controller-manager')[-4000:]}")

    def stop(self) -> None:
        """SIGTERM in reverse start order, SIGKILL for whatever lingers; no process is left behind."""
        for name in reversed(list(self.processes)):
            proc = self.processes[name]
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)
            else:
                try:  # the leader is gone; its group may not be
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def api_client(self):
        """A kubernetes ApiClient for this control plane (admin)."""
        import kubernetes

        return kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))

    def install_crds(self) -> None:
        """Create every CRD in crds/ and wait until each is Established (names accepted, schema valid)."""
        import kubernetes

        api = kubernetes.client.ApiextensionsV1Api(self.api_client())
        names = []
        for path in sorted((ROOT / "crds").glob("*.yaml")):
            if path.name == "kustomization.yaml":
                continue
            for doc in yaml.safe_load_all(path.read_text()):
                if doc and doc.get("kind") == "CustomResourceDefinition":
                    api.create_custom_resource_definition(doc)
                    names.append(doc["metadata"]["name"])
        deadline = time.monotonic() + 30
        for name in names:
            while True:
                crd = api.read_custom_resource_definition(name)
                conds = {c.type: c.status for c in (crd.status.conditions or ())}
                if conds.get("Established") == "True":
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"CRD {name} not Established: {crd.status.conditions}")
                time.sleep(0.2)


def start_control_plane(workdir: Path) -> ControlPlane:
    """Start one, or raise with the reason; on failure nothing is left running."""
    bin_dir = binary_dir()
    missing = [c for c in COMPONENTS if not (bin_dir / c).is_file()]
    if missing:
        raise BinariesMissing(f"{', '.join(missing)} not in {bin_dir}; build them with "
                                f"`make controlplane` ({BUILD_SCRIPT.relative_to(ROOT)})")
    cp = ControlPlane(workdir=workdir, bin_dir=bin_dir)
    try:
        cp.start()
        cp.install_crds()
    except BaseException:
        cp.stop()
        raise
    return cp


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    workdir = Path(tempfile.mkdtemp(prefix="flotilla-controlplane-"))
    try:
        cp = start_control_plane(workdir)
    except BinariesMissing as e:
        shutil.rmtree(workdir, ignore_errors=True)
        if in_ci():
            pytest.fail(f"control plane cannot start in CI: {e}", pytrace=False)
        pytest.skip(str(e))
    except Exception as e:  # a control plane that was built but does not start is a failure anywhere
        pytest.fail(f"control plane did not start (logs in {workdir}): {e}", pytrace=False)
    try:
        yield cp
    finally:
        cp.stop()
        shutil.rmtree(workdir, ignore_errors=True)
