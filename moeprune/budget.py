"""One reading of "how many experts": a fraction of a layer's experts, or a count.

Selection (`keep`), the serving pool (`expert_budget`) and the store's fallback budget all go
through `resolve_count`, so 0.3 of 8 experts means the same number everywhere (rounded up: a
fraction never keeps fewer experts than asked for). A float is a fraction in (0, 1]; an int is
a count. `1` is refused: it would keep one expert, while the user almost always means `1.0`
(all of them).
"""

from __future__ import annotations

import math
import numbers

from .errors import MoepruneError

Budget = int | float


def check_budget(value: object, what: str = "keep") -> Budget:
    """`value` as a fraction (float in (0, 1]) or a count (int >= 2); a clear error otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MoepruneError(f"{what} must be a fraction in (0, 1] or an expert count, got {value!r}")
    if isinstance(value, numbers.Integral):
        count = int(value)
        if count == 1:
            raise MoepruneError(f"{what}=1 is ambiguous: it would keep one expert per layer; "
                                f"give 1.0 to keep all of them, or a count of 2 or more")
        if count < 1:
            raise MoepruneError(f"{what} count {count} is out of range: give a count >= 2 or a fraction in (0, 1]")
        return count
    frac = float(value)
    if math.isnan(frac) or not 0.0 < frac <= 1.0:
        hint = f"; for a count of {int(frac)} experts write {int(frac)}" if frac > 1 and frac.is_integer() else ""
        raise MoepruneError(f"{what} fraction {frac} is out of range: give a fraction in (0, 1] or an integer "
                            f"count{hint}")
    return frac


def resolve_count(value: object, n_experts: int, what: str = "keep") -> int:
    """Experts per layer for a fraction or a count; a count above `n_experts` is an error."""
    value = check_budget(value, what)
    if isinstance(value, int):
        count = value
        if count > n_experts:
            raise MoepruneError(f"{what} count {count} is out of range: a layer has {n_experts} experts")
        return count
    # a hair below the exact product so that 0.3 * 10 = 3.0000000000000004 is 3, not 4
    return max(1, math.ceil(value * n_experts - 1e-9))


def parse_budget(text: str, flag: str = "--keep") -> Budget:
    """A command-line budget: '0.5' is a fraction, '16' a count; errors name the flag."""
    s = str(text).strip()
    try:
        value: Budget = int(s) if s.lstrip("+").isdigit() else float(s)
    except ValueError:
        raise MoepruneError(f"{flag} must be a fraction in (0, 1] or an expert count, got {text!r}") from None
    return check_budget(value, flag)
