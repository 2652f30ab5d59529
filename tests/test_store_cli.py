"""`moeprune store ...` on a saved tiny checkpoint: every verb, and one-line errors."""

import pytest
from tiny import save_tiny

from moeprune.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("storecli")
    save_tiny("qwen3_moe", root / "model")
    for domain, lines in {"code": ["def f(x): return x", "import os", "class A: pass", "for i in range(3): pass"],
                          "prose": ["The cat sat on the mat.", "It was a dark night.", "She smiled.", "Rain fell."]
                          }.items():
        f = root / f"{domain}.txt"
        f.write_text("\n".join(lines) + "\n")
        assert main(["profile", str(root / "model"), "--prompts", str(f), "--domain", domain,
                     "-o", str(root / domain), "-q"]) == 0
    return root


def test_store_verbs(setup, capsys):
    store = str(setup / "store")
    for d in ("code", "prose"):
        assert main(["store", "add", store, "--profile", str(setup / d), "--keep", "0.5",
                     "--model", str(setup / "model")]) == 0
    assert "added 'prose'" in capsys.readouterr().out
    assert main(["store", "add", store, "--profile", str(setup / "code"), "--keep", "0.5"]) == 2
    assert "already in store" in capsys.readouterr().err
    assert main(["store", "add", store, "--profile", str(setup / "code"), "--keep", "0.5", "--replace",
                 "--tag", "team=infra"]) == 0
    assert main(["store", "list", store]) == 0
    out = capsys.readouterr().out
    assert "code" in out and "prose" in out
    assert main(["store", "show", store, "code"]) == 0
    assert "team" in capsys.readouterr().out
    assert main(["store", "info", store]) == 0
    out = capsys.readouterr().out
    assert "index_status" in out and "flat" in out and "patterns         2" in out
    assert main(["store", "search", store, "import sys"]) == 0
    out = capsys.readouterr().out
    assert "match" in out and "fell back" in out and "confidence" in out
    assert main(["store", "rebuild", store]) == 0
    assert "rebuilt the flat index" in capsys.readouterr().out
    assert main(["store", "remove", store, "prose"]) == 0
    assert main(["store", "show", store, "prose"]) == 2
    assert "no pattern named 'prose'" in capsys.readouterr().err
    assert main(["store", "search", store, "  "]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["store", "add", store, "--profile", str(setup / "code"), "--keep", "0.5", "--name", "../x"]) == 2
    assert "invalid pattern name" in capsys.readouterr().err
    assert main(["store", "info", str(setup / "nowhere")]) == 2
    assert "no pattern store" in capsys.readouterr().err
