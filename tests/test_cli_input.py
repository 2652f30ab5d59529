"""Bad command-line input: one line naming the flag and the problem, exit 2, found before long work."""

import json

import pytest
from tiny import save_tiny

import moeprune.profiler
from moeprune.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny("qwen3_moe", root / "model")
    prompts = root / "prompts.txt"
    prompts.write_text("def f(x): return x\nimport os\nclass A: pass\n")
    assert main(["profile", str(root / "model"), "--prompts", str(prompts), "--domain", "code",
                 "-o", str(root / "prof"), "-q"]) == 0
    data = root / "eval.jsonl"
    data.write_text(json.dumps({"text": "def g(y):\n    return y * 2\n" * 4}) + "\n")
    assert main(["store", "add", str(root / "store"), "--profile", str(root / "prof"), "--keep", "0.5",
                 "--model", str(root / "model")]) == 0
    assert main(["select", str(root / "prof"), "--keep", "0.5", "-o", str(root / "pattern.json")]) == 0
    return root


def _error(capfd, argv) -> str:
    capfd.readouterr()
    assert main(argv) == 2, argv
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moeprune: error:"), err
    return lines[0]


def test_flag_values(setup, capfd):
    r = setup
    m, prof, store, data = str(r / "model"), str(r / "prof"), str(r / "store"), str(r / "eval.jsonl")
    cases = [
        (["store", "search", store, "import sys", "--threshold", "abc"], "--threshold must be"),
        (["store", "search", store, "import sys", "--threshold", "1.5"], "--threshold must be"),
        (["store", "search", store, "import sys", "--k", "0"], "--k must be at least 1"),
        (["eval", m, "--data", data, "--stride", "0"], "stride must be >= 1"),
        (["eval", m, "--data", data, "--max-tokens", "0"], "max_tokens must be >= 1"),
        (["eval", m, "--data", data, "--batch-size", "0"], "batch_size must be >= 1"),
        (["eval", m, "--data", data, "--window", "4096"], "window 4096 is beyond the model's context of 128"),
        (["profile", m, "--prompts", str(r / "prompts.txt"), "--domain", "c", "-o", str(r / "p2"),
          "--max-length", "4096"], "max_length 4096 is beyond the model's context of 128"),
        (["profile", m, "--prompts", str(r), "--domain", "c", "-o", str(r / "p3")], "is a folder"),
        (["export", m, "--pattern", str(r / "pattern.json"), "-o", str(r / "e"), "--max-shard-size", "0"],
         "--max-shard-size"),
        (["serve", m, "--store", store, "--expert-budget", "abc"], "--expert-budget must be"),
        (["select", prof, "--keep", "1", "-o", str(r / "one.json")], "--keep=1 is ambiguous"),
        (["select", prof, "--keep", "abc", "-o", str(r / "abc.json")], "--keep must be"),
        (["store", "add", store, "--profile", prof, "--keep", "0.5", "--tag", "novalue", "--name", "t"],
         "--tag must be KEY=VALUE"),
        (["demo", "--keep", "2.5"], "--keep fraction 2.5 is out of range"),
    ]
    for argv, message in cases:
        assert message in _error(capfd, argv), argv
    assert not (r / "e").exists() and not (r / "one.json").exists() and not (r / "p2").exists()


def test_outputs_are_checked_before_long_work(setup, capfd, monkeypatch, tmp_path):
    r = setup
    monkeypatch.setattr(moeprune.profiler, "profile", lambda *a, **k: pytest.fail("profiling started"))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    m, prompts = str(r / "model"), str(r / "prompts.txt")
    base = ["profile", m, "--prompts", prompts, "--domain", "c"]
    assert "is a file, not a folder" in _error(capfd, [*base, "-o", str(blocker / "prof")])
    assert "exists and is a file" in _error(capfd, [*base, "-o", str(blocker)])
    assert "not empty" in _error(capfd, [*base, "-o", str(r / "prof")])
    assert "must differ from it" in _error(capfd, [*base, "-o", str(r / "model"), "--force"])
    assert "already exists" in _error(capfd, ["select", str(r / "prof"), "--keep", "0.5", "-o", str(r / "pattern.json")])
    assert "is a folder" in _error(capfd, ["plot", str(r / "prof"), "-o", str(tmp_path)])
    assert "inside" in _error(capfd, ["export", m, "--pattern", str(r / "pattern.json"), "-o", str(r / "model" / "sub"),
                                      "--force"])
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "criteria.md").write_text("an earlier report")
    assert "already holds a criteria report" in _error(capfd, ["bench-criteria", "-o", str(tmp_path / "report")])
    assert "is a file" in _error(capfd, ["bench-criteria", "-o", str(blocker)])
    assert "not empty" in _error(capfd, ["demo", "-o", str(r / "prof")])
    assert (r / "prof" / "profile.json").is_file() and (r / "model" / "config.json").is_file()


def test_debug_shows_the_root_cause(setup, capfd, monkeypatch, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    argv = ["inspect", str(bad)]
    assert "not valid JSON" in _error(capfd, argv)
    monkeypatch.setenv("MOEPRUNE_DEBUG", "1")
    assert main(argv) == 2
    err = capfd.readouterr().err
    assert "Traceback" in err and "json.decoder.JSONDecodeError" in err and "not valid JSON" in err


def test_progress_bar_unless_quiet(setup, capfd):
    r = setup
    argv = ["eval", str(r / "model"), "--data", str(r / "eval.jsonl")]
    assert main([*argv, "-q"]) == 0
    assert "layers" not in capfd.readouterr().err
    assert main(argv) == 0
    err = capfd.readouterr().err
    assert "layers" in err and "Loading weights" not in err  # moeprune streams it; transformers loads nothing
