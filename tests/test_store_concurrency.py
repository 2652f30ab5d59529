"""Searches stay right while another process changes the store: every search reads one snapshot.

A second process (this file run with `--churn`) adds and removes decoy patterns and rebuilds the
index for a few seconds, while threads of this process search for the three stable patterns with
signature vectors (no model needed) and look up pinned patterns. Every decoy's name sorts before
the stable ones, so each add or remove moves the stable patterns' rows in the index: a search that
mixed an index with the metadata of another moment would name the wrong pattern or fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from test_store import onehot, synthetic

from moeprune.store import PatternStore

HERE = Path(__file__).resolve().parent
STABLE = {"code": 0, "bible": 1, "legal": 2}  # name -> one-hot centre of its demonstrations
DECOYS = {f"a{i}": 3 + i for i in range(5)}  # added and removed all the time, far from every stable centre
CHURN_S = 3.0
THREADS = 4


def _decoy(name: str):
    return synthetic(name, onehot(DECOYS[name]), seed=10 + DECOYS[name])


def _churn(path: Path, seconds: float) -> int:
    """The other process: add/remove decoys (some adds leave the index stale), rebuild now and then."""
    # This process is never killed mid-write, so fsync guards against nothing here; without it the
    # store changes several times as often in the same few seconds.
    os.fsync = lambda fd: None
    made = {n: _decoy(n) for n in DECOYS}
    names = sorted(DECOYS)
    s = PatternStore(path)
    print("ready", flush=True)
    end, i = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        name = names[i % len(names)]
        if name in s:
            s.remove(name)
        else:
            s.add(name, *made[name], rebuild=i % 4 != 1)  # a stale index: readers rebuild it themselves
        if i % 5 == 4:
            s.rebuild_index()
        i += 1
    return i


def test_searches_see_one_consistent_store_while_another_process_writes(tmp_path):
    path = tmp_path / "store"
    writer = PatternStore(path, signature="router")
    for name, c in STABLE.items():
        writer.add(name, *synthetic(name, onehot(c), seed=c))
    want = {n: writer.get(n).pattern.kept for n in STABLE}
    decoy_kept = {n: _decoy(n)[1].kept for n in DECOYS}
    kept_of = {**want, **decoy_kept}
    queries = [torch.tensor(onehot(c)) for c in (*STABLE.values(), *DECOYS.values())]
    reader = PatternStore(path)  # one store object shared by every thread, as a server holds it
    assert [m.name for m in reader.search_many(queries)][:len(STABLE)] == list(STABLE)

    # the other process imports the moeprune of this checkout, whatever an installed one points to
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])]))
    log = tmp_path / "churn.log"  # a file, not a pipe: nobody reads stderr while the threads search
    with open(log, "w") as err:
        child = subprocess.Popen([sys.executable, __file__, "--churn", str(path), str(CHURN_S)],
                                 stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    watchdog = threading.Timer(CHURN_S + 120, child.kill)  # a hung child fails the test instead of hanging it
    watchdog.start()
    try:
        assert child.stdout.readline().strip() == "ready", (child.wait(), log.read_text()[-3000:])
        errors: list[str] = []
        wrong: list[str] = []
        searches = [0] * THREADS
        stop = threading.Event()

        def work(t: int) -> None:
            while not stop.is_set():
                try:
                    got = reader.search_many(queries)
                    for m, (name, kept) in zip(got[:len(STABLE)], want.items(), strict=False):
                        if m.name != name or m.fell_back or m.pattern.kept != kept:
                            wrong.append(f"a query for {name} found {m.name} ({m.reason})")
                    for m, name in zip(got[len(STABLE):], DECOYS, strict=True):  # the decoy, or a fallback
                        if not m.fell_back and m.name != name or \
                                m.name is not None and m.pattern.kept != kept_of[m.name]:
                            wrong.append(f"a query for decoy {name} found {m.name} ({m.reason})")
                    for name in (*STABLE, *DECOYS):
                        p = reader.find(name)
                        if name in STABLE and (p is None or p.kept != want[name]):
                            wrong.append(f"find({name!r}) gave {p and p.kept}")
                        if name in DECOYS and p is not None and p.kept != decoy_kept[name]:
                            wrong.append(f"find({name!r}) gave another pattern: {p.kept}")
                except Exception as e:
                    errors.append(f"{type(e).__name__}: {e}")
                searches[t] += 1

        threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
        for t in threads:
            t.start()
        try:
            done = child.stdout.readline()  # the number of changes, once the churn is over
        finally:
            stop.set()
            for t in threads:
                t.join()
        child.wait()
    finally:
        watchdog.cancel()
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0 and done.strip().isdigit(), log.read_text()[-3000:]
    changes = int(done)
    assert changes >= 10, f"the other process changed the store only {changes} times"
    rounds = sum(searches)
    assert rounds >= 50, searches
    assert not errors and not wrong, (f"{len(errors)} failed and {len(wrong)} wrong of {rounds} rounds over "
                                      f"{changes} changes: {sorted(set(errors))[:3]} {sorted(set(wrong))[:3]}")


if __name__ == "__main__" and sys.argv[1:2] == ["--churn"]:  # run as a script, tests/ is on sys.path
    print(_churn(Path(sys.argv[2]), float(sys.argv[3])), flush=True)
    sys.stderr.flush()
    os._exit(0)  # torch's teardown takes seconds on a busy machine, and tests nothing
