"""Parsers of setting values: each turns a flag's or variable's text into a value, or says why not.

They raise ``argparse.ArgumentTypeError``, whose message argparse shows as a usage error; the
settings of the services' configs name them (see :mod:`mediatag_common.settings`).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Sequence

SQLITE_SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _int_between(minimum: int, maximum: int | None, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


def _float_above(minimum: float, *, inclusive: bool, what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


positive_int = _int_between(1, None, "a positive integer")
non_negative_int = _int_between(0, None, "zero or a positive integer")
int32 = _int_between(_INT32_MIN, _INT32_MAX, "a 32-bit integer")
port = _int_between(0, 65535, "a port number (0-65535; 0 picks a free port)")
positive_float = _float_above(0.0, inclusive=False, what="a positive number")
non_negative_float = _float_above(0.0, inclusive=True, what="zero or a positive number")

OFF = "off"


def port_or_off(text: str) -> int | None:
    """A port number (0 picks a free one), or ``off`` for None."""
    if text.strip().lower() == OFF:
        return None
    try:
        return port(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a port number (0-65535; 0 picks a free port) or {OFF}"
        ) from None


_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_SIZE_PATTERN = re.compile(r"^\s*(\d+)\s*([kmg]?)(?:i?b)?\s*$", re.IGNORECASE)


def byte_size(text: str) -> int:
    """A positive number of bytes, optionally with a binary unit: ``20MiB``, ``512M``, ``1g``."""
    match = _SIZE_PATTERN.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 20971520, 20MiB, 512M)")
    value = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size")
    return value


def format_byte_size(size: int) -> str:
    """The inverse of :func:`byte_size` for round sizes: ``20971520`` -> ``20MiB``."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def word(text: str) -> str:
    """A non-empty value without spaces: a host, an address, a URL."""
    value = text.strip()
    if not value or any(c.isspace() for c in value):
        raise argparse.ArgumentTypeError(f"{text!r} must be non-empty and contain no spaces")
    return value


def key_value(text: str) -> tuple[str, str]:
    """``KEY=VALUE``; the value may be empty or contain ``=``."""
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key.strip(), value


def one_of(choices: Sequence[str], *, upper: bool) -> Callable[[str], str]:
    """Case-insensitive choice; the value comes back in the case of ``choices``."""

    def parse(text: str) -> str:
        value = text.strip().upper() if upper else text.strip().lower()
        if value not in choices:
            listed = ", ".join(c.lower() for c in choices)
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {listed}")
        return value

    return parse


sqlite_synchronous = one_of(SQLITE_SYNCHRONOUS_MODES, upper=True)
log_level = one_of(LOG_LEVELS, upper=True)
log_format = one_of(LOG_FORMATS, upper=False)


_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def switch(text: str) -> bool:
    """An on/off setting's variable: ``1``/``0`` (true/false, yes/no, on/off)."""
    value = text.strip().lower()
    if value not in _TRUE_WORDS | _FALSE_WORDS:
        raise argparse.ArgumentTypeError(f"{text!r} is not 1 or 0 (true/false, yes/no, on/off)")
    return value in _TRUE_WORDS


def secret(text: str) -> str:
    """A token: non-empty, no spaces; never quoted back in an error."""
    value = text.strip()
    if not value or any(c.isspace() for c in value):
        raise argparse.ArgumentTypeError("a token must be non-empty and contain no spaces")
    return value
