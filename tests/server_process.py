"""Start and stop a real ``flotilla serve`` process on a loopback port, for the HTTP tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_address() -> str:
    """This machine's own IPv4 address off loopback (an EndpointSlice may not point into 127.0.0.0/8): the source
    address of a route out, which needs no packet sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: only the routing table is consulted
        address = s.getsockname()[0]
    if address.startswith("127."):
        raise RuntimeError("this machine has no IPv4 address off loopback")
    return address


class ServerProcess:
    """``launcher`` replaces ``-m flotilla.engine.serve`` (a script that injects a fault, then serves);
    ``clean_env`` runs it with ``env`` alone instead of ``env`` over this process's environment."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, launcher: list[str] | None = None,
                 clean_env: bool = False, host: str = "127.0.0.1") -> None:
        self.port = free_port()
        self.host = host
        self.base = f"http://{host}:{self.port}"
        self.log = open(ROOT / ".pytest_cache" / f"server-{self.port}.log", "w") if (ROOT / ".pytest_cache").exists() \
            else subprocess.DEVNULL
        entry = launcher or ["-m", "flotilla.engine.serve"]
        cmd = [sys.executable, *entry, *args, "--host", host, "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd="/",
                                     env=dict(env or {}) if clean_env else {**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 180.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before becoming ready")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError("server did not become ready")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextlib.contextmanager
def serving(args: list[str], api_key: str) -> Iterator[ServerProcess]:
    """A module's server: ready on entry, and it must exit cleanly (0) when the module is done with it.
    TRITON_INTERPRET=0: as deployed on a CPU node (the kernel tests in a session set it for themselves)."""
    proc = ServerProcess(args, env={"FLOTILLA_API_KEY": api_key, "TRITON_INTERPRET": "0"}).wait_ready()
    yield proc
    assert proc.stop() == 0


def sdk_client(server: ServerProcess, api_key: str, timeout: float = 300):
    """The official openai client on ``server``, with no retries: a failure must show as one."""
    import openai

    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=api_key, max_retries=0, timeout=timeout)
