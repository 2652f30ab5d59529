"""`PatternStore`: per-task expert patterns on disk, found again from a raw query.

Layout of a store folder:

    manifest.json             format version, model fingerprint, signature kind and dimension
    entries/<name>.json       the pattern, its metadata, and the sha256 of its tensors file
    entries/<name>.safetensors  the profile statistics and per-demonstration signatures
    index.faiss, index.json   derived: FAISS index of normalised signatures, checksum of the entries

The entries are the truth; the index is rebuilt from them whenever its checksum disagrees. Every
file is replaced atomically (temporary file, fsync, rename); writers take an exclusive file lock;
an entry exists once its JSON is renamed into place, so a writer killed at any moment leaves
either the old store or the new one (plus temporary files the next writer removes).

Readers search one snapshot: the FAISS index, its metadata, the manifest and the pattern of every
indexed entry, read together under a shared lock (no writer is mid-change meanwhile; a reader that
may not lock the store re-reads until the store held still), checked against each other by the
entries' checksum, and swapped in whole when the store changes. A search never mixes two states.

A corrupt entry makes readers raise (`on_corrupt="raise"`, the default: what the CLI wants), or
leaves it out of their snapshot (`on_corrupt="skip"`: what a server wants, see `skipped`). A
snapshot that leaves entries out indexes the rest in memory only: the index files on disk keep
describing every entry, so nothing is dropped for good while the bad entry waits to be fixed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import faiss
import numpy as np
import torch
from safetensors.torch import load, save

from .. import _faults
from .._io import atomic_write_bytes, atomic_write_json, ensure_dir, fsync_dir, remove_leftover_file
from ..budget import check_budget, resolve_count
from ..errors import FormatVersionError, MoepruneError
from ..pattern import Pattern
from ..profiles import STATS, Profile
from ..version import __version__
from .signature import KINDS, embed, profile_signatures

STORE_FORMAT = 1
FLAT_LIMIT = 50_000  # above this many vectors the index is approximate (HNSW)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
AUTO_QUANTILE = 0.02  # a pattern's threshold: this quantile of its own demonstrations' leave-one-out similarity
AUTO_SLACK = 0.9  # ... loosened by 10% of its size, so that held-out text of the same task still clears it
MIN_DEMOS_FOR_AUTO = 4
ON_CORRUPT = ("raise", "skip")
# A change within this long of the files' timestamps may not move them (coarse file-system clocks):
# until then, a snapshot is checked against the files' contents rather than their timestamps.
RACY_S = 2.0
# Entries edited in place leave the folder's timestamps alone; a rescan of every entry file's stat
# (~3 µs each) catches them. It runs at most every RECHECK_MIN_S, or 10x its own duration if longer.
RECHECK_MIN_S = 0.05
_READ_TRIES = 20  # re-reads of a store that changed while it was read without a lock


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise MoepruneError(f"invalid pattern name {name!r}: use letters, digits, '.', '_' and '-' "
                            "(no path separators, not starting with '.' or '-', at most 128 characters)")
    return name


@dataclass
class Entry:
    name: str
    pattern: Pattern
    meta: dict

    @property
    def domain(self) -> str | None:
        return self.meta.get("domain")


@dataclass
class Match:
    """The result of a search: the pattern to serve, and how sure the store is of it."""

    pattern: Pattern
    name: str | None  # the matched pattern; None when falling back to the full expert set
    score: float  # cosine similarity of the query to the matched pattern's nearest demonstration
    confidence: float  # the matched pattern's share of the neighbours' similarity votes
    runner_up: str | None
    runner_up_score: float | None
    fell_back: bool
    reason: str
    threshold: float
    votes: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        head = f"{self.name or 'all experts'}" + (" (fallback)" if self.fell_back else "")
        ru = f", runner-up {self.runner_up} {self.runner_up_score:.3f}" if self.runner_up else ""
        return (f"{head}: score {self.score:.3f} (threshold {self.threshold:.3f}), confidence "
                f"{self.confidence:.2f}{ru}; {self.reason}")


@dataclass
class _State:
    """What one read of the store's files found (the input of a snapshot)."""

    manifest: dict
    manifest_sha: str
    checksum: str  # of the entries' JSON files, as the index records it
    patterns: dict[str, Pattern]  # valid entries
    vectors: dict[str, np.ndarray]  # their signatures, of the store's kind
    bad: dict[str, MoepruneError]  # entries that failed validation
    stamp: tuple  # see PatternStore._stamp
    files: frozenset  # see PatternStore._files
    read_at: float  # wall-clock time just before the read
    index_meta: dict | None = None
    index_data: bytes | None = None
    index_problem: str | None = None  # why the index files cannot be used; None if they can


@dataclass(frozen=True)
class _Snapshot:
    """One consistent view of the store for searches: never changed once made, only replaced whole."""

    index: Any  # the FAISS index; searched concurrently, never added to
    meta: Mapping  # index metadata: names, counts, mean, thresholds, kind, n_vectors, dim
    owner: np.ndarray  # index row -> position in meta["names"]
    mean: np.ndarray
    patterns: Mapping[str, Pattern]  # the pattern of every indexed name
    manifest: Mapping
    skipped: Mapping[str, str]  # corrupt entries left out (on_corrupt="skip"): name -> reason
    status: str
    checksum: str
    manifest_sha: str
    stamp: tuple  # see PatternStore._stamp
    files: frozenset  # see PatternStore._files
    checked_at: float  # wall-clock time at which the files were last known to match `stamp`

    @property
    def racy_until(self) -> float:
        """Until then a change may leave `stamp` as it is (the timestamps' granularity)."""
        newest = max((part[1] for part in self.stamp if part), default=0)
        return newest / 1e9 + RACY_S


