"""Benchmark records: every benchmark logs through benchmarks/_record.py, and the recorder works.

No benchmark runs here: the recorder is exercised on a tiny fake benchmark, in this process.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
NOT_RECORDED = {"_record.py", "train_demo_moe.py"}  # the helper; training, not measuring


def _load_record():
    spec = importlib.util.spec_from_file_location("_record", BENCH / "_record.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_record = _load_record()


def _uses_recorder(path: Path) -> bool:
    """The script imports `record` from `_record` and opens a `with record(...)` block."""
    tree = ast.parse(path.read_text())
    imports = any(isinstance(n, ast.ImportFrom) and n.module == "_record" and any(a.name == "record" for a in n.names)
                  for n in ast.walk(tree))
    opens = any(isinstance(n, ast.With) and any(isinstance(i.context_expr, ast.Call)
                                                and getattr(i.context_expr.func, "id", None) == "record"
                                                for i in n.items)
                for n in ast.walk(tree))
    return imports and opens


@pytest.mark.parametrize("name", sorted(p.name for p in BENCH.glob("*.py") if p.name not in NOT_RECORDED))
def test_benchmark_uses_recorder(name):
    assert _uses_recorder(BENCH / name), f"benchmarks/{name} does not record its output with _record.record"


def test_recorder_modules_listed():
    # The exemptions must name real files, or the list above silently exempts nothing.
    assert all((BENCH / n).is_file() for n in NOT_RECORDED)


def _fake_benchmark(mode: str = "ok") -> None:
    print("fake stdout line")
    print("fake stderr line", file=sys.stderr)
    subprocess.run([sys.executable, "-c", "print('child stdout line')"], check=True)
    if mode == "crash":
        raise ValueError("fake failure")
    if mode == "exit":
        sys.exit(3)


def test_header_and_tee(tmp_path, capfd):
    with _record.record("fake", tmp_path) as path:
        _fake_benchmark()
    assert path is not None and path.parent == tmp_path
    assert path.name.startswith("fake-") and path.suffix == ".txt"
    text = path.read_text()
    head = text.split("\n\n", 1)[0]
    for field in ("# benchmark: fake", "# command:", "# date:", " UTC", "# machine:", " cores", "RAM",
                  "CPU", "GPU", "# os:", "# versions:", "python ", "torch ", "transformers ", "moeprune ",
                  "# git:"):
        assert field in head, field
    assert ("clean" in head) or ("dirty" in head) or ("unknown" in head)
    body = text[len(head):]
    for line in ("fake stdout line", "fake stderr line", "child stdout line"):
        assert line in body
    assert body.index("fake stdout line") < body.index("fake stderr line") < body.index("child stdout line")
    assert "# outcome:  ok" in text and "# elapsed:" in text
    out = capfd.readouterr()
    assert "fake stdout line" in out.out and "child stdout line" in out.out  # still reaches the terminal
    assert f"log: {path}" in out.err


def test_crash_leaves_log_with_traceback(tmp_path):
    with pytest.raises(ValueError, match="fake failure"), _record.record("fake", tmp_path):
        _fake_benchmark("crash")
    (path,) = tmp_path.glob("fake-*.txt")
    text = path.read_text()
    assert "fake stdout line" in text and "child stdout line" in text
    assert "Traceback (most recent call last)" in text and "ValueError: fake failure" in text
    assert "# outcome:  FAILED: ValueError: fake failure" in text
    print("after the recording")  # stdout is restored: nothing more goes to the log
    assert "after the recording" not in path.read_text()


def test_exit_status_recorded(tmp_path):
    with pytest.raises(SystemExit), _record.record("fake", tmp_path):
        _fake_benchmark("exit")
    (path,) = tmp_path.glob("fake-*.txt")
    assert "# outcome:  exit status 3" in path.read_text()


def test_disabled(tmp_path, monkeypatch):
    with _record.record("fake", tmp_path, enabled=False) as path:
        print("not recorded")
    assert path is None
    monkeypatch.setenv("MOEPRUNE_NO_RECORD", "1")
    with _record.record("fake", tmp_path) as path:
        print("not recorded")
    assert path is None and not list(tmp_path.iterdir())


def test_results_env_and_two_logs_in_one_second(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPRUNE_RESULTS", str(tmp_path / "env"))
    paths = []
    for _ in range(2):
        with _record.record("fake") as path:
            print("x")
        paths.append(path)
    assert paths[0] != paths[1] and all(p.parent == tmp_path / "env" for p in paths)


def test_header_does_not_import_torch():
    # slim_load.py's parent records and must stay free of torch (children inherit its peak RSS).
    code = (f"import sys; sys.path.insert(0, {str(BENCH)!r}); import _record; _record.header('x'); "
            "assert 'torch' not in sys.modules and 'moeprune' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
