"""One rule for every time, size and count the public API takes.

Each public entry point validates all of its arguments with these functions
before it changes anything, so a call that raises leaves no state behind:

- wrong type (a bool, a str, None where it is not allowed) -> TypeError;
- negative, NaN, or beyond the bound (``MAX_SECONDS``, ``MAX_SIZE`` or the
  caller's) -> ValueError, whose message names the bound.

Times are seconds, any real number (int, float, ``fractions.Fraction``, numpy
floats...); ``None`` means no limit, and so does ``float("inf")`` where no
limit is allowed. ``-0.0`` is 0.
"""
from __future__ import annotations

import decimal
import math
import numbers
import operator
from typing import Any, Literal, Optional, Tuple, overload

__all__ = ["MAX_SECONDS", "MAX_SIZE", "seconds", "seconds_ns", "size"]

MAX_SECONDS = 1e9            # about 31.7 years; beyond it a time is absurd
MAX_SIZE = 1 << 40           # default bound for byte sizes and limits

_NS_PER_S = 10 ** 9
_MAX_S = int(MAX_SECONDS)


def _show(value: Any) -> str:
    """repr() for an error message, kept short (a hostile int may have more
    digits than repr() is allowed to print)."""
    try:
        r = repr(value)
    except Exception:
        if isinstance(value, int):
            return f"an int of {value.bit_length()} bits"
        return f"a {type(value).__name__}"
    return r if len(r) <= 40 else r[:37] + "..."


def _check_seconds(value: Any, what: str, none_ok: bool, inf_ok: bool,
                   zero_ok: bool) -> Optional[Tuple[int, int, Optional[float]]]:
    """The checked value as an exact fraction (numerator, denominator > 0)
    and, for a value that is not rational, its float; None for "no limit"."""
    if value is None:
        if none_ok:
            return None
        raise TypeError(f"{what} must be a number of seconds, not None")
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, decimal.Decimal)):
        raise TypeError(f"{what} must be a number of seconds"
                        f"{' or None' if none_ok else ''}, not {type(value).__name__}")
    f: Optional[float] = None
    if isinstance(value, numbers.Integral):
        num, den = operator.index(value), 1
    elif isinstance(value, numbers.Rational):
        # Exact: Fractions are never rounded.
        num, den = int(value.numerator), int(value.denominator)
    else:
        try:
            f = float(value)
        except OverflowError:       # a real beyond the float range
            big: Any = value
            f = math.inf if big > 0 else -math.inf
        except ValueError:          # a signalling Decimal NaN
            f = math.nan
        if math.isnan(f):
            raise ValueError(f"{what} must be a number of seconds, not NaN")
        if math.isinf(f) and value != f:
            # A finite real beyond the float range (a Decimal): absurd, not "no limit".
            f = math.copysign(1e300, f)
        if math.isinf(f):
            if f > 0 and inf_ok:
                return None
            if f > 0:
                raise ValueError(f"{what} must be at most MAX_SECONDS = {MAX_SECONDS:g} s, "
                                 f"got {_show(value)}")
            raise ValueError(f"{what} must be >= 0 seconds, got {_show(value)}")
        num, den = f.as_integer_ratio()
    if num < 0:
        raise ValueError(f"{what} must be >= 0 seconds, got {_show(value)}")
    if num == 0 and not zero_ok:
        raise ValueError(f"{what} must be > 0 seconds, got {_show(value)}")
    if num > _MAX_S * den:
        unlimited = " or ".join(n for n, ok in (("None", none_ok), ("inf", inf_ok)) if ok)
        hint = f"; {unlimited} means no limit" if unlimited else ""
        raise ValueError(f"{what} must be at most MAX_SECONDS = {MAX_SECONDS:g} s "
                         f"(about 31.7 years{hint}), got {_show(value)}")
    return num, den, f


@overload
def seconds(value: Any, what: str, *, none_ok: Literal[False], inf_ok: Literal[False],
            zero_ok: bool = True) -> float: ...
@overload
def seconds(value: Any, what: str, *, none_ok: bool = True, inf_ok: bool = True,
            zero_ok: bool = True) -> Optional[float]: ...
def seconds(value: Any, what: str, *, none_ok: bool = True, inf_ok: bool = True,
            zero_ok: bool = True) -> Optional[float]:
    """A checked time in seconds as a float (0.0 for -0.0); None for no limit
    (``None`` itself when ``none_ok``, ``+inf`` when ``inf_ok``).

    TypeError for a bool, a non-real (a str...) or a disallowed None;
    ValueError for NaN, a negative time, -inf, 0 when not ``zero_ok``, +inf
    when not ``inf_ok`` and a finite time beyond ``MAX_SECONDS``."""
    checked = _check_seconds(value, what, none_ok, inf_ok, zero_ok)
    if checked is None:
        return None
    num, den, _ = checked
    return num / den      # int / int is correctly rounded; -0.0 became 0


def seconds_ns(value: Any, what: str, *, none_ok: bool = True, inf_ok: bool = True,
               zero_ok: bool = True) -> int:
    """The same rules as :func:`seconds`; the time in whole nanoseconds,
    ``ceil(value * 1e9)`` (rounded up: a deadline made from it does not fire
    early), or -1 for no limit. A positive time is at least 1 ns, so
    ``zero_ok=False`` holds in nanoseconds too."""
    checked = _check_seconds(value, what, none_ok, inf_ok, zero_ok)
    if checked is None:
        return -1
    num, den, f = checked
    if f is not None:
        # The float product, as the user would compute it (0.1 s is
        # 100000000 ns, not one more for the binary 0.1's excess), but a
        # positive time never rounds to 0.
        return max(math.ceil(f * 1e9), 1 if num else 0)
    return -((-num * _NS_PER_S) // den)     # ints and Fractions: exact ceiling


@overload
def size(value: Any, what: str, *, minimum: int = 0, maximum: int = MAX_SIZE,
         none_ok: Literal[False] = False) -> int: ...
@overload
def size(value: Any, what: str, *, minimum: int = 0, maximum: int = MAX_SIZE,
         none_ok: bool = False) -> Optional[int]: ...
def size(value: Any, what: str, *, minimum: int = 0, maximum: int = MAX_SIZE,
         none_ok: bool = False) -> Optional[int]:
    """A checked size or count as a plain int, within [minimum, maximum];
    None passes through when ``none_ok``.

    TypeError for a bool, None (unless ``none_ok``) and anything that is not
    an int (int subclasses and ``__index__`` types such as numpy ints are
    fine; floats are not); ValueError naming the bound when out of range."""
    if value is None:
        if none_ok:
            return None
        raise TypeError(f"{what} must be an int, not None")
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, not bool")
    try:
        n = int(operator.index(value))
    except TypeError:
        raise TypeError(f"{what} must be an int{' or None' if none_ok else ''}, "
                        f"not {type(value).__name__}") from None
    if n < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {_show(n)}")
    if n > maximum:
        bound = f"MAX_SIZE = {MAX_SIZE} (1 TiB)" if maximum == MAX_SIZE else str(maximum)
        raise ValueError(f"{what} must be <= {bound}, got {_show(n)}")
    return n