class PatternStore:
    """A folder of named patterns with a FAISS index of their demonstrations' signatures.

    `on_corrupt`: what searches (and `find`, `names`, `info`) do with an entry that fails validation:
    "raise" (the default) names it in a MoepruneError; "skip" leaves it out, logs a warning once, and
    lists it in `skipped`. `get`, `list`, `profile` and the writers always validate and raise.
    Several threads may search one store object at once.
    """

    def __init__(self, path: str | os.PathLike, signature: str = "hidden", auto_rebuild: bool = True,
                 on_corrupt: str = "raise"):
        self.path = Path(path)
        if signature not in KINDS:
            raise MoepruneError(f"unknown signature kind {signature!r}; choose one of {', '.join(KINDS)}")
        if on_corrupt not in ON_CORRUPT:
            raise MoepruneError(f"on_corrupt must be one of {', '.join(ON_CORRUPT)}, got {on_corrupt!r}")
        self._signature = signature
        self.auto_rebuild = auto_rebuild
        self.on_corrupt = on_corrupt
        self._snap: _Snapshot | None = None  # replaced whole (one attribute store), never changed
        self._load_lock = threading.Lock()  # one thread of this object loads a snapshot at a time
        self._manifest_memo: tuple | None = None
        # plain strings: stat() through pathlib costs more than the syscall, and this runs every search
        self._stamp_paths = (os.path.join(self.path, "entries"), os.path.join(self.path, "manifest.json"))
        self._scanned_at = 0.0  # time.monotonic() of the last rescan of the entry files, and its duration
        self._scan_cost = 0.0
        if self.path.exists() and not self.path.is_dir():
            raise MoepruneError(f"{self.path} is a file, not a pattern store folder")

    # ------------------------------------------------------------------ files
    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def entries_dir(self) -> Path:
        return self.path / "entries"

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    @property
    def manifest(self) -> dict:
        if not self.exists():
            raise MoepruneError(f"no pattern store at {self.path} (no manifest.json); add a pattern to create one")
        try:
            return self._parse_manifest(self.manifest_path.read_bytes())
        except FileNotFoundError:  # removed since exists(): say so the same way
            raise MoepruneError(f"no pattern store at {self.path} (no manifest.json)") from None

    def _parse_manifest(self, raw: bytes) -> dict:
        try:
            m = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MoepruneError(f"store manifest {self.manifest_path} is not valid JSON: {e}") from None
        if not isinstance(m, dict):
            raise MoepruneError(f"{self.manifest_path} is not a moeprune store manifest")
        if m.get("format") != "moeprune-store" or not isinstance(m.get("format_version"), int):
            raise MoepruneError(f"{self.manifest_path} is not a moeprune store manifest")
        if m["format_version"] > STORE_FORMAT:
            raise FormatVersionError(f"store {self.path} has format version {m['format_version']}, newer than this "
                                     f"moeprune ({__version__}) reads (<= {STORE_FORMAT}); upgrade moeprune")
        return m

    def _manifest_cached(self) -> dict:
        st = self.manifest_path.stat()
        key = (st.st_mtime_ns, st.st_ino, st.st_size)
        memo = self._manifest_memo  # one attribute: threads never pair a key with another key's value
        if memo is None or memo[0] != key:
            memo = self._manifest_memo = (key, self.manifest)
        return memo[1]

    @property
    def signature(self) -> str:
        return self.manifest["signature"]["kind"] if self.exists() else self._signature

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive writer lock across processes; first repairs what killed writers left behind."""
        ensure_dir(self.path)
        # 0o666 & ~umask like any new file: writers of other users sharing the store must open it too
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._clean_leftovers()
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @contextlib.contextmanager
    def _shared_lock(self) -> Iterator[bool]:
        """Shared reader lock: no writer is mid-change while it is held. Yields False where this user
        cannot lock the store (read-only folder, no lock file it may open): the caller then checks
        that nothing changed while it read."""
        fd = None
        for flags in (os.O_RDONLY, os.O_RDONLY | os.O_CREAT):  # a reader needs no write access to lock
            try:
                fd = os.open(self.path / ".lock", flags, 0o666)
                break
            except FileNotFoundError:
                continue
            except OSError:
                break
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
            except OSError:  # a file system without flock
                os.close(fd)
                fd = None
        try:
            yield fd is not None
        finally:
            if fd is not None:
                os.close(fd)  # releases the lock

    def _clean_leftovers(self) -> None:
        """Finish or undo what a killed writer left (called under the lock: no writer is live)."""
        changed = False
        for folder in (self.path, self.entries_dir):
            if not folder.is_dir():
                continue
            for f in folder.iterdir():
                if f.name.startswith(".") and f.name.endswith(".tmp") and not f.is_dir():
                    remove_leftover_file(f)
                    changed = True
        if not self.entries_dir.is_dir():
            return
        # A replacement's tensors wait under a hidden name until its JSON (the commit point) lands:
        # with the new JSON in place they belong to it and go in; otherwise the add never happened.
        for f in self.entries_dir.glob(f".*{_PENDING}"):
            name = f.name[1 : -len(_PENDING)]
            target = self.entries_dir / f"{name}.safetensors"
            if _committed_sha(self.entries_dir / f"{name}.json") == hashlib.sha256(f.read_bytes()).hexdigest():
                os.replace(f, target)
                log.warning("completed the replacement of store entry %r that an interrupted run left half done",
                            name)
            else:
                remove_leftover_file(f)
            changed = True
        for f in self.entries_dir.glob("*.safetensors"):  # tensors whose JSON never landed: an add that did not return
            if not f.with_suffix(".json").exists():
                remove_leftover_file(f)
                changed = True
        if changed:
            fsync_dir(self.entries_dir)

    # ------------------------------------------------------------------ entries
    def _entry_files(self) -> list[Path]:
        if not self.entries_dir.is_dir():
            return []
        return sorted(f for f in self.entries_dir.glob("*.json") if not f.name.startswith("."))

    def _disk_names(self) -> list[str]:
        return [f.stem for f in self._entry_files()]

    def names(self) -> list[str]:
        """The stored patterns' names. With on_corrupt="skip": those the current snapshot serves
        (corrupt entries left out), so that `find` gives each of them a pattern."""
        if self.on_corrupt == "skip":
            return sorted(self._snapshot().patterns) if self.exists() else []
        return self._disk_names()

    @property
    def skipped(self) -> dict[str, str]:
        """Corrupt entries the current snapshot leaves out (on_corrupt="skip"): name -> reason."""
        if self.on_corrupt != "skip" or not self.exists():
            return {}
        return dict(self._snapshot().skipped)

    def __contains__(self, name: str) -> bool:
        return (self.entries_dir / f"{check_name(name)}.json").is_file()

    def __len__(self) -> int:
        return len(self._entry_files())

    def _read_entry_json(self, f: Path, raw: bytes) -> dict:
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MoepruneError(f"store entry {f} is corrupt ({e}); remove it with "
                                f"`moeprune store remove {self.path} {f.stem}`") from None
        if not isinstance(data, dict):
            raise MoepruneError(f"store entry {f} is corrupt (not a JSON object); remove it with "
                                f"`moeprune store remove {self.path} {f.stem}`")
        return data

    def get(self, name: str) -> Entry:
        """One stored pattern, validated against the store: ids in range, the store's model and layers."""
        f = self.entries_dir / f"{check_name(name)}.json"
        try:
            raw = f.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            self.manifest  # noqa: B018 - a missing store says so, not "no pattern named"
            known = ", ".join(self._disk_names()) or "none"
            raise MoepruneError(f"no pattern named {name!r} in store {self.path} (stored: {known})") from None
        return self._parse_entry(name, raw, self._manifest_cached())

    def _parse_entry(self, name: str, raw: bytes, m: Mapping) -> Entry:
        """Validate an entry's JSON (read once, as `raw`) against the store's manifest `m`."""
        f = self.entries_dir / f"{name}.json"
        data = self._read_entry_json(f, raw)
        fix = f"; remove it with `moeprune store remove {self.path} {name}`"
        if not isinstance(data.get("pattern"), dict):
            raise MoepruneError(f"store entry {f} is incomplete (no 'pattern' object){fix}")
        try:
            pattern = Pattern.from_dict(data["pattern"], f"store entry {f}")
        except MoepruneError as e:
            raise MoepruneError(f"{e}{fix}") from None
        if pattern.fingerprint != m["fingerprint"]:
            raise MoepruneError(f"store entry {f} is a pattern of another model ({pattern.fingerprint}, the store "
                                f"holds {m['fingerprint']}){fix}")
        if pattern.num_experts != m.get("num_experts", pattern.num_experts):
            raise MoepruneError(f"store entry {f} is for {pattern.num_experts} experts per layer, the store's model "
                                f"has {m['num_experts']}{fix}")
        if pattern.layers != list(m.get("moe_layers", pattern.layers)):
            raise MoepruneError(f"store entry {f} covers MoE layers {pattern.layers}, the store's model has "
                                f"{m['moe_layers']}{fix}")
        if not isinstance(data.get("n_demonstrations"), int) or not isinstance(data.get("profile"), dict):
            raise MoepruneError(f"store entry {f} is incomplete (no 'n_demonstrations' or 'profile'){fix}")
        return Entry(name, pattern, {k: v for k, v in data.items() if k != "pattern"})

    def list(self) -> list[Entry]:
        """Every stored pattern (an error for a folder that is not a store, or a corrupt entry)."""
        self.manifest  # noqa: B018 - validates that this is a store at all
        return [self.get(n) for n in self._disk_names()]

    def profile(self, name: str) -> Profile:
        """The profile statistics a pattern came from."""
        entry = self.get(name)
        tensors = self._entry_tensors(entry)
        meta = dict(entry.meta.get("profile", {}))
        return Profile({k: tensors[k] for k in STATS}, tensors["signatures"], meta, tensors.get("routing"),
                       tensors.get("hidden_signatures"))

    def _entry_tensors(self, entry: Entry) -> dict[str, torch.Tensor]:
        """The entry's tensors, checked against the checksum its JSON committed to.

        A replacement killed after its JSON landed leaves its tensors pending; readers take them
        from there (without the writer lock) until the next writer moves them into place."""
        name, want = entry.name, entry.meta.get("tensors_sha256")
        fix = f"remove it with `moeprune store remove {self.path} {name}` and add it again"
        for f in (self.entries_dir / f"{name}.safetensors", self.entries_dir / f".{name}{_PENDING}"):
            try:
                blob = f.read_bytes()
            except FileNotFoundError:
                continue
            if hashlib.sha256(blob).hexdigest() != want:
                continue
            try:
                return load(blob)
            except Exception as e:
                raise MoepruneError(f"store entry tensors {f} are unreadable ({e}); {fix}") from None
        raise MoepruneError(f"store entry {name!r} is corrupt (its tensors are missing or do not match their "
                            f"checksum); {fix}")

    # ------------------------------------------------------------------ writes
    def add(self, name: str, profile: Profile, pattern: Pattern, domain: str | None = None,
            tags: dict | None = None, replace: bool = False, model: str | None = None,
            rebuild: bool = True) -> Entry:
        """Store `pattern` (selected from `profile`) under `name`; refuses another model's patterns.

        With `rebuild=False` (bulk loading) the index is left stale until `rebuild_index()`."""
        check_name(name)
        if pattern.fingerprint != profile.fingerprint:
            raise MoepruneError("the pattern was not selected from this profile (fingerprints differ)")
        kind = self.signature
        sigs = profile_signatures(profile, kind)
        if sigs.shape[0] == 0:
            raise MoepruneError("the profile holds no demonstrations to index")
        tensors = {k: profile.stats[k].contiguous() for k in STATS}
        tensors["signatures"] = profile.signatures.contiguous()
        if profile.hidden_signatures is not None:
            tensors["hidden_signatures"] = profile.hidden_signatures.clone()  # never shares memory
        if profile.routing is not None:
            tensors["routing"] = profile.routing.contiguous()
        blob = save(tensors, metadata={"format": "moeprune-store-entry"})
        with self._locked():
            if self.exists():
                m = self.manifest
                if m["fingerprint"] != profile.fingerprint:
                    raise MoepruneError(
                        f"store {self.path} holds patterns of model {m['fingerprint']} ({m.get('model_type')}); "
                        f"this profile is of {profile.fingerprint}: use another store")
                if m["signature"]["dim"] != sigs.shape[1]:
                    raise MoepruneError(f"signature dimension {sigs.shape[1]} differs from the store's "
                                        f"{m['signature']['dim']}")
                if model and not m.get("model"):
                    atomic_write_json(self.manifest_path, dict(m, model=str(model)))
            else:
                atomic_write_json(self.manifest_path, {
                    "format": "moeprune-store", "format_version": STORE_FORMAT, "moeprune_version": __version__,
                    "fingerprint": profile.fingerprint, "model_type": profile.meta.get("model_type"),
                    "model": str(model) if model else profile.meta.get("model"),
                    "num_experts": profile.num_experts, "moe_layers": profile.moe_layers,
                    "signature": {"kind": kind, "dim": int(sigs.shape[1])}, "threshold": "auto",
                    "expert_budget": None, "created": _now()})
            if name in self and not replace:
                raise MoepruneError(f"a pattern named {name!r} is already in store {self.path}; "
                                    "pass replace=True (--replace) to overwrite it")
            ensure_dir(self.entries_dir)
            entry = {"name": name, "domain": domain or profile.domain, "created": _now(), "tags": tags or {},
                     "n_demonstrations": int(sigs.shape[0]), "tensors_sha256": hashlib.sha256(blob).hexdigest(),
                     "profile": profile.meta, "pattern": pattern.to_dict()}
            json_path, tensors_path = self.entries_dir / f"{name}.json", self.entries_dir / f"{name}.safetensors"
            if json_path.exists():
                # Replacing: the old JSON must never meet the new tensors (a crash between two renames
                # would leave an entry whose tensors fail its checksum), so they wait under a hidden
                # name that _clean_leftovers moves in, or drops, after a crash.
                pending = self.entries_dir / f".{name}{_PENDING}"
                atomic_write_bytes(pending, blob)
                _faults.point("store.add: replacement tensors written")
                atomic_write_json(json_path, entry)  # the commit point
                _faults.point("store.add: committed")
                os.replace(pending, tensors_path)
                fsync_dir(self.entries_dir)
                _faults.point("store.add: replacement tensors in place")
            else:
                atomic_write_bytes(tensors_path, blob)
                _faults.point("store.add: tensors written")
                atomic_write_json(json_path, entry)  # the commit point
                _faults.point("store.add: committed")
            if rebuild:
                self._rebuild_locked()
                _faults.point("store.add: index rebuilt")
        return self.get(name)

    def remove(self, name: str) -> None:
        check_name(name)
        with self._locked():
            if name not in self:
                raise MoepruneError(f"no pattern named {name!r} in store {self.path}")
            (self.entries_dir / f"{name}.json").unlink()  # the commit point
            _faults.point("store.remove: committed")
            (self.entries_dir / f"{name}.safetensors").unlink(missing_ok=True)
            fsync_dir(self.entries_dir)  # the removal survives a power cut before we say it is done
            _faults.point("store.remove: tensors removed")
            self._rebuild_locked()
            _faults.point("store.remove: index rebuilt")

    def set_options(self, threshold: float | str | None = None, expert_budget: float | int | None = None) -> None:
        """Change the store's default search threshold ('auto' or a cosine) and fallback expert budget."""
        threshold = check_threshold(threshold)
        if expert_budget is not None:
            check_budget(expert_budget, "expert_budget")
        with self._locked():
            m = self.manifest
            if expert_budget is not None:
                resolve_count(expert_budget, m["num_experts"], "expert_budget")  # in range for this model
            if threshold is not None:
                m["threshold"] = threshold
            if expert_budget is not None:
                m["expert_budget"] = expert_budget
            atomic_write_json(self.manifest_path, m)

    # ------------------------------------------------------------------ index
    def _checksum(self) -> str:
        """Of the entries' JSON files, names and contents: what an index records it was built from."""
        h = hashlib.sha256()
        for f in self._entry_files():
            h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
        return h.hexdigest()

    def rebuild_index(self) -> dict:
        """Rebuild the FAISS index from the entries (under the writer lock); returns its metadata.

        With on_corrupt="skip" and corrupt entries, the rest is indexed in memory only and the index
        files are left as they are (`index_status` says so): files that left an entry out would
        hide it from every later reader, also once it is fixed."""
        with self._locked():
            return dict(self._rebuild_locked().meta)

    def _stamp(self) -> tuple:
        """Changes whenever an entry is added, replaced or removed (renames touch the entries folder)
        or the manifest is replaced: checked before every search. In-place edits of an entry's files
        do not change it: `_files` sees those."""
        out = []
        for p in self._stamp_paths:
            try:
                st = os.stat(p)
            except FileNotFoundError:
                out.append(None)
                continue
            out.append((st.st_ino, max(st.st_mtime_ns, st.st_ctime_ns), st.st_size))
        return tuple(out)

    def _files(self) -> frozenset:
        """(name, inode, mtime, ctime, size) of every file in the entries folder: in-place edits change it."""
        out = []
        try:
            with os.scandir(self._stamp_paths[0]) as it:
                for e in it:
                    try:
                        st = e.stat()
                    except FileNotFoundError:
                        continue
                    out.append((e.name, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size))
        except FileNotFoundError:
            pass
        return frozenset(out)

    def _read_state(self) -> _State:
        """Read the manifest, every entry (validated, with its signatures) and the index files, once.

        The caller holds a lock, or compares `stamp` afterwards: a file that vanishes meanwhile raises
        _Vanished. Every pattern comes from the very bytes the checksum is computed from."""
        read_at, stamp, files = time.time(), self._stamp(), self._files()
        try:
            raw_manifest = self.manifest_path.read_bytes()
        except FileNotFoundError:
            raise _Vanished(f"the manifest of store {self.path} vanished while it was read") from None
        manifest = self._parse_manifest(raw_manifest)
        kind, dim = manifest["signature"]["kind"], manifest["signature"]["dim"]
        key = "signatures" if kind == "router" else "hidden_signatures"
        h = hashlib.sha256()
        patterns: dict[str, Pattern] = {}
        vectors: dict[str, np.ndarray] = {}
        bad: dict[str, MoepruneError] = {}
        for f in self._entry_files():
            try:
                raw = f.read_bytes()
            except FileNotFoundError:
                raise _Vanished(f"store entry {f} vanished while it was read") from None
            h.update(f.name.encode() + b"\0" + hashlib.sha256(raw).digest())
            name = f.stem
            try:
                entry = self._parse_entry(check_name(name), raw, manifest)
                vecs = self._entry_tensors(entry).get(key)
                if vecs is None or vecs.dim() != 2 or vecs.shape[1] != dim:
                    raise MoepruneError(f"store entry {name!r} holds no {kind} signatures of dimension {dim}; "
                                        f"remove it with `moeprune store remove {self.path} {name}`")
            except MoepruneError as e:
                bad[name] = e
                continue
            patterns[name], vectors[name] = entry.pattern, vecs.float().numpy()
        state = _State(manifest, hashlib.sha256(raw_manifest).hexdigest(), h.hexdigest(), patterns, vectors, bad,
                       stamp, files, read_at)
        try:
            meta = json.loads((self.path / "index.json").read_bytes())
            data = (self.path / "index.faiss").read_bytes()
        except FileNotFoundError:
            state.index_problem = "it is missing"
            return state
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            state.index_problem = f"it is unreadable ({str(e).splitlines()[0]})"
            return state
        if not isinstance(meta, dict):
            state.index_problem = "it is unreadable (index.json holds no JSON object)"
        elif meta.get("checksum") != state.checksum:
            state.index_problem = "it does not match the stored patterns (stale)"
        elif meta.get("faiss_sha256") != hashlib.sha256(data).hexdigest():
            state.index_problem = "index.faiss does not match its checksum (corrupt)"
        else:
            state.index_meta, state.index_data = meta, data
        return state

    def _load_snapshot(self) -> _Snapshot:
        """Read the store under the shared lock and make its snapshot (rebuilding the index if needed)."""
        self.manifest  # noqa: B018 - a missing, broken or newer store says so before anything else
        for _ in range(_READ_TRIES):
            with self._shared_lock() as locked:
                try:
                    state = self._read_state()
                except _Vanished:  # only a reader without the lock (or someone deleting by hand) sees this
                    state = None
                if state is not None and not locked and self._stamp() != state.stamp:
                    state = None  # a writer changed the store while it was read: read it again
            if state is not None:
                return self._snapshot_from(state)
            time.sleep(0.01)
        raise MoepruneError(f"store {self.path} kept changing while it was read without a lock (this user cannot "
                            "lock it); try again")

    def _snapshot_from(self, state: _State) -> _Snapshot:
        if state.bad and self.on_corrupt == "raise":
            raise state.bad[min(state.bad)]
        if state.bad:
            return self._make_snapshot(*self._build(state), state, self._skip_status(state))
        problem = state.index_problem
        if problem is None:
            try:
                return self._make_snapshot(*self._deserialize(state), state, "ok")
            except _Unusable as e:
                problem = str(e)
        if not self.auto_rebuild:
            raise MoepruneError(f"the index of store {self.path} cannot be used: {problem}; rebuild it with "
                                f"`moeprune store rebuild {self.path}`")
        try:
            with self._locked():
                return self._rebuild_locked(problem)
        except OSError:  # a read-only store: what was read is rebuilt in memory only
            return self._make_snapshot(*self._build(state), state,
                                       f"rebuilt: {problem} (in memory only: the store is read-only)")

    def _deserialize(self, state: _State) -> tuple:
        """The index files `state` read, checked to describe exactly its patterns."""
        meta = state.index_meta
        try:
            index = faiss.deserialize_index(np.frombuffer(state.index_data, dtype=np.uint8))
        except RuntimeError as e:
            raise _Unusable(f"it is unreadable ({str(e).splitlines()[0]})") from None
        try:
            fits = (list(meta["names"]) == list(state.patterns) and len(meta["counts"]) == len(meta["names"])
                    and index.ntotal == sum(meta["counts"]) == meta["n_vectors"]
                    and len(meta["mean"]) == index.d == state.manifest["signature"]["dim"]
                    and isinstance(meta["thresholds"], dict))
        except (KeyError, TypeError):
            fits = False
        if not fits:
            raise _Unusable("its metadata does not describe the stored patterns")
        return index, meta

    def _rebuild_locked(self, problem: str | None = None) -> _Snapshot:
        """Index the entries as they are now (the caller holds the writer lock) and use the result."""
        state = self._read_state()
        if state.bad and self.on_corrupt == "raise":
            raise state.bad[min(state.bad)]
        index, meta = self._build(state)
        if state.bad:
            snap = self._make_snapshot(index, meta, state, self._skip_status(state))
        else:
            data = faiss.serialize_index(index).tobytes()  # in memory: no temporary file of faiss's own to leave
            # index.faiss first: a crash before index.json lands leaves a checksum mismatch, which is rebuilt
            atomic_write_bytes(self.path / "index.faiss", data)
            _faults.point("store.rebuild: index.faiss written")
            meta = {"format_version": STORE_FORMAT, "checksum": state.checksum,
                    "faiss_sha256": hashlib.sha256(data).hexdigest(), **meta, "built": _now()}
            atomic_write_json(self.path / "index.json", meta)
            _faults.point("store.rebuild: index.json written")
            snap = self._make_snapshot(index, meta, state, f"rebuilt: {problem}" if problem else "fresh")
        self._snap = snap
        return snap

    def _skip_status(self, state: _State) -> str:
        n = len(state.bad)
        return (f"in memory only, without {n} corrupt entr{'y' if n == 1 else 'ies'} ({', '.join(sorted(state.bad))}): "
                f"the index files are left as they are until {'it is' if n == 1 else 'they are'} fixed or removed "
                f"(`moeprune store remove {self.path} NAME`)")

    def _build(self, state: _State) -> tuple:
        """A FAISS index of the valid entries' centred, normalised signatures, and its metadata (in memory)."""
        names = list(state.patterns)
        counts = [len(state.vectors[n]) for n in names]
        if names:
            raw = np.concatenate([state.vectors[n] for n in names]).astype(np.float32)
        else:
            raw = np.zeros((0, state.manifest["signature"]["dim"]), dtype=np.float32)
        mean = raw.mean(0) if len(raw) else np.zeros(raw.shape[1], dtype=np.float32)
        vecs = _normalise(raw - mean)
        index = _make_index(vecs.shape[1], len(vecs))
        if len(vecs):
            index.add(vecs)
        meta = {"kind": "flat" if len(vecs) <= FLAT_LIMIT else "hnsw", "n_vectors": int(len(vecs)),
                "dim": int(vecs.shape[1]), "names": names, "counts": counts, "mean": mean.tolist(),
                "thresholds": _auto_thresholds(vecs, counts, names)}
        return index, meta

    def _make_snapshot(self, index, meta: dict, state: _State, status: str) -> _Snapshot:
        names = list(meta["names"])
        owner = np.repeat(np.arange(len(names)), meta["counts"])
        mean = np.asarray(meta["mean"], dtype=np.float32)
        owner.flags.writeable = mean.flags.writeable = False
        skipped = {n: str(e) for n, e in sorted(state.bad.items())}
        self._warn_skipped(skipped)
        return _Snapshot(index, MappingProxyType(dict(meta)), owner, mean,
                         MappingProxyType({n: state.patterns[n] for n in names}), MappingProxyType(state.manifest),
                         MappingProxyType(skipped), status, state.checksum, state.manifest_sha, state.stamp,
                         state.files, state.read_at)

    def _warn_skipped(self, skipped: dict[str, str]) -> None:
        """One warning per store, corrupt entry and reason in this process, however often (and by
        however many store objects) snapshots are made."""
        where = str(self.path.resolve())
        with _WARNED_LOCK:
            new = [(n, r) for n, r in skipped.items() if (where, n, r) not in _WARNED]
            _WARNED.update((where, n, r) for n, r in new)
        for name, reason in new:
            log.warning("store %s: entry %r is left out of searches: %s", self.path, name, reason)

    def _current(self, snap: _Snapshot) -> bool:
        """Whether the store's files still hold what `snap` was read from.

        Adds, removes and replacements (renames) move `_stamp` and are seen at the next search. The
        slower checks (every entry file's stat, for in-place edits; the files' contents while the
        timestamps are too recent to tell) run at most every RECHECK_MIN_S or 10x their own cost,
        whichever is longer, so they cost searches at most ~10% however large the store: an in-place
        edit is seen within that interval instead."""
        try:
            if self._stamp() != snap.stamp:
                return False
            start = time.monotonic()
            if start - self._scanned_at < max(10 * self._scan_cost, RECHECK_MIN_S):
                return True
            try:
                if self._files() != snap.files:
                    return False
                if snap.checked_at > snap.racy_until:
                    return True  # any later change moves the timestamps past the stamp's
                now = time.time()  # what is read next was there at least since now
                same = (self._checksum() == snap.checksum and self._stamp() == snap.stamp
                        and hashlib.sha256(self.manifest_path.read_bytes()).hexdigest() == snap.manifest_sha)
            finally:
                self._scanned_at = time.monotonic()
                self._scan_cost = self._scanned_at - start
        except OSError:
            return False
        if same and now > snap.racy_until and self._snap is snap:
            self._snap = replace(snap, checked_at=now)  # the timestamps tell from now on
        return same

    def _snapshot(self) -> _Snapshot:
        """The current snapshot, read again first if the store changed since it was read."""
        snap = self._snap
        if snap is not None and self._current(snap):
            return snap
        with self._load_lock:
            latest = self._snap
            if latest is not None and latest is not snap and self._current(latest):
                return latest  # another thread loaded it meanwhile
            snap = self._load_snapshot()
            self._snap = snap
            return snap

    @property
    def index_status(self) -> str:
        """How the current snapshot's index came about: ok (read from its files), fresh (this object
        wrote them), rebuilt: <why>, or in memory only (see `rebuild_index`)."""
        snap = self._snap
        return "not loaded" if snap is None else snap.status

    @property
    def _index(self):
        snap = self._snap
        return None if snap is None else snap.index

    def find(self, name: str) -> Pattern | None:
        """The pattern stored under `name` in the current snapshot, or None if there is none (or, with
        on_corrupt="skip", if its entry is corrupt)."""
        if not isinstance(name, str) or not _NAME.match(name) or not self.exists():
            return None
        return self._snapshot().patterns.get(name)

    def info(self) -> dict:
        snap = self._snapshot()
        m, meta = snap.manifest, snap.meta
        out = {"path": str(self.path), "format_version": m["format_version"], "model_type": m.get("model_type"),
               "model": m.get("model"), "fingerprint": m["fingerprint"], "signature": dict(m["signature"]),
               "patterns": len(meta["names"]), "vectors": meta["n_vectors"], "index": meta["kind"],
               "index_status": snap.status, "threshold": m.get("threshold", "auto"),
               "expert_budget": m.get("expert_budget")}
        if snap.skipped:
            out["skipped"] = dict(snap.skipped)
        return out

    # ------------------------------------------------------------------ search
    def embed(self, queries: list, model, tokenizer) -> torch.Tensor:
        return embed(model, tokenizer, queries, kind=self.signature)

    def search(self, query, model=None, tokenizer=None, k: int = 16, threshold: float | str | None = None,
               expert_budget: float | int | None = None) -> Match:
        """The stored pattern for a query (text, chat messages, or a signature vector), or a fallback."""
        return self.search_many([query], model, tokenizer, k, threshold, expert_budget)[0]

    def search_many(self, queries: list, model=None, tokenizer=None, k: int = 16,
                    threshold: float | str | None = None, expert_budget: float | int | None = None) -> list[Match]:
        """`search` for several queries, all answered from one snapshot of the store."""
        if isinstance(queries, (str, torch.Tensor)) or not isinstance(queries, (list, tuple)):
            raise MoepruneError(f"search_many takes a list of queries, got {type(queries).__name__}")
        if not queries:
            raise MoepruneError("no queries to search")
        for q in queries:
            if isinstance(q, str) and not q.strip():
                raise MoepruneError("the query is empty")
            if not isinstance(q, (str, list, torch.Tensor)):
                raise MoepruneError(f"a query is text, a list of chat messages or a signature vector, "
                                    f"got {type(q).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise MoepruneError(f"k (neighbouring demonstrations that vote) must be an integer >= 1, got {k!r}")
        threshold = check_threshold(threshold)
        snap = self._snapshot()  # everything below reads this one snapshot, whatever writers do meanwhile
        m, meta = snap.manifest, snap.meta
        if expert_budget is not None:
            resolve_count(expert_budget, m["num_experts"], "expert_budget")
        if not meta["names"]:
            left_out = f" ({len(snap.skipped)} corrupt entries left out: {', '.join(snap.skipped)})" \
                if snap.skipped else ""
            raise MoepruneError(f"store {self.path} holds no patterns{left_out}")
        kind = m["signature"]["kind"]
        if all(isinstance(q, torch.Tensor) for q in queries):
            vecs = torch.stack([q.float().reshape(-1) for q in queries]).numpy()
        else:
            if model is None or tokenizer is None:
                raise MoepruneError("searching with text needs the model and its tokenizer")
            fp = getattr(model, "moeprune_source_fingerprint", None)
            if fp is None:
                fp = _safe_fingerprint(model)
                model.moeprune_source_fingerprint = fp  # hashing the routers once per model is enough
            if fp != m["fingerprint"]:
                raise MoepruneError(f"the model ({fp}) is not the one this store's patterns belong to "
                                    f"({m['fingerprint']}), nor a slim or exported model made from it")
            if kind == "router" and _router_rows(model) != m.get("num_experts", _router_rows(model)):
                raise MoepruneError("this store indexes router signatures, which need the full router; this model "
                                    "holds a pruned one: search with the full model, or use a store of hidden-state "
                                    "signatures (the default)")
            vecs = embed(model, tokenizer, list(queries), kind=kind).numpy()
        if vecs.shape[1] != len(snap.mean):
            raise MoepruneError(f"query signature has dimension {vecs.shape[1]}, the store's is {len(snap.mean)}")
        vecs = _normalise(vecs - snap.mean)
        k = min(k, meta["n_vectors"])  # asking for more neighbours than stored demonstrations is fine
        sims, rows = snap.index.search(vecs, k)
        threshold = m.get("threshold", "auto") if threshold is None else threshold
        budget = m.get("expert_budget") if expert_budget is None else expert_budget
        return [self._decide(snap, s, r, threshold, budget) for s, r in zip(sims, rows, strict=True)]

    def _decide(self, snap: _Snapshot, sims, rows, threshold, budget) -> Match:
        names, owner, patterns = snap.meta["names"], snap.owner, snap.patterns
        votes: dict[str, float] = {}
        nearest: dict[str, float] = {}
        for s, r in zip(sims.tolist(), rows.tolist(), strict=True):
            if r < 0:
                continue
            n = names[owner[r]]
            votes[n] = votes.get(n, 0.0) + max(s, 0.0)
            nearest[n] = max(nearest.get(n, -1.0), s)
        ranked = sorted(votes, key=lambda n: (-votes[n], -nearest[n]))
        best = ranked[0]
        total = sum(votes.values()) or 1.0
        runner = ranked[1] if len(ranked) > 1 else None
        t = float(snap.meta["thresholds"].get(best, _DEFAULT_THRESHOLD)) if threshold == "auto" else float(threshold)
        common = dict(score=nearest[best], confidence=votes[best] / total, runner_up=runner,
                      runner_up_score=nearest.get(runner) if runner else None, threshold=t, votes=votes)
        if nearest[best] >= t:
            return Match(patterns[best], best, fell_back=False, reason="matched", **common)
        top = [n for n in ranked[:3] if votes[n] > 0] or [best]
        union = patterns[top[0]].union(*[patterns[n] for n in top[1:]])
        limit = None if budget is None else resolve_count(budget, union.num_experts, "expert_budget")
        if limit is None or max(union.counts.values()) <= limit:
            return Match(union, None if len(top) > 1 else best, fell_back=True,
                         reason=f"no stored pattern is close enough; serving the union of {', '.join(top)}", **common)
        full = Pattern({layer: list(range(union.num_experts)) for layer in union.kept},
                       dict(union.meta, domains=[], strategy="full", criterion=None, budget=None))
        return Match(full, None, fell_back=True,
                     reason=f"no stored pattern is close enough and the union of {', '.join(top)} exceeds the "
                            f"expert budget; serving all experts", **common)


class _Vanished(MoepruneError):
    """A file of the store disappeared while it was read (only without the lock)."""


class _Unusable(Exception):
    """The index files cannot serve the entries they were read with."""


_DEFAULT_THRESHOLD = 0.5
_WARNED: set[tuple[str, str, str]] = set()  # (store, entry, reason) already logged by this process
_WARNED_LOCK = threading.Lock()
_PENDING = ".safetensors.pending"  # entries/.<name>.safetensors.pending: a replacement's tensors before its commit
log = logging.getLogger("moeprune")


def _committed_sha(json_path: Path) -> str | None:
    """The tensors checksum an entry's JSON commits to; None if there is no readable JSON."""
    try:
        return json.loads(json_path.read_text()).get("tensors_sha256")
    except (OSError, ValueError, AttributeError):
        return None




def _safe_fingerprint(model) -> str | None:
    from ..fingerprint import source_fingerprint

    try:
        return source_fingerprint(model)
    except MoepruneError:
        raise
    except Exception:  # not a model moeprune can identify: it cannot match any store
        return None


def _router_rows(model) -> int:
    from ..routers import get_adapter

    adapter = get_adapter(model)
    return int(adapter.router(adapter.blocks(model)[0][1]).weight.shape[0])


def check_threshold(threshold: object) -> float | str | None:
    """None (the store's default), 'auto', or a cosine similarity in [-1, 1]."""
    if threshold is None or threshold == "auto":
        return threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1 <= threshold <= 1:
        raise MoepruneError(f"threshold must be 'auto' or a cosine similarity in [-1, 1], got {threshold!r}")
    return float(threshold)


def _normalise(v: np.ndarray) -> np.ndarray:
    v = np.ascontiguousarray(v, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.maximum(norms, 1e-12)


def _make_index(dim: int, n: int):
    if n <= FLAT_LIMIT:
        return faiss.IndexFlatIP(dim)
    index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    index.hnsw.efSearch = 128
    return index


def _auto_thresholds(vecs: np.ndarray, counts: list[int], names: list[str]) -> dict[str, float]:
    """Per pattern: how close its own demonstrations are to each other (leave-one-out nearest
    neighbour, low quantile, with slack). A query farther than that from every pattern has no match."""
    out, start = {}, 0
    for name, n in zip(names, counts, strict=True):
        v = vecs[start : start + n][:2000]
        start += n
        if len(v) < MIN_DEMOS_FOR_AUTO:
            out[name] = _DEFAULT_THRESHOLD
            continue
        sims = v @ v.T
        np.fill_diagonal(sims, -np.inf)
        loo = sims.max(1)
        q = float(np.quantile(loo, AUTO_QUANTILE))
        out[name] = q - (1 - AUTO_SLACK) * abs(q)  # slack always loosens, also for a negative quantile
    return out
