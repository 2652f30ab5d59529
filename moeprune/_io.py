"""Safe writes: a reader sees the old artefact or the new one, never half of one.

- `check_output_dir` / `check_output_file`: refuse, before any long work, an output path that
  cannot or must not be written (a file in the way, a non-empty folder without force, a path that
  is, contains or lies inside a protected one such as the source checkpoint, a read-only place).
- `atomic_write_bytes` / `atomic_write_json`: temporary file, fsync, rename, fsync the folder.
- `atomic_dir`: a folder written beside its target and renamed into place; its writer holds a
  lock, so the next writer of the same folder can tell the leftovers of a killed run from a live
  one, and removes them (or puts back a previous folder that was moved aside).

What moeprune writes gets the modes of any ordinary new file (0o666 & ~umask, folders
0o777 & ~umask), not the private ones `tempfile` gives its temporary files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from . import _faults
from .errors import MoepruneError

log = logging.getLogger("moeprune")

LOCK_NAME = ".moeprune-writer.lock"  # inside a temporary output folder while its writer lives
STALE_AGE_S = 60.0  # a temporary folder with no lock file is left alone this long: its writer may have just made it
_PROC_STATUS = "/proc/self/status"
_umask_lock = threading.Lock()


# ---------------------------------------------------------------------- modes
def current_umask() -> int:
    """The process umask, read without changing it where /proc has it (os.umask is process-wide)."""
    try:
        with open(_PROC_STATUS, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # os.umask can only be read by setting it: set the strictest mask meanwhile, so a file another
    # thread creates in that instant is private rather than too open
    with _umask_lock:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


# ---------------------------------------------------------------------- small helpers
def fsync_dir(path: str | os.PathLike) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def ensure_dir(path: str | os.PathLike) -> Path:
    """`mkdir -p` that fsyncs the parent of each folder it creates, so the new names survive a crash."""
    path = Path(path)
    if path.is_dir():
        return path
    if path.parent != path:
        ensure_dir(path.parent)
    try:
        path.mkdir()  # mode 0o777 & ~umask
    except FileExistsError:
        if not path.is_dir():
            raise
    else:
        fsync_dir(path.parent)
    return path


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def format_bytes(n: float) -> str:
    """'170.3 MB': decimal units, as shard sizes are written."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""  # unreachable


