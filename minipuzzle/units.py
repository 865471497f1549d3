"""Reading the sizes and counts users type: token and parameter counts, context lengths, byte sizes, fractions.

Counts quoted as budgets are decimal (`63B` tokens, `6.5b` parameters); context lengths are powers of two, so
their suffixes are binary (`1M` = 1048576, `8k` = 8192). Byte sizes take both (`31.7GiB`, `32GB`).
Every parser raises `UserError` naming the option (`what`) it was reading.
"""

from __future__ import annotations

import re

from minipuzzle.errors import UserError

DECIMAL = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
BINARY = {"k": 2**10, "m": 2**20, "g": 2**30}
BYTES = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12}


def _number(text: str | float | int, suffixes: dict[str, float], what: str, examples: str) -> float:
    s = str(text).strip().lower().replace("_", "")
    try:
        if s and s[-1] in suffixes:
            return float(s[:-1]) * suffixes[s[-1]]
        return float(s)
    except ValueError:
        raise UserError(f"cannot read {what} {text!r} as a count (examples: {examples})") from None


def parse_count(text: str | float | int, what: str = "count") -> int:
    """'63B' -> 63_000_000_000, '7e9', '500M', '1000' -> a count (decimal suffixes, as budgets are quoted)."""
    return int(round(_number(text, DECIMAL, what, "63B, 7e9, 500M, 1000")))


def parse_context(text: str | int, what: str = "--context") -> int:
    """'1M' -> 1048576, '8k' -> 8192, '4096' -> 4096 tokens (binary suffixes: contexts are powers of two); >= 1."""
    n = int(_number(text, BINARY, what, "8192, 8k, 1M"))
    if n < 1:
        raise UserError(f"{what} must be at least 1, got {text}")
    return n


def parse_count_or_fraction(text: str | float | int, what: str) -> int | float:
    """A count ('6.5e9', '6.5b', '740972' -> int) or a fraction ('0.8', '80%' -> float in (0, 1]).

    A plain number up to 1 is a fraction; '%' always is.
    """
    s = str(text).strip().lower().replace("_", "")
    examples = "6.5e9, 6.5b, 740972, 0.8, 80%"
    if not s:
        raise UserError(f"{what} is empty (examples: {examples})")
    if s.endswith("%"):
        value = _number(s[:-1], {}, what, examples) / 100
    else:
        value = _number(s, DECIMAL, what, examples)
        if value > 1:
            return int(round(value))
    if not 0 < value <= 1:
        raise UserError(f"{what} {text!r} as a fraction must be in (0, 1]")
    return value


def parse_bytes(text: str | int | float, what: str = "size") -> int:
    """'31.7GiB', '32GB', '500MiB' or a byte count -> bytes (positive)."""
    s = str(text).strip().lower().replace(" ", "")
    m = re.fullmatch(r"([0-9.]+(?:e[0-9+-]+)?)([a-z]*)", s)
    if not m:
        raise UserError(f"cannot read {what} {text!r} (examples: 31.7GiB, 32GB, 500MiB)")
    num, unit = m.groups()
    if unit and unit not in BYTES:
        raise UserError(f"unknown unit {unit!r} in {what} {text!r}: use B, KB, MB, GB, KiB, MiB, GiB")
    try:
        value = float(num) * BYTES.get(unit, 1)
    except ValueError:
        raise UserError(f"cannot read {what} {text!r} (examples: 31.7GiB, 32GB)") from None
    if value <= 0:
        raise UserError(f"{what} must be positive, got {text!r}")
    return int(value)


def parse_bandwidth(text: str | int | float, what: str = "bandwidth") -> float:
    """'450GB/s', '400Gb/s' (bits: a lower-case b, or 'Gbit/s', 'Gbps'), '50e9' -> bytes per second (positive).

    Link speeds are quoted in decimal units, so k, M, G, T are powers of ten (GiB/s is binary); the case of the b
    tells bytes from bits, as network links are sold in bits and memory links in bytes."""
    s = str(text).strip().replace(" ", "").replace("_", "")
    m = re.fullmatch(r"([0-9.]+(?:[eE][0-9+-]+)?)([kKMGT]?)(i?)(B|b|bit|bits)?(/s|ps)?", s)
    if not m or (m.group(3) and m.group(4) != "B"):
        raise UserError(f"cannot read {what} {text!r} (examples: 450GB/s, 400Gb/s, 5e10)")
    num, prefix, binary, unit, _ = m.groups()
    scale = (2**10 if binary else 10**3) ** " kMGT".index(prefix.upper().replace("K", "k")) if prefix else 1
    try:
        value = float(num) * scale / (8 if unit in ("b", "bit", "bits") else 1)
    except ValueError:
        raise UserError(f"cannot read {what} {text!r} (examples: 450GB/s, 400Gb/s)") from None
    if value <= 0:
        raise UserError(f"{what} must be positive, got {text!r}")
    return value


def gib(n: float | None) -> str:
    """Bytes in binary units, as GPU memory is quoted: '80 GiB', '23.5 GiB', '512 MiB', '1.3 MiB', '676 KiB' (one
    decimal below 100 units unless it is 0, none from 100); None, a figure not measured, as '–'."""
    if n is None:
        return "–"
    if n == 0:
        return "0 MiB"
    v, unit = next((n / 2**k, u) for k, u in ((30, "GiB"), (20, "MiB"), (10, "KiB"), (0, "B")) if n >= 2**k or k == 0)
    return f"{v:.0f} {unit}" if v >= 100 else f"{v:.1f}".removesuffix(".0") + f" {unit}"
