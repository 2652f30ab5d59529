"""The demo-model training script: resumable, reproducible, never overwrites an installed model."""

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_demo_moe.py"
SMALL = ["--steps", "6", "--checkpoint-every", "2", "--hidden", "32", "--experts", "4", "--top-k", "2",
         "--expert-size", "16", "--vocab", "400", "--tok-sample-chars", "20000", "--max-train-chars", "30000",
         "--batch", "4", "--seq", "64"]


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_resume_reproduces_an_uninterrupted_run(tmp_path, shared_corpora):
    straight = run("--out", str(tmp_path / "a"), "--corpora", str(shared_corpora), *SMALL)
    assert straight.returncode == 0, straight.stderr[-2000:]
    first = run("--out", str(tmp_path / "b"), "--corpora", str(shared_corpora), *SMALL, "--stop-after", "3")
    assert first.returncode == 0 and "stopping after 3" in first.stdout
    resumed = run("--out", str(tmp_path / "b"), "--corpora", str(shared_corpora), *SMALL,
                  "--install", str(tmp_path / "inst"))
    assert resumed.returncode == 0 and "resuming at step 2" in resumed.stdout, resumed.stderr[-2000:]
    a = load_file(str(tmp_path / "a" / "ckpt" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "ckpt" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert (tmp_path / "inst" / "model.safetensors").is_file() and (tmp_path / "inst" / "README.md").is_file()

    again = run("--out", str(tmp_path / "b"), "--corpora", str(shared_corpora), *SMALL,
                "--install", str(tmp_path / "inst"))
    assert again.returncode != 0 and "--force" in again.stderr
    other = run("--out", str(tmp_path / "b"), "--corpora", str(shared_corpora), *SMALL, "--lr", "0.01")
    assert other.returncode != 0 and "other settings" in other.stderr


def test_missing_corpora(tmp_path):
    r = run("--out", str(tmp_path / "x"), "--corpora", str(tmp_path / "none"), *SMALL)
    assert r.returncode != 0 and "corpora not found" in r.stderr
    pytest.importorskip("tokenizers")
