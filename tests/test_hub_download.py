"""Hub downloads fetch only what moeprune reads: root config/tokenizer files and the index's shards.

No network: `huggingface_hub.model_info` and `snapshot_download` are replaced by fakes serving a
fake repo listing and recording every file they hand out.
"""

from __future__ import annotations

import json
from fnmatch import fnmatchcase
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest

import moeprune.models as models
from moeprune.checkpoint import model_folder
from moeprune.errors import MoepruneError

SHA = "0123456789abcdef0123456789abcdef01234567"


def _index(*shards: str) -> str:
    return json.dumps({"metadata": {}, "weight_map": {f"t{i}": s for i, s in enumerate(shards)}})


class FakeHub:
    """A fake hub repo: a file listing, served one snapshot folder, every fetched name recorded."""

    def __init__(self, root: Path, files: dict[str, str]):
        self.files, self.folder = files, root / "snapshots" / SHA
        self.fetched: list[str] = []
        self.calls = 0

    def model_info(self, repo_id: str, **kw) -> SimpleNamespace:
        return SimpleNamespace(sha=SHA, siblings=[SimpleNamespace(rfilename=f) for f in self.files])

    def snapshot_download(self, repo_id: str, *, allow_patterns=None, **kw) -> str:
        self.calls += 1
        assert allow_patterns is not None, "a whole-repo download"
        for name, text in self.files.items():
            if any(fnmatchcase(name, p) for p in allow_patterns):
                self.fetched.append(name)
                (self.folder / name).parent.mkdir(parents=True, exist_ok=True)
                (self.folder / name).write_text(text)
        return str(self.folder)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """Install a FakeHub for a repo listing; the hub counts as reachable and the repo as uncached."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_cache", lambda repo: None)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: True)

    def install(files: dict[str, str]) -> FakeHub:
        fake = FakeHub(tmp_path / "cache", files)
        monkeypatch.setattr(huggingface_hub, "model_info", fake.model_info)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
        return fake

    return install


TOKENIZER = {"tokenizer.json": "{}", "tokenizer_config.json": "{}", "special_tokens_map.json": "{}"}


def test_gpt_oss_layout_skips_original_and_metal(hub):
    shards = ["model-00000-of-00001.safetensors", "model-00001-of-00001.safetensors"]
    fake = hub({
        "config.json": "{}", "generation_config.json": "{}", "chat_template.jinja": "x", **TOKENIZER,
        "model.safetensors.index.json": _index(*shards), **{s: "w" for s in shards},
        "original/config.json": "{}", "original/dtypes.json": "{}", "original/model.safetensors": "big",
        "metal/model.bin": "big", "README.md": "r", "LICENSE": "l", ".gitattributes": "",
    })
    folder = model_folder("openai/gpt-oss-20b")
    assert folder == str(fake.folder)
    assert sorted(fake.fetched) == sorted(["config.json", "generation_config.json", "chat_template.jinja", *TOKENIZER,
                                           "model.safetensors.index.json", *shards])
    assert fake.fetched[-1] == "config.json"  # last: a cached snapshot with config.json counts as complete
    assert not (fake.folder / "original").exists() and not (fake.folder / "metal").exists()


def test_mixtral_8x22b_layout_skips_consolidated_and_other_formats(hub):
    named = [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    fake = hub({
        "config.json": "{}", "generation_config.json": "{}", "tokenizer.model": "m", **TOKENIZER,
        "model.safetensors.index.json": _index(*named, named[0]), **{s: "w" for s in named},
        "model-00004-of-00003.safetensors": "stray shard the index does not name",
        "consolidated.safetensors": "281 GB", "pytorch_model.bin": "b", "model.pth": "p", "model.gguf": "g",
    })
    model_folder("mistral-community/Mixtral-8x22B-v0.1")
    assert sorted(fake.fetched) == sorted(["config.json", "generation_config.json", "tokenizer.model", *TOKENIZER,
                                           "model.safetensors.index.json", *named])


def test_single_file_checkpoint_and_quant_side_file(hub):
    fake = hub({"config.json": "{}", "hf_quant_config.json": "{}", "model.safetensors": "w",
                "original/model.safetensors": "big", "consolidated.safetensors": "big"})
    model_folder("org/small")
    assert sorted(fake.fetched) == ["config.json", "hf_quant_config.json", "model.safetensors"]


def test_repo_without_safetensors_weights_gets_one_line_error(hub):
    fake = hub({"config.json": "{}", "pytorch_model.bin": "b", "original/model.safetensors": "w", "README.md": "r"})
    with pytest.raises(MoepruneError) as e:
        model_folder("org/bin-only")
    msg = str(e.value)
    assert "\n" not in msg
    assert "neither model.safetensors.index.json nor model.safetensors" in msg and "pytorch_model.bin" in msg
    assert fake.calls == 0  # refused from the listing, before any download


def test_repo_without_config_and_index_naming_missing_shard(hub):
    hub({"model.safetensors": "w"})
    with pytest.raises(MoepruneError, match="no config.json"):
        model_folder("org/no-config")
    fake = hub({"config.json": "{}", "model.safetensors.index.json": _index("model-1.safetensors", "gone.safetensors"),
                "model-1.safetensors": "w"})
    with pytest.raises(MoepruneError, match="names shards the repo lacks: gone.safetensors"):
        model_folder("org/broken-index")
    assert "config.json" not in fake.fetched  # an unusable download is never marked complete


def test_hub_failure_is_one_clear_error(hub, monkeypatch):
    hub({"config.json": "{}", "model.safetensors": "w"})

    def refuse(repo_id, **kw):
        raise OSError("401 gated repo")

    monkeypatch.setattr(huggingface_hub, "model_info", refuse)
    with pytest.raises(MoepruneError, match="hub download failed for org/gated: 401 gated repo"):
        model_folder("org/gated")


def test_local_folders_and_offline_mode_never_touch_the_hub(tmp_path, hub, monkeypatch):
    fake = hub({"config.json": "{}", "model.safetensors": "w"})
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "config.json").write_text("{}")
    assert model_folder(tmp_path / "local") == str(tmp_path / "local")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MoepruneError, match="not in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        model_folder("org/uncached")
    cached = tmp_path / "cached"
    cached.mkdir()
    monkeypatch.setattr(models, "_hub_cache", lambda repo: str(cached))
    assert model_folder("org/cached") == str(cached)  # a cached copy is used as is
    assert fake.calls == 0 and fake.fetched == []


def test_partial_cached_snapshot_is_found_offline(tmp_path, monkeypatch):
    """A snapshot holding only what moeprune downloaded counts as cached (huggingface_hub calls it incomplete)."""
    from huggingface_hub import _snapshot_download as hub_snapshot
    from huggingface_hub import constants

    if not hasattr(hub_snapshot, "write_tree_cache"):
        pytest.skip("this huggingface_hub keeps no tree listing, so no snapshot is ever called incomplete")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    storage, sha = tmp_path / "models--org--m", "a" * 40
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(sha)
    snap = storage / "snapshots" / sha
    snap.mkdir(parents=True)
    repo = ["config.json", "model.safetensors.index.json", "a.safetensors", "b.safetensors",
            "original/model.safetensors", "README.md"]
    entry = hub_snapshot.TreeCacheEntry(size=1, blob_id="b" * 40)
    hub_snapshot.write_tree_cache(str(storage), sha, {f: entry for f in repo})
    for f in ["config.json", "a.safetensors"]:
        (snap / f).write_text("x")
    (snap / "model.safetensors.index.json").write_text(_index("a.safetensors", "b.safetensors"))
    with pytest.raises(MoepruneError, match="not in the local Hugging Face cache"):  # shard b missing
        models.check_model_path("org/m")
    (snap / "b.safetensors").write_text("x")
    assert models.check_model_path("org/m") == str(snap)
