"""Deterministic crash points for durability tests (test-only).

Every write step of the pattern store and of folder outputs (export, profiles) calls
`point(label)`. Disarmed, a point costs one global check. Armed with n (the environment variable
`MOEPRUNE_FAULT_AT=n`, read once at import, or `arm(n)`), the n-th point reached ends the process
at once with `os._exit(86)`: no `finally` blocks, no atexit handlers, no buffered output, and the
kernel releases the process's locks, exactly as after a `kill -9` at that step. A test runs an
operation with a crash at n = 1, 2, ... until it completes, and checks what each crash left.
"""

from __future__ import annotations

import contextlib
import os

EXIT_CODE = 86

_armed = 0  # crash at this point number; 0: disarmed
_count = 0  # points reached since arming
_report_fd: int | None = None


def _from_env() -> int:
    try:
        return max(0, int(os.environ.get("MOEPRUNE_FAULT_AT", "0") or 0))
    except ValueError:
        return 0


def arm(n: int, report_fd: int | None = None) -> None:
    """Crash at the n-th point reached from now on; n = 0 disarms.

    Before exiting, the point's number and label are written to `report_fd` (default: stderr)."""
    global _armed, _count, _report_fd
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"fault point number must be an integer >= 0, got {n!r}")
    _armed, _count, _report_fd = n, 0, report_fd


def reached() -> int:
    """How many points were reached since `arm` (counted only while armed)."""
    return _count


def point(label: str) -> None:
    """A step after which a crash must leave consistent files; crashes here when armed for it."""
    if _armed:
        _hit(label)


def _hit(label: str) -> None:
    global _count
    _count += 1
    if _count == _armed:
        with contextlib.suppress(OSError):
            os.write(2 if _report_fd is None else _report_fd,
                     f"moeprune: injected crash at point {_count}: {label}\n".encode())
        os._exit(EXIT_CODE)


_armed = _from_env()
