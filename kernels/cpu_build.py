"""Builds the compiled CPU kernels (``kernels/csrc/*.cpp``) into a torch op library, and finds a built one.

A library is specific to its source, the torch it was built against and an instruction-set level, which its
file name records, so a cache can hold several and a stale one is never loaded. It is built with the system
C++ compiler (``$CXX``, else ``g++``/``c++``) against torch's headers, for the highest x86-64 level this CPU
supports (v4 = AVX-512, v3 = AVX2/FMA) rather than ``-march=native``, so a library built on one machine (the
CPU engine image) runs on every machine of that level.

Runs on its own, with only torch (the image builds the kernels before the rest of Flotilla is copied in):

    python kernels/cpu_build.py --out DIR [--isa x86-64-v3 x86-64-v4]
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))
NAME = "flotilla_cpu_kernels"

# x86-64 micro-architecture levels, by the /proc/cpuinfo flags each one needs beyond the previous level.
_X86_LEVELS = (
    ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
    ("x86-64-v3", {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave"}),
    ("x86-64-v2", {"sse4_1", "sse4_2", "ssse3", "popcnt", "cx16"}),
)


class BuildError(RuntimeError):
    """The kernels could not be built (no compiler, a compiler error); the message is one line."""


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def isa_level(flags: set[str] | None = None, machine: str | None = None) -> str:
    """The instruction-set level to build for (and to look up) on this CPU."""
    machine = machine or platform.machine()
    if machine not in ("x86_64", "AMD64"):
        return machine  # e.g. aarch64: built for the generic target of the compiler
    flags = cpu_flags() if flags is None else flags
    best, needed = "x86-64", set()
    for level, extra in reversed(_X86_LEVELS):  # v2, then v3, then v4: each needs the levels below too
        needed |= extra
        if not needed <= flags:
            break
        best = level
    return best


def _flags(isa: str) -> list[str]:
    arch = [f"-march={isa}", "-mtune=generic"] if isa.startswith("x86-64") else []
    if isa == "x86-64-v4":
        arch.append("-mprefer-vector-width=512")  # generic tuning would keep AVX-512 code at 256-bit vectors
    return ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", *arch]


def library_name(isa: str) -> str:
    import torch

    digest = hashlib.sha256()
    for src in [*SOURCES, *HEADERS]:
        digest.update(src.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(" ".join(_flags(isa)).encode())
    return f"{NAME}-{isa}-{digest.hexdigest()[:12]}.so"


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def find(dirs: list[Path], isa: str | None = None) -> Path | None:
    """A library for this source, torch and ISA level already built into one of ``dirs``."""
    name = library_name(isa or isa_level())
    for d in dirs:
        if (Path(d) / name).is_file():
            return Path(d) / name
    return None


def build(out_dir: Path, isa: str | None = None) -> Path:
    """Build the library into ``out_dir`` (once: concurrent builders wait on a lock and reuse the result)."""
    import torch
    from torch.utils import cpp_extension

    isa = isa or isa_level()
    out_dir = Path(out_dir)
    target = out_dir / library_name(isa)
    cxx = compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found (install g++ or set CXX)")
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        torch_lib = Path(torch.__file__).parent / "lib"
        cmd = [cxx, *_flags(isa), f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               *[f"-I{p}" for p in cpp_extension.include_paths()], *map(str, SOURCES),
               f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            cmd += ["-o", str(Path(tmp) / target.name)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                errors = [ln for ln in proc.stderr.splitlines() if "error" in ln] or proc.stderr.splitlines()
                raise BuildError(f"{Path(cxx).name} failed: {(errors or ['no output'])[0].strip()}")
            os.replace(Path(tmp) / target.name, target)
    return target


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder to build into")
    p.add_argument("--isa", nargs="*", help="levels to build (default: this CPU's)")
    args = p.parse_args()
    for isa in args.isa or [isa_level()]:
        try:
            print(build(args.out, isa))
        except BuildError as e:
            sys.exit(f"cpu_build: {e}")


if __name__ == "__main__":
    main()
