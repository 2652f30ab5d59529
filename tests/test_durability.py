"""Nothing lost, nothing silently wrong: output-path checks, file modes, leftovers of killed runs,
and crash tests of every write step of the pattern store and of export.

The crash tests run in ONE helper process (`python tests/test_durability.py --worker DIR`), so
torch and faiss are imported once; with one OpenMP thread, forking it is safe. For each write
operation the helper forks a child armed (`moeprune._faults`) to crash at fault point n = 1, 2, ...
(`os._exit`: no clean-up runs, the kernel drops its locks, as after `kill -9`) until the operation
completes, and after each crash checks what is on disk and that the next run repairs it. It also
kills real writers with SIGKILL once they have acknowledged adds, and runs concurrent writers. Its
jobs are split over itself and one forked copy (two cores); it prints one JSON report, and the
tests below assert on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from moeprune import MoepruneError, Pattern
from moeprune import _io as io
from moeprune._io import atomic_dir, atomic_write_bytes, check_output_dir, check_output_file
from moeprune.exporter import export, parse_size

HERE = Path(__file__).resolve().parent
LOG = "moeprune"


# ============================================================== output paths
def test_output_dir_checks(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(MoepruneError, match="exists and is a file"):
        check_output_dir(f, force=True)
    full = tmp_path / "full"
    full.mkdir()
    (full / "a").write_text("a")
    with pytest.raises(MoepruneError, match="already exists and is not empty.*--force"):
        check_output_dir(full, force=False)
    assert check_output_dir(full, force=True) == full
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", force=False)
    check_output_dir(tmp_path / "new" / "deeper", force=False)  # missing folders are made later
    for under_file in (f / "out", f / "a" / "b"):  # nothing can be made below a file, even as root
        with pytest.raises(MoepruneError, match=f"cannot write .*: {f} is a file"):
            check_output_dir(under_file, force=True)
    with pytest.raises(MoepruneError, match="folder's own name"):
        check_output_dir(".", force=True)


def test_output_dir_protects(tmp_path):
    models = tmp_path / "models"
    src = models / "src"
    src.mkdir(parents=True)
    (src / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "link").symlink_to(models)
    cases = {src: "is", models: "contains", tmp_path: "contains", src / "pruned": "lies inside",
             tmp_path / "link" / "src": "is", tmp_path / "link": "contains", src / "x" / "y": "lies inside"}
    for target, rel in cases.items():
        with pytest.raises(MoepruneError, match=f"{rel} .*must differ from it"):
            check_output_dir(target, force=True, protect=[src])
    check_output_dir(models / "src2", force=True, protect=[src])  # a name that merely starts alike is apart
    check_output_dir(models / "other", force=True, protect=[src, None])
    with pytest.raises(MoepruneError, match="contains"), atomic_dir(models, overwrite=True, protect=[src]):
        pass  # atomic_dir checks by itself, for API callers
    assert (src / "model.safetensors").read_bytes() == b"weights"


def test_unwritable_location_is_refused(tmp_path, monkeypatch):
    # root may write anywhere, so os.access is stubbed: it must be asked about the nearest existing folder
    asked = []

    def access(path, mode, **kw):
        asked.append(Path(path))
        return False

    monkeypatch.setattr(io.os, "access", access)
    with pytest.raises(MoepruneError, match=f"cannot write output folder .*: the folder {tmp_path} is not writable"):
        check_output_dir(tmp_path / "a" / "b" / "out", force=False)
    assert asked == [tmp_path]
    with pytest.raises(MoepruneError, match="pattern file .* not writable"):
        check_output_file(tmp_path / "p.json", force=False, what="pattern file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "old").mkdir()
    (ro / "old" / "f").write_text("x")
    ro.chmod(0o555)
    try:
        with pytest.raises(MoepruneError, match="not writable"):
            check_output_dir(ro / "new", force=False)
        with pytest.raises(MoepruneError, match="not writable"):
            check_output_file(ro / "p.json", force=True)
    finally:
        ro.chmod(0o755)
    (ro / "old").chmod(0o555)
    try:
        with pytest.raises(MoepruneError, match="cannot be replaced"):
            check_output_dir(ro / "old", force=True)
    finally:
        (ro / "old").chmod(0o755)


def test_output_file_checks(tmp_path):
    p = tmp_path / "pattern.json"
    assert check_output_file(p, force=False) == p
    p.write_text("{}")
    with pytest.raises(MoepruneError, match="already exists.*--force"):
        check_output_file(p, force=False)
    check_output_file(p, force=True)
    with pytest.raises(MoepruneError, match="is a folder"):
        check_output_file(tmp_path, force=True)
    with pytest.raises(MoepruneError, match="is a file, not a folder"):
        check_output_file(p / "x.png", force=True)


def _fake_checkpoint(folder: Path) -> Pattern:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    return Pattern({0: [0, 1], 1: [1, 2]}, {"num_experts": 4})


def test_export_refuses_to_touch_the_source(tmp_path):
    src = tmp_path / "models" / "src"
    pattern = _fake_checkpoint(src)
    for out, rel in ((src, "is"), (tmp_path / "models", "contains"), (src / "pruned", "lies inside")):
        with pytest.raises(MoepruneError, match=f"export folder .* {rel} .*must differ"):
            export(src, pattern, out, force=True)
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["src"]


def test_parse_size_refuses_nothing():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("20KiB") == 20480 and parse_size(7) == 7
    for bad in ("0", 0, "0.1B", -5, "0KB"):
        with pytest.raises(MoepruneError, match=f"must be at least one byte, got {bad!r}"):
            parse_size(bad)
    for bad in ("1.2.3", "big", True):
        with pytest.raises(MoepruneError, match="cannot read shard size"):
            parse_size(bad)


def test_demo_refuses_a_non_empty_folder_before_any_work(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import moeprune
    from moeprune.demo import DEMO_MODEL, run_demo

    if not (DEMO_MODEL / "config.json").is_file():
        pytest.skip("the bundled demo model is not present")

    def started(*a, **kw):
        raise RuntimeError("work started")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", started)
    monkeypatch.setattr(moeprune, "profile", started)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.txt").write_text("precious")
    with pytest.raises(MoepruneError, match="demo output folder .* not empty.*--force"):
        run_demo(out=str(out))
    assert (out / "thesis.txt").read_text() == "precious"
    with pytest.raises(RuntimeError, match="work started"):  # force lets it through to the work
        run_demo(out=str(out), force=True)
    with pytest.raises(MoepruneError, match="contains"):
        run_demo(out=str(DEMO_MODEL.parent), force=True)


# ============================================================== leftovers of killed runs
def test_fault_switch(monkeypatch):
    import importlib

    from moeprune import _faults

    monkeypatch.setenv("MOEPRUNE_FAULT_AT", "3")
    try:
        importlib.reload(_faults)  # the variable is read once, at import
        assert _faults._armed == 3
    finally:
        monkeypatch.delenv("MOEPRUNE_FAULT_AT")
        importlib.reload(_faults)
    assert _faults._armed == 0
    _faults.point("disarmed: nothing happens")
    assert _faults.reached() == 0
    with pytest.raises(ValueError):
        _faults.arm(-1)


def _run_folder(parent: Path, name: str, run: str, lock: str | None, age: float = 0) -> Path:
    """What a writer of `name` killed mid-run leaves: `.name.run.tmp` with its lock file (or none)."""
    tmp = parent / f".{name}.{run}.tmp"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"x" * 1500)
    if lock == "inside":
        (tmp / io.LOCK_NAME).touch()
    elif lock == "beside":
        (parent / f".{name}.{run}.lock").touch()
    if age:
        t = time.time() - age
        os.utime(tmp, (t, t))
    return tmp


def test_leftovers_of_killed_runs_are_removed(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(io, "STALE_AGE_S", 3600.0)  # "young" must not depend on how fast this machine is
    target = tmp_path / "out"
    dead = _run_folder(tmp_path, "out", "dead0001", "inside")
    dead_beside = _run_folder(tmp_path, "out", "dead0002", "beside")
    young = _run_folder(tmp_path, "out", "young001", None)  # its writer may have just made it
    aged = _run_folder(tmp_path, "out", "aged0001", None, age=2 * io.STALE_AGE_S)
    live = _run_folder(tmp_path, "out", "live0001", "inside")
    others = [_run_folder(tmp_path, "outer", "dead0003", "inside"), _run_folder(tmp_path, "out.b", "dead0004", "inside")]
    fd = os.open(live / io.LOCK_NAME, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live writer (another open file description: flock conflicts)
    try:
        with caplog.at_level(logging.WARNING, LOG), atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("new")
    finally:
        os.close(fd)
    assert (target / "a.txt").read_text() == "new" and sorted(p.name for p in target.iterdir()) == ["a.txt"]
    for gone in (dead, dead_beside, aged, tmp_path / ".out.dead0002.lock"):
        assert not gone.exists(), gone
    for kept in (young, live, *others):
        assert kept.is_dir(), kept
    removed = sorted(r.getMessage() for r in caplog.records if r.name == LOG)
    assert removed == sorted(f"removed {p}, left by an interrupted run (1.5 kB)" for p in (dead, dead_beside, aged))
    # the live writer is gone now, and a minute passes: the next run removes both
    t = time.time() - 2 * io.STALE_AGE_S
    os.utime(young, (t, t))
    check_output_dir(target, force=True)
    assert not live.exists() and not young.exists()


def test_a_folder_moved_aside_by_a_killed_run_comes_back(tmp_path, caplog):
    target = tmp_path / "out"
    old = tmp_path / ".out.old-run00001"  # killed between its two renames: the target is gone
    old.mkdir()
    (old / "config.json").write_text("previous")
    tmp = _run_folder(tmp_path, "out", "run00001", "beside")
    with caplog.at_level(logging.WARNING, LOG), pytest.raises(MoepruneError, match="not empty"):
        check_output_dir(target, force=False)
    assert (target / "config.json").read_text() == "previous"
    assert not old.exists() and not tmp.exists() and not (tmp_path / ".out.run00001.lock").exists()
    assert any("restored" in r.getMessage() for r in caplog.records)
    old.mkdir()  # killed after its second rename: the new folder is in place, the old one goes
    (tmp_path / ".out.run00001.lock").touch()
    check_output_dir(target, force=True)
    assert not old.exists() and (target / "config.json").read_text() == "previous"


def test_a_live_writer_is_left_alone(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
        t = time.time() - 10 * io.STALE_AGE_S  # even one that looks old: its writer holds the lock
        os.utime(tmp, (t, t))
        check_output_dir(target, force=True)  # another run of the same output starts meanwhile
        assert tmp.is_dir()
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt", "b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_body_leaves_nothing(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"), atomic_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "half").write_text("x")
        raise OSError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (tmp_path / "out" / "keep.txt").exists()


# ============================================================== file modes
@pytest.fixture
def umask027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def _modes(folder: Path) -> dict[str, int]:
    out = {".": folder.stat().st_mode & 0o777}
    for p in folder.rglob("*"):
        out[str(p.relative_to(folder))] = p.stat().st_mode & 0o777
    return out


def test_files_get_the_umask_modes(tmp_path, umask027, monkeypatch):
    from test_store import onehot, synthetic

    from moeprune.store import PatternStore

    assert io.current_umask() == 0o027
    monkeypatch.setattr(io, "_PROC_STATUS", str(tmp_path / "no-proc"))  # the fallback reads it by setting it
    assert io.current_umask() == 0o027 and os.umask(0o027) == 0o027
    monkeypatch.undo()
    atomic_write_bytes(tmp_path / "f.bin", b"x")
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o640
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
    assert _modes(tmp_path / "d") == {".": 0o750, "a.txt": 0o640, "sub": 0o750}
    prof, pat = synthetic("code", onehot(0))
    prof.save(tmp_path / "profile")
    pat.save(tmp_path / "pattern.json")
    assert set(_modes(tmp_path / "profile").values()) == {0o750, 0o640}
    assert (tmp_path / "pattern.json").stat().st_mode & 0o777 == 0o640
    s = PatternStore(tmp_path / "store")
    s.add("code", prof, pat)
    s.add("code", prof, pat, replace=True)
    modes = _modes(s.path)
    assert {k for k, v in modes.items() if v == 0o750} == {".", "entries"}
    assert set(modes.values()) == {0o750, 0o640}, modes
    os.umask(0o002)  # follows the umask, not a fixed mode
    atomic_write_bytes(tmp_path / "g.bin", b"x")
    assert (tmp_path / "g.bin").stat().st_mode & 0o777 == 0o664


# ============================================================== crash tests (one helper process)
@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("durability")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    env.pop("MOEPRUNE_FAULT_AT", None)
    r = subprocess.run([sys.executable, __file__, "--worker", str(root)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _assert_crash_runs(result: dict, min_points: int, labels: tuple[str, ...]):
    assert "error" not in result, result.get("error")
    runs = result["runs"]
    assert runs[-1]["outcome"] == "completed", runs[-1]
    assert all(r["outcome"] == "crashed" for r in runs[:-1]), [r for r in runs if r["outcome"] not in
                                                                ("crashed", "completed")]
    problems = [f"crash at point {r['n']} ({r.get('label')}): {p}" for r in runs for p in r["problems"]]
    assert not problems, "\n".join(problems)
    assert len(runs) - 1 >= min_points
    seen = " | ".join(r.get("label") or "" for r in runs)
    for label in labels:
        assert label in seen, (label, seen)


STORE_LABELS = {
    "add": ("store.add: tensors written", "store.add: committed", "store.rebuild: index.json written",
            "write c.json: renamed into place", "write c.safetensors: temporary file synced"),
    "replace": ("store.add: replacement tensors written", "store.add: committed", "replacement tensors in place"),
    "remove": ("store.remove: committed", "store.remove: tensors removed", "write index.faiss: folder synced"),
    "rebuild": ("store.rebuild: index.faiss written", "write index.json: temporary file written"),
    "set_options": ("write manifest.json: temporary file written", "write manifest.json: renamed into place"),
    "first_add": ("write manifest.json: renamed into place", "store.add: committed"),
}


@pytest.mark.parametrize("scenario", list(STORE_LABELS))
def test_store_crash_at_every_write_step(report, scenario):
    _assert_crash_runs(report["store"][scenario], 4, STORE_LABELS[scenario])


@pytest.mark.parametrize("scenario", ["new", "replace"])
def test_export_crash_at_every_write_step(report, scenario):
    result = report["export"][scenario]
    _assert_crash_runs(result, 10, ("export: model-00001-of-", "atomic_dir: temporary folder made",
                                    "atomic_dir: renamed into place", "write pattern.json: renamed into place"))
    if scenario == "replace":  # the crash between the two renames really happened, and was undone
        assert any((r["label"] or "").endswith("previous folder moved aside") and r["target"] == "absent"
                   and r["recovered"] == "previous" for r in result["runs"])
    assert result["warned"]  # the next run said what it removed


def test_export_modes_follow_the_umask(report):
    assert "error" not in report["export"], report["export"].get("error")
    modes = report["export"]["modes"]
    assert modes.pop(".") == 0o750 and set(modes.values()) == {0o640}, modes


def test_kill_9_during_adds_loses_nothing(report):
    result = report["kill"]
    assert "error" not in result, result.get("error")
    assert [r["signal"] for r in result["rounds"]] == [signal.SIGKILL, signal.SIGKILL], result
    assert all(r["acked"] >= r["kill_after"] for r in result["rounds"]), result
    assert not result["problems"], "\n".join(result["problems"])


def test_concurrent_writers(report):
    result = report["concurrent"]
    assert "error" not in result, result.get("error")
    assert result["exit_codes"] == [0, 0, 0, 0], result
    assert not result["problems"], "\n".join(result["problems"])


# ============================================================== the helper process
CENTRE = {"a": 0, "b": 1, "c": 2, "next": 7}  # one-hot centre of each synthetic pattern
SHARD = "40KB"  # a few shards for the tiny model (165 kB), so the export has a crash point after each
PROMPTS = ["def f(x):\n    return x * 2", "And God said, Let there be light", "#include <stdlib.h>"]


def _sha(p: Path) -> str | None:
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


def _forked(fn, n: int, timeout: float = 120.0) -> dict:
    """Run fn(ack) in a child that crashes at fault point n; the child's acks come back on a pipe."""
    from moeprune import _faults

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.close(r)
            _faults.arm(n, report_fd=w)
            fn(lambda name: os.write(w, f"ack {name}\n".encode()))
            code = 0
        except BaseException:
            with contextlib.suppress(BaseException):
                os.write(w, ("error " + traceback.format_exc().replace("\n", " | ") + "\n").encode())
        finally:
            os._exit(code)
    os.close(w)
    data, timed_out = _read_until_eof(r, timeout, pid)
    os.close(r)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    res: dict = {"n": n, "acks": [], "label": None, "problems": []}
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("ack "):
            res["acks"].append(line[4:])
        elif line.startswith("moeprune: injected crash"):
            res["label"] = line.split(": ", 2)[2]
        elif line.startswith("error "):
            res["problems"].append(line)
    res["outcome"] = ("timeout" if timed_out else "crashed" if code == _faults.EXIT_CODE
                      else "completed" if code == 0 else f"exit {code}")
    return res


