"""Kubernetes resource quantities ("16Gi", "500m", "1.5G") as numbers, and back.

The operator does arithmetic on memory sizes (the fit check, /dev/shm, memory limits); the API server
speaks quantities. This module owns the conversion so the rest of the code handles plain numbers.
"""
from __future__ import annotations

import math
import re
from decimal import Decimal

_SUFFIXES: dict[str, Decimal] = {
    "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40, "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
    "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
    "P": Decimal("1e15"), "E": Decimal("1e18"),
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")


def parse_quantity(value: str | int | float) -> Decimal:
    """Parse a Kubernetes quantity; raises ValueError for anything the API server would reject."""
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, (int, float)):
        return Decimal(str(value))
    match = _QUANTITY.match(value.strip())
    if not match:
        raise ValueError(f"not a quantity: {value!r}")
    number, suffix = match.groups()
    return Decimal(number) * _SUFFIXES[suffix or ""]


def quantity_bytes(value: str | int | float) -> int:
    """A memory quantity in whole bytes (rounded up, as the kubelet does)."""
    return math.ceil(parse_quantity(value))


def format_bytes(n: int) -> str:
    """Bytes as the largest binary-suffixed quantity that represents them exactly ("16Gi", "1536Mi")."""
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        unit = int(_SUFFIXES[suffix])
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def human_bytes(n: float) -> str:
    """Bytes for people reading status messages: decimal GB with one decimal, like GPU spec sheets."""
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    return f"{n / 1e6:.1f} MB"
