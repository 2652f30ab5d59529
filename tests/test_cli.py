"""The command line on saved tiny checkpoints: profile, inspect, plot, and one-line errors."""

import subprocess
import sys

import pytest
from tiny import save_tiny

from moeprune.cli import main


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    save_tiny(request.param, folder)
    return folder


@pytest.fixture
def prompt_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("int main(void) { return 0; }\n#define MAX(a, b) ((a) > (b) ? (a) : (b))\nstruct list *next;\n")
    return f


def test_profile_inspect_plot(checkpoint, prompt_file, tmp_path, capsys):
    out = tmp_path / "prof"
    assert main(["profile", str(checkpoint), "--prompts", str(prompt_file), "--domain", "c", "-o", str(out),
                 "--batch-size", "2", "-q"]) == 0
    assert (out / "profile.json").is_file() and (out / "profile.safetensors").is_file()
    assert "profiled 3 prompts" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "domain        c" in text and "effective experts" in text and "easy_ep" in text
    png = tmp_path / "heat.png"
    assert main(["plot", str(out), "-o", str(png), "--criterion", "reap"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an existing profile is not overwritten without --force
    assert main(["profile", str(checkpoint), "--prompts", str(prompt_file), "--domain", "c", "-o", str(out),
                 "-q"]) == 2
    assert "--force" in capsys.readouterr().err


def _one_line(capfd) -> str:
    err = capfd.readouterr().err  # file-descriptor level: warnings from any library would show here too
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moeprune") and "error:" in lines[0], err
    return lines[0]


def test_errors_are_one_line(tmp_path, prompt_file, capfd):
    cases = [
        ["profile", str(tmp_path / "missing"), "--prompts", str(prompt_file), "--domain", "x", "-o", str(tmp_path / "o")],
        ["inspect", str(tmp_path / "missing")],
        ["plot", str(tmp_path), "-o", str(tmp_path / "x.png")],
        ["store", "list", str(tmp_path / "nowhere")],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        _one_line(capfd)
    for argv in (["select"], ["store", "info"], ["eval", "m", "--data", "d", "--window", "abc"]):
        with pytest.raises(SystemExit) as e:  # a usage error is one line too
            main(argv)
        assert e.value.code == 2
        _one_line(capfd)
    # the installed entry point behaves the same in a real process
    r = subprocess.run([sys.executable, "-m", "moeprune.cli", "inspect", str(tmp_path / "missing")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not found" in r.stderr, r.stderr


def test_bad_criterion(checkpoint, prompt_file, tmp_path, capsys):
    out = tmp_path / "prof"
    assert main(["profile", str(checkpoint), "--prompts", str(prompt_file), "--domain", "c", "-o", str(out),
                 "-q"]) == 0
    assert main(["plot", str(out), "-o", str(tmp_path / "x.png"), "--criterion", "magic"]) == 2
    assert "unknown criterion" in capsys.readouterr().err