def _read_until_eof(fd: int, timeout: float, pid: int, on_line=None) -> tuple[bytes, bool]:
    """Everything written to the pipe until its writer exits; kills it after `timeout` seconds."""
    data, deadline = b"", time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            return data, True
        if not select.select([fd], [], [], left)[0]:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return data, False
        data += chunk
        if on_line is not None:
            on_line(data)


def _crash_everywhere(root: Path, prepare, op, check, limit: int = 200) -> dict:
    """Run op with a crash at point 1, 2, ... until it completes; check what each crash left."""
    runs = []
    for n in range(1, limit + 1):
        work = root / f"n{n:03d}"
        prepare(work)
        res = _forked(lambda ack, work=work: op(work, ack), n)
        if res["outcome"] in ("crashed", "completed"):
            try:
                res["problems"] += check(work, res)
            except Exception:
                res["problems"].append("check failed: " + traceback.format_exc())
        runs.append(res)
        if res["outcome"] != "crashed":
            break
    return {"runs": runs}


# ---------------------------------------------------------------- store
def _patterns():
    from test_store import onehot, synthetic

    made = {n: synthetic(n, onehot(i), seed=i) for n, i in CENTRE.items()}
    made["b2"] = synthetic("b", onehot(CENTRE["b"]), seed=101)  # b's replacement: same task, another pattern
    assert made["b2"][1].kept != made["b"][1].kept
    return made


