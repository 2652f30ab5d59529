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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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


class PatternStore:
    """A folder of named patterns with a FAISS index of their demonstrations' signatures."""

    def __init__(self, path: str | os.PathLike, signature: str = "hidden", auto_rebuild: bool = True):
        self.path = Path(path)
        if signature not in KINDS:
            raise MoepruneError(f"unknown signature kind {signature!r}; choose one of {', '.join(KINDS)}")
        self._signature = signature
        self.auto_rebuild = auto_rebuild
        self.index_status = "not loaded"
        self._index = None
        self._index_meta: dict | None = None
        self._seen: tuple | None = None  # cheap fingerprint of the entries folder when the index was loaded
        self._patterns: dict[str, Pattern] = {}
        self._patterns_seen: tuple | None = None  # entries-folder stamp the pattern cache belongs to
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
            m = json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MoepruneError(f"store manifest {self.manifest_path} is not valid JSON: {e}") from None
        if m.get("format") != "moeprune-store" or not isinstance(m.get("format_version"), int):
            raise MoepruneError(f"{self.manifest_path} is not a moeprune store manifest")
        if m["format_version"] > STORE_FORMAT:
            raise FormatVersionError(f"store {self.path} has format version {m['format_version']}, newer than this "
                                     f"moeprune ({__version__}) reads (<= {STORE_FORMAT}); upgrade moeprune")
        return m

    def _manifest_cached(self) -> dict:
        st = self.manifest_path.stat()
        key = (st.st_mtime_ns, st.st_ino)
        if getattr(self, "_manifest_key", None) != key:
            self._manifest_value, self._manifest_key = self.manifest, key
        return self._manifest_value

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

    def names(self) -> list[str]:
        return [f.stem for f in self._entry_files()]

    def __contains__(self, name: str) -> bool:
        return (self.entries_dir / f"{check_name(name)}.json").is_file()

    def __len__(self) -> int:
        return len(self._entry_files())

    def _read_entry_json(self, f: Path) -> dict:
        try:
            data = json.loads(f.read_text())
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
        if not f.is_file():
            self.manifest  # noqa: B018 - a missing store says so, not "no pattern named"
            known = ", ".join(self.names()) or "none"
            raise MoepruneError(f"no pattern named {name!r} in store {self.path} (stored: {known})")
        data = self._read_entry_json(f)
        fix = f"; remove it with `moeprune store remove {self.path} {name}`"
        if not isinstance(data.get("pattern"), dict):
            raise MoepruneError(f"store entry {f} is incomplete (no 'pattern' object){fix}")
        try:
            pattern = Pattern.from_dict(data["pattern"], f"store entry {f}")
        except MoepruneError as e:
            raise MoepruneError(f"{e}{fix}") from None
        m = self._manifest_cached()
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
        return [self.get(n) for n in self.names()]

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
        h = hashlib.sha256()
        for f in self._entry_files():
            h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
        return h.hexdigest()

    def rebuild_index(self) -> dict:
        """Rebuild the FAISS index from the entries (under the writer lock); returns its metadata."""
        with self._locked():
            return self._rebuild_locked()

    def _vectors(self) -> tuple[np.ndarray, list[str], list[int]]:
        kind = self.signature
        vecs, names, counts = [], [], []
        for name in self.names():
            tensors = self._entry_tensors(self.get(name))
            key = "signatures" if kind == "router" else "hidden_signatures"
            if key not in tensors:
                raise MoepruneError(f"store entry {name!r} has no {kind} signatures")
            vecs.append(tensors[key].float().numpy())
            names.append(name)
            counts.append(len(tensors[key]))
        if not vecs:
            return np.zeros((0, self.manifest["signature"]["dim"]), dtype=np.float32), [], []
        return np.concatenate(vecs).astype(np.float32), names, counts

    def _rebuild_locked(self) -> dict:
        checksum = self._checksum()  # before reading the vectors: a later change makes the index stale
        index, meta = self._build()
        data = faiss.serialize_index(index).tobytes()  # in memory: no temporary file of faiss's own to leave behind
        # index.faiss first: a crash before index.json lands leaves a checksum mismatch, which is rebuilt
        atomic_write_bytes(self.path / "index.faiss", data)
        _faults.point("store.rebuild: index.faiss written")
        meta = {"format_version": STORE_FORMAT, "checksum": checksum,
                "faiss_sha256": hashlib.sha256(data).hexdigest(), **meta, "built": _now()}
        atomic_write_json(self.path / "index.json", meta)
        _faults.point("store.rebuild: index.json written")
        self._use(index, meta, "fresh")
        return meta

    def _build(self) -> tuple:
        """A FAISS index of the entries' centred, normalised signatures, and its metadata (in memory)."""
        raw, names, counts = self._vectors()
        mean = raw.mean(0) if len(raw) else np.zeros(raw.shape[1], dtype=np.float32)
        vecs = _normalise(raw - mean)
        index = _make_index(vecs.shape[1], len(vecs))
        if len(vecs):
            index.add(vecs)
        meta = {"kind": "flat" if len(vecs) <= FLAT_LIMIT else "hnsw", "n_vectors": int(len(vecs)),
                "dim": int(vecs.shape[1]), "names": names, "counts": counts, "mean": mean.tolist(),
                "thresholds": _auto_thresholds(vecs, counts, names)}
        return index, meta

    def _use(self, index, meta: dict, status: str) -> None:
        self._index, self._index_meta = index, meta
        self._seen = self._patterns_seen = self._entries_stamp()
        self._patterns = {}
        self.index_status = status

    def _entries_stamp(self) -> tuple:
        """Changes whenever an entry is added, replaced or removed (renames touch the folder)."""
        try:
            st = self.entries_dir.stat()
            return (st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            return (0, 0)

    def _pattern(self, name: str) -> Pattern:
        if name not in self._patterns:
            self._patterns[name] = self.get(name).pattern
        return self._patterns[name]

    def find(self, name: str) -> Pattern | None:
        """The pattern stored under `name` (cached until the entries change), or None if there is none."""
        if not isinstance(name, str) or not _NAME.match(name):
            return None
        stamp = self._entries_stamp()
        if self._patterns_seen != stamp:
            self._patterns, self._patterns_seen = {}, stamp
        if name not in self._patterns and not (self.entries_dir / f"{name}.json").is_file():
            return None
        return self._pattern(name)

    def _load_index(self) -> None:
        """Load the index; a missing, corrupt or stale one is rebuilt (or reported if that is off)."""
        self.manifest  # noqa: B018 - validates the manifest and its version
        problem = None
        try:
            meta = json.loads((self.path / "index.json").read_text())
            data = (self.path / "index.faiss").read_bytes()
            if meta.get("checksum") != self._checksum():
                problem = "it does not match the stored patterns (stale)"
            elif meta.get("faiss_sha256") != hashlib.sha256(data).hexdigest():
                problem = "index.faiss does not match its checksum (corrupt)"
            else:
                self._use(faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)), meta, "ok")
                return
        except FileNotFoundError:
            problem = "it is missing"
        except (json.JSONDecodeError, UnicodeDecodeError, RuntimeError) as e:
            problem = f"it is unreadable ({str(e).splitlines()[0]})"
        if not self.auto_rebuild:
            raise MoepruneError(f"the index of store {self.path} cannot be used: {problem}; rebuild it with "
                                f"`moeprune store rebuild {self.path}`")
        try:
            self.rebuild_index()
        except OSError:  # a read-only store: rebuild in memory only
            self._use(*self._build(), "")
        self.index_status = f"rebuilt: {problem}"

    def info(self) -> dict:
        m = self.manifest
        self._load_index()
        meta = self._index_meta
        return {"path": str(self.path), "format_version": m["format_version"], "model_type": m.get("model_type"),
                "model": m.get("model"), "fingerprint": m["fingerprint"], "signature": m["signature"],
                "patterns": len(meta["names"]), "vectors": meta["n_vectors"], "index": meta["kind"],
                "index_status": self.index_status, "threshold": m.get("threshold", "auto"),
                "expert_budget": m.get("expert_budget")}

    # ------------------------------------------------------------------ search
    def embed(self, queries: list, model, tokenizer) -> torch.Tensor:
        return embed(model, tokenizer, queries, kind=self.signature)

    def search(self, query, model=None, tokenizer=None, k: int = 16, threshold: float | str | None = None,
               expert_budget: float | int | None = None) -> Match:
        """The stored pattern for a query (text, chat messages, or a signature vector), or a fallback."""
        return self.search_many([query], model, tokenizer, k, threshold, expert_budget)[0]

    def search_many(self, queries: list, model=None, tokenizer=None, k: int = 16,
                    threshold: float | str | None = None, expert_budget: float | int | None = None) -> list[Match]:
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
        if expert_budget is not None:
            resolve_count(expert_budget, self._manifest_cached()["num_experts"], "expert_budget")
        if self._index is None or self._seen != self._entries_stamp():
            self._load_index()
        meta = self._index_meta
        if not meta["names"]:
            raise MoepruneError(f"store {self.path} holds no patterns")
        if all(isinstance(q, torch.Tensor) for q in queries):
            vecs = torch.stack([q.float().reshape(-1) for q in queries]).numpy()
        else:
            if model is None or tokenizer is None:
                raise MoepruneError("searching with text needs the model and its tokenizer")
            fp = getattr(model, "moeprune_source_fingerprint", None)
            if fp is None:
                fp = _safe_fingerprint(model)
                model.moeprune_source_fingerprint = fp  # hashing the routers once per model is enough
            m = self._manifest_cached()
            if fp != m["fingerprint"]:
                raise MoepruneError(f"the model ({fp}) is not the one this store's patterns belong to "
                                    f"({m['fingerprint']}), nor a slim or exported model made from it")
            if self.signature == "router" and _router_rows(model) != m.get("num_experts", _router_rows(model)):
                raise MoepruneError("this store indexes router signatures, which need the full router; this model "
                                    "holds a pruned one: search with the full model, or use a store of hidden-state "
                                    "signatures (the default)")
            vecs = self.embed(list(queries), model, tokenizer).numpy()
        if vecs.shape[1] != len(meta["mean"]):
            raise MoepruneError(f"query signature has dimension {vecs.shape[1]}, the store's is {len(meta['mean'])}")
        vecs = _normalise(vecs - np.asarray(meta["mean"], dtype=np.float32))
        k = min(k, meta["n_vectors"])  # asking for more neighbours than stored demonstrations is fine
        sims, rows = self._index.search(vecs, k)
        owner = meta.get("_owner")
        if owner is None:  # row -> pattern number, computed once per loaded index
            owner = meta["_owner"] = np.repeat(np.arange(len(meta["names"])), meta["counts"])
        m = self._manifest_cached()
        threshold = m.get("threshold", "auto") if threshold is None else threshold
        budget = m.get("expert_budget") if expert_budget is None else expert_budget
        return [self._decide(s, r, owner, meta, threshold, budget) for s, r in zip(sims, rows, strict=True)]

    def _decide(self, sims, rows, owner, meta, threshold, budget) -> Match:
        names = meta["names"]
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
        t = float(meta["thresholds"].get(best, _DEFAULT_THRESHOLD)) if threshold == "auto" else float(threshold)
        common = dict(score=nearest[best], confidence=votes[best] / total, runner_up=runner,
                      runner_up_score=nearest.get(runner) if runner else None, threshold=t, votes=votes)
        if nearest[best] >= t:
            return Match(self._pattern(best), best, fell_back=False, reason="matched", **common)
        top = [n for n in ranked[:3] if votes[n] > 0] or [best]
        union = self._pattern(top[0]).union(*[self._pattern(n) for n in top[1:]])
        limit = None if budget is None else resolve_count(budget, union.num_experts, "expert_budget")
        if limit is None or max(union.counts.values()) <= limit:
            return Match(union, None if len(top) > 1 else best, fell_back=True,
                         reason=f"no stored pattern is close enough; serving the union of {', '.join(top)}", **common)
        full = Pattern({layer: list(range(union.num_experts)) for layer in union.kept},
                       dict(union.meta, domains=[], strategy="full", criterion=None, budget=None))
        return Match(full, None, fell_back=True,
                     reason=f"no stored pattern is close enough and the union of {', '.join(top)} exceeds the "
                            f"expert budget; serving all experts", **common)


_DEFAULT_THRESHOLD = 0.5
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