def _finish_tree(folder: Path) -> None:
    """Give every file and folder under `folder` the umask's mode and fsync it (bottom up), so a
    rename publishes durable content that others may read. Writers such as safetensors' save_file
    create files 0600 (a temporary file renamed), which would keep the output private."""
    fmode, dmode = file_mode(), dir_mode()
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            p = os.path.join(root, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                with contextlib.suppress(OSError):  # some file systems refuse modes; the content matters more
                    os.fchmod(fd, fmode)
                os.fsync(fd)
            finally:
                os.close(fd)
        with contextlib.suppress(OSError):
            os.chmod(root, dmode)
        fsync_dir(root)


# ---------------------------------------------------------------------- checks
def _inode(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_dev, st.st_ino


def _relation(target: Path, guarded: Path) -> str | None:
    """How `target` overlaps `guarded` ('is', 'lies inside', 'contains'), symlinks followed; None if apart."""
    t, g = Path(os.path.realpath(target)), Path(os.path.realpath(guarded))
    if t == g:
        return "is"
    if g in t.parents:
        return "lies inside"
    if t in g.parents:
        return "contains"
    # the same folder under another name (bind mount, case-insensitive file system): compare inodes
    with contextlib.suppress(OSError):
        gid = _inode(g)
        tid = _inode(t) if t.exists() else None
        if tid == gid:
            return "is"
        if any(a.exists() and _inode(a) == gid for a in t.parents):
            return "lies inside"
        if tid is not None and any(_inode(a) == tid for a in g.parents):
            return "contains"
    return None


def _check_protected(path: Path, protect: Iterable, what: str) -> None:
    for p in protect or ():
        if p is None:
            continue
        rel = _relation(path, Path(p))
        if rel:
            raise MoepruneError(f"{what} {path} {rel} {p}: the output must differ from it and neither contain it "
                                "nor lie inside it (replacing it would destroy it); choose another folder")


def _check_parent_writable(path: Path, what: str) -> None:
    """The folder that receives `path` (or its nearest existing ancestor, where it will be created)."""
    parent = Path(os.path.abspath(path)).parent
    anc = parent
    while not anc.exists() and anc.parent != anc:
        anc = anc.parent
    if not anc.is_dir():
        raise MoepruneError(f"cannot write {what} {path}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise MoepruneError(f"cannot write {what} {path}: the folder {anc} is not writable")


def check_output_dir(path: str | os.PathLike, *, force: bool, protect: Iterable = (),
                     what: str = "output folder") -> Path:
    """`path` as a Path if a folder may be written there; else a MoepruneError naming the problem.

    Call it before long work starts. Refuses: a file in the way; a non-empty folder without
    `force`; a path that is, contains or lies inside any path in `protect` (symlinks followed);
    a place that cannot be written. It first finishes what an interrupted writer of `path` left
    (see `clean_interrupted`), so a folder that a killed run had moved aside is back before the check.
    """
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise MoepruneError(f"{what} {path}: give the folder's own name, not {str(path)!r}")
    clean_interrupted(path)
    if os.path.lexists(path) and not path.is_dir():
        kind = "a file" if path.is_file() else "not a folder"
        raise MoepruneError(f"{what} {path} exists and is {kind}; choose another path")
    _check_protected(path, protect, what)
    if path.is_dir():
        try:
            with os.scandir(path) as it:
                non_empty = any(True for _ in it)
        except OSError as e:
            raise MoepruneError(f"cannot read {what} {path}: {e.strerror}") from None
        if non_empty and not force:
            raise MoepruneError(f"{what} {path} already exists and is not empty; choose another folder or pass "
                                "--force (force=True) to replace it")
        if non_empty and not os.access(path, os.W_OK | os.X_OK):
            raise MoepruneError(f"{what} {path} cannot be replaced: it is not writable, so its files cannot be "
                                "removed")
    _check_parent_writable(path, what)
    return path


def check_output_file(path: str | os.PathLike, *, force: bool, what: str = "output file") -> Path:
    """`path` as a Path if a file may be written there; else a MoepruneError naming the problem.

    Refuses a folder in the way, an existing file without `force`, something that is not a
    regular file, and a place that cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise MoepruneError(f"{what} {path} is a folder; give a file name")
    if os.path.lexists(path):
        if not force:
            raise MoepruneError(f"{what} {path} already exists; choose another name or pass --force (force=True) "
                                "to replace it")
        if not path.is_file():
            raise MoepruneError(f"{what} {path} exists and is not a regular file")
    _check_parent_writable(path, what)
    return path


# ---------------------------------------------------------------------- files
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data`: a temporary file in the same folder, fsynced, then renamed."""
    path = Path(path)
    ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            with contextlib.suppress(OSError):  # some file systems refuse modes; the content matters more
                os.fchmod(f.fileno(), file_mode())  # mkstemp makes it 0600
            f.write(data)
            f.flush()
            _faults.point(f"write {path.name}: temporary file written")
            os.fsync(f.fileno())
        _faults.point(f"write {path.name}: temporary file synced")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _faults.point(f"write {path.name}: renamed into place")
    fsync_dir(path.parent)
    _faults.point(f"write {path.name}: folder synced")
    _clean_stale_files(path)


def _clean_stale_files(path: Path) -> None:
    """Remove `.NAME.<random>.tmp` files that a killed writer of `path` left. A live one exists for
    the milliseconds of its write, so one older than STALE_AGE_S has no writer any more."""
    prefix = f".{path.name}."
    try:
        with os.scandir(path.parent) as it:
            stale = [e for e in it if e.name.startswith(prefix) and e.name.endswith(".tmp") and e.is_file()
                     and time.time() - e.stat().st_mtime > STALE_AGE_S]
    except OSError:
        return
    for e in stale:
        remove_leftover_file(Path(e.path))


def remove_leftover_file(f: Path) -> None:
    """Remove a file an interrupted run left, and say so (nothing if it is already gone)."""
    with contextlib.suppress(FileNotFoundError):
        size = f.stat().st_size
        f.unlink()
        log.warning("removed %s, left by an interrupted run (%s)", f, format_bytes(size))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MoepruneError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoepruneError(f"{what} {path} is not valid JSON: {e}") from None


# ---------------------------------------------------------------------- folders
def _leftovers(path: Path) -> dict[str, dict[str, Path]]:
    """What writers of `path` left beside it, by run: {token: {'tmp'|'lock'|'old': sibling}}."""
    # mkdtemp's random part is [a-z0-9_]; requiring it keeps '.a.b.x.tmp' (folder 'a.b') out of 'a''s
    pattern = re.compile(re.escape(f".{path.name}.") + r"(?:([a-z0-9_]+)\.(tmp|lock)|old-([a-z0-9_]+))")
    runs: dict[str, dict[str, Path]] = {}
    try:
        with os.scandir(path.parent) as it:
            names = [e.name for e in it]
    except OSError:
        return runs
    for name in names:
        m = pattern.fullmatch(name)
        if m:
            runs.setdefault(m.group(1) or m.group(3), {})[m.group(2) or "old"] = path.parent / name
    return runs


def _acquire(lock: Path) -> int | str | None:
    """An fd holding `lock` exclusively (its writer is gone); 'held' if a live writer holds it; None if absent."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError:
        return "held"  # cannot tell: leave it alone
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return "held"
    return fd


def _remove_tree(p: Path) -> None:
    if p.is_symlink():
        p.unlink(missing_ok=True)
        return
    size = _tree_bytes(p)
    shutil.rmtree(p, ignore_errors=True)
    if not os.path.lexists(p):
        log.warning("removed %s, left by an interrupted run (%s)", p, format_bytes(size))


def clean_interrupted(path: str | os.PathLike) -> None:
    """Remove what killed writers of the folder `path` left beside it; put back a folder moved aside.

    A run's temporary folder `.NAME.<run>.tmp` holds its writer's lock file (moved beside it as
    `.NAME.<run>.lock` just before publishing; `.NAME.old-<run>` is the previous folder while the
    new one is renamed in). Only runs whose lock nobody holds are touched; a temporary folder with
    no lock file only when older than STALE_AGE_S. If the target is missing, the previous folder
    goes back in its place (the interrupted replacement never happened); otherwise it is removed.
    """
    path = Path(path)
    for run in _leftovers(path).values():
        tmp, old, lock_out = run.get("tmp"), run.get("old"), run.get("lock")
        if tmp is not None and (tmp.is_symlink() or not tmp.is_dir()):
            tmp = None  # not a folder of ours
        fds: list[int] = []
        try:
            has_lock = False
            for lock in (tmp / LOCK_NAME if tmp is not None else None, lock_out):
                got = None if lock is None else _acquire(lock)
                if got == "held":
                    break
                if got is not None:
                    fds.append(got)
                    has_lock = True
            else:
                if not has_lock and tmp is not None and time.time() - tmp.stat().st_mtime < STALE_AGE_S:
                    continue  # its writer may have made it a moment ago and not locked it yet
                if old is not None:
                    if os.path.lexists(path):
                        _remove_tree(old)
                    else:
                        os.replace(old, path)
                        fsync_dir(path.parent)
                        log.warning("restored %s, which an interrupted run had moved aside to %s", path, old.name)
                if tmp is not None:
                    _remove_tree(tmp)
                if lock_out is not None:
                    lock_out.unlink(missing_ok=True)
        except OSError as e:  # another cleaner got there first, or no permission: not this run's business
            log.debug("could not clean up after an interrupted run of %s: %s", path, e)
        finally:
            for fd in fds:
                os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, protect: Iterable = ()) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path` in one rename.

    Checks `path` first (`check_output_dir`: a non-empty folder needs `overwrite`; nothing in
    `protect` may be replaced) and removes what interrupted writers of it left. On failure nothing
    at `path` changes; a writer killed at any point leaves the old folder or the new one, and
    leftovers the next `atomic_dir` for the same path removes.
    """
    path = Path(path)
    check_output_dir(path, force=overwrite, protect=protect)
    parent = ensure_dir(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    run = tmp.name[len(path.name) + 2 : -len(".tmp")]
    lock_out = parent / f".{path.name}.{run}.lock"
    _faults.point("atomic_dir: temporary folder made")
    lock_fd: int | None = None
    old: Path | None = None
    try:
        with contextlib.suppress(OSError):
            os.chmod(tmp, dir_mode())  # mkdtemp makes it 0700 (and _finish_tree sets it again at the end)
        # Locked under another name first, so no cleaner ever sees LOCK_NAME unlocked while we live.
        lock_fd = os.open(tmp / (LOCK_NAME + ".new"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        os.replace(tmp / (LOCK_NAME + ".new"), tmp / LOCK_NAME)
        _faults.point("atomic_dir: locked")
        yield tmp
        # The lock leaves the folder (still held: same file) so the published folder holds only content.
        os.replace(tmp / LOCK_NAME, lock_out)
        _finish_tree(tmp)
        _faults.point("atomic_dir: contents synced, lock moved out")
        if os.path.lexists(path):
            old = parent / f".{path.name}.old-{run}"
            os.replace(path, old)
            _faults.point("atomic_dir: previous folder moved aside")
        os.replace(tmp, path)
        _faults.point("atomic_dir: renamed into place")
        fsync_dir(parent)
        _faults.point("atomic_dir: parent folder synced")
        if old is not None:
            _remove_old(old)
            old = None
            _faults.point("atomic_dir: previous folder removed")
        lock_out.unlink(missing_ok=True)
    except BaseException:
        if old is not None:  # the new folder did not land: the previous one goes back
            with contextlib.suppress(OSError):
                if os.path.lexists(path):
                    _remove_old(old)
                else:
                    os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            lock_out.unlink(missing_ok=True)
        raise
    finally:
        if lock_fd is not None:
            os.close(lock_fd)  # releases the lock


def _remove_old(old: Path) -> None:
    if old.is_symlink():
        old.unlink(missing_ok=True)
    else:
        shutil.rmtree(old, ignore_errors=True)


_LIBC: object = None


# Each of oneDNN's primitive cache and ideep's (the layer between torch and oneDNN) keeps 1,024
# compiled matmuls by default, each with its own scratch buffers. MoE experts see a new token count on
# nearly every call, so a bf16 CPU run fills them with one-off shapes: about 1.6 decoder layers of
# memory on the stream benchmark, and no bound that follows the model's size. A server's decode
# steps repeat their shapes (SERVE_KERNEL_CACHE entries keep them); a streamed or batch run has
# little to reuse (0: no cache; ideep's cannot be smaller than 1). Wall time did not change on the
# stream benchmark either way.
SERVE_KERNEL_CACHE = 64
BATCH_KERNEL_CACHE = 0


def bound_kernel_caches(entries: int = BATCH_KERNEL_CACHE) -> None:
    """Cap oneDNN's and ideep's kernel caches at `entries` unless the user set them. Both read their
    environment variable at their first use, so this takes effect when called before the first bf16
    matmul; the first call in a process wins."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(entries))
    os.environ.setdefault("LRU_CACHE_CAPACITY", str(max(1, entries)))


def _libc():
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else False
        except OSError:
            _LIBC = False
    return _LIBC


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def map_large_blocks(threshold: int = 2**20) -> None:
    """Serve allocations above `threshold` bytes from their own mappings, returned to the system when
    freed. glibc's default raises its threshold to the largest block freed so far (up to 32 MiB), after
    which a layer's expert tensors and their kernels' scratch copies come from the heap and stay
    resident as fragments: about 0.7 of a layer above two layers on the stream benchmark. A no-op
    where the C library is not glibc."""
    libc = _libc()
    if libc:
        libc.mallopt(M_MMAP_THRESHOLD, threshold)


def release_freed_memory() -> None:
    """Return the memory glibc's allocator keeps after frees to the system (`malloc_trim`): streaming
    frees a whole layer at a time, and without this the process keeps growing by about a layer per
    layer. A no-op where the C library is not glibc."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)