def _check_store(path: Path, must: dict, may: dict, centres: dict | None = None) -> list[str]:
    """Problems of the store a crash left: `must` were acknowledged, `may` were being written
    (name -> the patterns' kept experts that are allowed)."""
    from test_store import onehot

    from moeprune.store import PatternStore

    s = PatternStore(path)
    if not s.exists():
        return [f"the store has no manifest, but {sorted(must)} were acknowledged"] if must else []
    problems = []
    names = set(s.names())
    if set(must) - names:
        problems.append(f"acknowledged patterns missing: {sorted(set(must) - names)}")
    if names - set(must) - set(may):
        problems.append(f"entries nobody added: {sorted(names - set(must) - set(may))}")
    entries = {}
    for n in sorted(names):
        try:
            e = s.get(n)
        except Exception as ex:
            problems.append(f"entry {n} is listed but unreadable: {ex}")
            continue
        if e.pattern.kept not in (must.get(n) or may.get(n) or []):
            problems.append(f"entry {n} holds a pattern that was never added: {e.pattern.kept}")
        entries[n] = e
        # a reader without the lock: tensors match the JSON, unless a committed replacement waits for the next writer
        if _sha(s.entries_dir / f"{n}.safetensors") != e.meta["tensors_sha256"] and \
                not (s.entries_dir / f".{n}.safetensors.pending").is_file():
            problems.append(f"entry {n}: its tensors do not match its JSON")
    try:  # search works; a stale index is rebuilt under the writer lock, which also repairs
        if entries:
            for n in entries:
                got = s.search(torch.tensor(onehot(centres[n] if centres else CENTRE.get(n, 0)))).name
                if centres is not None and got != n or got not in names:
                    problems.append(f"a query for {n} found {got}")
        else:
            s.info()
    except Exception as ex:
        problems.append(f"search failed: {ex!r}")
    for n, e in entries.items():
        if _sha(s.entries_dir / f"{n}.safetensors") != e.meta["tensors_sha256"]:
            problems.append(f"entry {n}: its tensors do not match its JSON after a writer ran")
        try:
            s.profile(n)
        except Exception as ex:
            problems.append(f"entry {n}: profile unreadable: {ex}")
    return problems


def _next_writer(path: Path) -> list[str]:
    """The next normal writer carries on and leaves nothing behind."""
    from test_store import onehot, synthetic

    from moeprune.store import PatternStore

    s = PatternStore(path, signature="router")
    try:
        s.add("next", *synthetic("next", onehot(CENTRE["next"]), seed=CENTRE["next"]))
        info = PatternStore(path, auto_rebuild=False).info()
    except Exception as ex:
        return [f"the next writer failed: {ex!r}"]
    problems = []
    if info["index_status"] != "ok" or "next" not in s.names():
        problems.append(f"after the next writer: {info}")
    left = sorted(str(p.relative_to(path)) for p in path.rglob(".*") if p.name != ".lock")
    left += sorted(f"entries/{p.name} (no JSON)" for p in (path / "entries").glob("*.safetensors")
                   if not p.with_suffix(".json").exists())
    if left:
        problems.append(f"the next writer left {left}")
    return problems


def _store_jobs(root: Path) -> dict:
    """One job per store operation: crash it at every write step (templates are made now, once)."""
    from moeprune.store import PatternStore

    pats = _patterns()
    kept = {n: [p.kept] for n, (_, p) in pats.items()}
    templates = {}
    for names in ("ab", "abc"):
        templates[names] = root / f"template-{names}"
        s = PatternStore(templates[names], signature="router")
        for n in names:
            s.add(n, *pats[n])

    def prepare_from(names):
        def prepare(work):
            work.mkdir(parents=True)
            if names:
                shutil.copytree(templates[names], work / "store")
        return prepare

    def add_op(work, ack):
        PatternStore(work / "store", signature="router").add("c", *pats["c"])
        ack("c")

    def replace_op(work, ack):
        PatternStore(work / "store").add("b", *pats["b2"], replace=True)
        ack("b")

    def checker(must, may, extra=None, replaced=None):
        def check(work, res):
            m = dict(must)
            for n in res["acks"]:
                m[n] = [pats[replaced[n]][1].kept] if replaced and n in replaced else kept[n]
            problems = _check_store(work / "store", m, {k: v for k, v in may.items() if k not in m})
            if extra:
                problems += extra(work / "store")
            return problems + _next_writer(work / "store")
        return check

    def options_consistent(path):
        m = json.loads((path / "manifest.json").read_text())
        pair = (m.get("threshold"), m.get("expert_budget"))
        return [] if pair in (("auto", None), (0.3, 0.5)) else [f"the manifest holds {pair}"]

    abc = {n: kept[n] for n in "abc"}
    specs = {
        "add": ("ab", add_op, checker({n: kept[n] for n in "ab"}, {"c": kept["c"]})),
        "replace": ("abc", replace_op,
                    checker({"a": kept["a"], "c": kept["c"], "b": kept["b"] + kept["b2"]}, {}, replaced={"b": "b2"})),
        "remove": ("abc", lambda w, ack: PatternStore(w / "store").remove("b"),
                   checker({"a": kept["a"], "c": kept["c"]}, {"b": kept["b"]})),
        "rebuild": ("abc", lambda w, ack: PatternStore(w / "store").rebuild_index(), checker(abc, {})),
        "set_options": ("ab", lambda w, ack: PatternStore(w / "store").set_options(0.3, 0.5),
                        checker({n: kept[n] for n in "ab"}, {}, extra=options_consistent)),
        "first_add": ("", lambda w, ack: PatternStore(w / "store", signature="router").add("a", *pats["a"]),
                      checker({}, {"a": kept["a"]})),
    }
    return {name: (lambda root=root / name, names=names, op=op, check=check:
                   _crash_everywhere(root, prepare_from(names), op, check))
            for name, (names, op, check) in specs.items()}


# ---------------------------------------------------------------- export
def _tree(folder: Path) -> dict[str, str | None] | None:
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): _sha(p) for p in sorted(folder.rglob("*"))}


def _export_scenarios(root: Path, warnings: list[str]) -> dict:
    from tiny import char_tokenizer, save_tiny

    import moeprune

    src = root / "src"
    full = save_tiny("qwen3_moe", src)
    prof = moeprune.profile(full, PROMPTS, tokenizer=char_tokenizer(), domain="mixed")
    new, previous = prof.select(keep=0.5), prof.select(keep=0.25)
    refs = {k: root / f"ref-{k}" for k in ("new", "previous")}
    export(src, new, refs["new"], max_shard_size=SHARD)
    export(src, previous, refs["previous"], max_shard_size=SHARD)
    want = {k: _tree(p) for k, p in refs.items()}

    def state(target: Path) -> str:
        tree = _tree(target)
        return "absent" if tree is None else next((k for k, t in want.items() if t == tree), "PARTIAL")

    def check(work: Path, res: dict) -> list[str]:
        target, problems = work / "pruned", []
        res["target"] = state(target)
        del warnings[:]
        allowed = {"absent", "new"} if res["scenario"] == "new" else {"absent", "new", "previous"}
        if res["target"] not in allowed:
            problems.append(f"the target holds {res['target']} content")
        # what the next run checks first puts back a folder moved aside: nothing is lost
        check_output_dir(target, force=True)
        res["recovered"] = state(target)
        if res["recovered"] not in allowed - ({"absent"} if res["scenario"] == "replace" else set()):
            problems.append(f"after recovery the target holds {res['recovered']} content")
        export(src, new, target, force=True, max_shard_size=SHARD)  # the next normal run
        if state(target) != "new":
            problems.append("the next export did not write the complete new folder")
        left = sorted(p.name for p in work.iterdir() if p.name != "pruned")
        if left:  # only a folder made a moment before the crash, not yet locked, may wait a minute
            young = res["label"] == "atomic_dir: temporary folder made" and len(left) == 1 and \
                not (work / left[0] / ".moeprune-writer.lock").exists()
            if not young:
                problems.append(f"left behind: {left}")
            t = time.time() - 2 * io.STALE_AGE_S
            for name in left:
                os.utime(work / name, (t, t))
            check_output_dir(target, force=True)
            if any(p.name != "pruned" for p in work.iterdir()):
                problems.append(f"still left behind a minute later: {left}")
        res["warned"] = list(warnings)
        return problems

    out = {}
    for scenario in ("new", "replace"):
        def prepare(work, scenario=scenario):
            work.mkdir(parents=True)
            if scenario == "replace":
                shutil.copytree(refs["previous"], work / "pruned")

        def op(work, ack):
            export(src, new, work / "pruned", force=True, max_shard_size=SHARD)

        def tagged(work, res, scenario=scenario):
            res["scenario"] = scenario
            return check(work, res)

        out[scenario] = _crash_everywhere(root / scenario, prepare, op, tagged)
        out[scenario]["warned"] = [w for r in out[scenario]["runs"] for w in r.get("warned", [])]
    old = os.umask(0o027)
    try:
        export(src, new, root / "modes", max_shard_size=SHARD)
    finally:
        os.umask(old)
    out["modes"] = _modes(root / "modes")
    return out


# ---------------------------------------------------------------- real kill -9, concurrent writers
def _fork(body) -> int:
    """Run `body()` in a child process that ends with os._exit: 0 if it returned, 1 if it raised."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    return pid


def _kill_scenario(root: Path) -> dict:
    from test_store import onehot, synthetic

    from moeprune.store import PatternStore

    path, acked, rounds, problems, may = root / "store", [], [], [], {}
    for round_, kill_after in enumerate((3, 2)):  # killed after its 3rd acknowledgement, then mid-run again
        r, w = os.pipe()

        def writer(r=r, w=w, round_=round_):
            os.close(r)
            s = PatternStore(path, signature="router")
            for i in range(60):
                name = f"w{round_}-{i}"
                s.add(name, *synthetic(name, onehot(i % 8), seed=i))
                os.write(w, f"added {name}\n".encode())

        pid = _fork(writer)
        os.close(w)

        def on_line(data, pid=pid, kill_after=kill_after):
            if data.count(b"\n") >= kill_after:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)  # now: the writer is already inside its next add

        data, timed_out = _read_until_eof(r, 120.0, pid, on_line)
        os.close(r)
        status = os.waitpid(pid, 0)[1]
        seen = [line.split()[1] for line in data.decode().splitlines() if line.startswith("added ")]
        acked += seen
        left = sorted(p.name for p in path.rglob(".*") if p.name != ".lock")  # where the kill landed
        rounds.append({"acked": len(seen), "kill_after": kill_after, "timed_out": timed_out, "left": left,
                       "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None})
        may.update({f"w{round_}-{i}": [synthetic("x", onehot(0), seed=i)[1].kept] for i in range(60)})
        must = {n: may[n] for n in acked}
        problems += [f"round {round_}: {p}" for p in _check_store(path, must, may)]
    problems += _next_writer(path)
    return {"rounds": rounds, "problems": problems}


def _concurrent_scenario(root: Path) -> dict:
    from test_store import onehot, synthetic

    from moeprune.store import PatternStore

    path = root / "store"
    go_r, go_w = os.pipe()  # every writer waits for the same go, so their adds overlap
    pids = []
    for k in range(4):
        def writer(k=k):
            os.close(go_w)
            os.read(go_r, 1)
            s = PatternStore(path, signature="router")
            for j in range(4):
                name = f"p{k}-{j}"
                s.add(name, *synthetic(name, onehot((k + j) % 8), seed=10 * k + j))

        pids.append(_fork(writer))
    os.close(go_r)
    os.close(go_w)
    codes, deadline = [], time.monotonic() + 120
    for pid in pids:
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        codes.append(os.waitstatus_to_exitcode(done[1]))
    must = {f"p{k}-{j}": [synthetic("x", onehot(0), seed=10 * k + j)[1].kept] for k in range(4) for j in range(4)}
    problems = _check_store(path, must, {})
    info = PatternStore(path, auto_rebuild=False).info()
    if info["patterns"] != 16 or info["index_status"] != "ok":
        problems.append(f"store after the writers: {info}")
    return {"exit_codes": codes, "problems": problems}


def _run_jobs(jobs: dict) -> dict:
    """Each job's result, or the error it raised (reported by the test that reads it)."""
    out = {}
    for name, job in jobs.items():
        try:
            out[name] = job()
        except Exception:
            out[name] = {"error": traceback.format_exc()}
    return out


def _in_two_processes(first: dict, second: dict) -> dict:
    """Run the jobs of `second` in a forked process while this one runs `first` (two cores)."""
    r, w = os.pipe()

    def half():
        os.close(r)
        out = {"error": "the jobs did not finish"}
        try:
            out = _run_jobs(second)
        except BaseException:
            out = {"error": traceback.format_exc()}
            raise
        finally:
            with contextlib.suppress(BaseException), os.fdopen(w, "wb") as f:
                f.write(json.dumps(out).encode())

    pid = _fork(half)
    os.close(w)
    results = _run_jobs(first)
    data, timed_out = _read_until_eof(r, 500.0, pid)
    os.close(r)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if timed_out or code != 0:
        raise RuntimeError(f"the second half of the jobs failed (exit {code}): {data.decode()[-3000:]}")
    return {**results, **json.loads(data)}


def _worker(root: Path) -> dict:
    torch.set_num_threads(1)
    # The crashes here end processes, not the machine: the page cache survives them, so fsync changes
    # nothing these tests can observe, and at a few ms per call it would dominate their run time.
    os.fsync = lambda fd: None
    io.STALE_AGE_S = 3600.0  # a folder made just before a crash stays "young" however slow this machine is
    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    logging.getLogger(LOG).addHandler(Collect(logging.WARNING))
    logging.getLogger(LOG).propagate = False
    t0 = time.monotonic()
    store = _store_jobs(root / "store")
    first = {f"store.{k}": store[k] for k in ("add", "replace", "first_add")}
    second = {**{f"store.{k}": store[k] for k in ("remove", "rebuild", "set_options")},
              "export": lambda: _export_scenarios(root / "export", warnings),
              "kill": lambda: _kill_scenario(root / "kill"),
              "concurrent": lambda: _concurrent_scenario(root / "concurrent")}
    done = _in_two_processes(first, second)
    report = {"store": {k.split(".", 1)[1]: v for k, v in done.items() if k.startswith("store.")},
              **{k: v for k, v in done.items() if not k.startswith("store.")}}
    report["seconds"] = round(time.monotonic() - t0, 1)
    return report


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    sys.path.insert(0, str(HERE))
    print(json.dumps(_worker(Path(sys.argv[2]))))
