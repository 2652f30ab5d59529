"""export: a standard checkpoint that vanilla transformers loads in a fresh process and that equals load_slim."""

import json
import subprocess
import sys

import pytest
import torch
from tiny import FAMILIES, char_tokenizer, save_tiny

import moeprune
from moeprune import MoepruneError, Pattern, export, load_slim
from moeprune.cli import main

PROMPTS = ["def f(x):\n    return x * 2", "And God said, Let there be light", "#include <stdlib.h>"]
IDS = [[5, 17, 33, 60, 72, 9, 41, 88, 23, 14, 67, 30]]

# Runs in a fresh interpreter that never imports moeprune: vanilla transformers only.
CHILD = r"""
import io, json, logging, sys, torch
import transformers
from transformers import AutoModelForCausalLM
stream = io.StringIO()
transformers.utils.logging.add_handler(logging.StreamHandler(stream))
out = {}
for folder in sys.argv[2:]:
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor(json.loads(sys.argv[1]))).logits
    out[folder] = {"info": {k: list(v) for k, v in info.items()}, "logits": logits.tolist()}
out["moeprune_imported"] = "moeprune" in sys.modules
out["log"] = stream.getvalue()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tok = char_tokenizer()
    result = {}
    for model_type in FAMILIES:
        src = tmp_path_factory.mktemp(f"src-{model_type}")
        full = save_tiny(model_type, src)
        pattern = moeprune.profile(full, PROMPTS, tokenizer=tok, domain="mixed").select(keep=0.5)
        out = tmp_path_factory.mktemp(f"out-{model_type}") / "pruned"
        export(src, pattern, out, max_shard_size="50KB")
        result[model_type] = (src, out, pattern)
    return result


@pytest.fixture(scope="module")
def vanilla(exported):
    folders = [str(out) for _, out, _ in exported.values()]
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(IDS), *folders], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def test_vanilla_loads_without_warnings(vanilla):
    out, stderr = vanilla
    assert out["moeprune_imported"] is False
    log = out["log"] + stderr
    # transformers' load report marks problems MISSING / UNEXPECTED / MISMATCH; older wording is below
    for phrase in ("MISSING", "UNEXPECTED", "MISMATCH", "newly initialized", "were not used", "missing keys"):
        assert phrase not in log, log
    for key, value in out.items():
        if key.startswith("/"):
            assert value["info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [],
                                     "error_msgs": []}


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_export_equals_load_slim(model_type, exported, vanilla):
    src, out, pattern = exported[model_type]
    slim = load_slim(src, pattern)
    with torch.no_grad():
        want = slim(torch.tensor(IDS)).logits
    got = torch.tensor(vanilla[0][str(out)]["logits"])
    assert (want - got).abs().max().item() <= 1e-5
    files = {f.name for f in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "README.md", "pattern.json", "tokenizer.json",
            "generation_config.json"} <= files
    assert not any(name.startswith(".") for name in files)
    config = json.loads((out / "config.json").read_text())
    adapter = moeprune.get_adapter(slim)
    assert adapter.num_experts(slim.config) == 4
    assert config["num_experts_per_tok"] == 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    if adapter.ckpt_expert_projs:  # hub per-expert layout, experts renumbered 0..3
        layer = next(iter(pattern.kept))
        names = [k for k in index["weight_map"] if f"layers.{layer}." in k and ".experts." in k]
        assert sorted({int(k.split(".experts.")[1].split(".")[0]) for k in names}) == [0, 1, 2, 3]
    card = (out / "README.md").read_text()
    assert "mixed" in card and ", ".join(map(str, pattern.kept[layer if adapter.ckpt_expert_projs
                                                                else next(iter(pattern.kept))])) in card
    assert Pattern.load(out / "pattern.json").kept == pattern.kept


def test_export_refusals(tmp_path, exported):
    src, out, pattern = exported["mixtral"]
    with pytest.raises(MoepruneError, match="not empty"):
        export(src, pattern, out)
    before = sorted(p.name for p in out.iterdir())
    export(src, pattern, out, force=True, max_shard_size="50KB")
    assert sorted(p.name for p in out.iterdir()) == before
    non_uniform = Pattern({0: [0, 1], 1: [0, 1, 2, 3, 4, 5], 2: [0, 1, 2, 3]}, dict(pattern.meta))
    with pytest.raises(MoepruneError, match="strategy='uniform'"):
        export(src, non_uniform, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    foreign = Pattern(pattern.kept, dict(pattern.meta, fingerprint="sha256:someoneelse"))
    with pytest.raises(MoepruneError, match="another model"):
        export(src, foreign, tmp_path / "y")
    with pytest.raises(MoepruneError, match="must differ"):
        export(src, pattern, src, force=True)


def test_export_from_fused_experts_reads_each_row_once(tmp_path, monkeypatch):
    """A checkpoint with experts fused on disk exports to hub per-expert keys (gate and up split from
    one read of each kept row) and equals load_slim of the source."""
    from safetensors.torch import save_file

    from moeprune.reader import CheckpointReader

    full = save_tiny("qwen3_moe", tmp_path / "tiny")
    src = tmp_path / "fused"
    full.config.save_pretrained(src)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(src / "model.safetensors"))
    pattern = Pattern({layer: [1, 3, 4, 6] for layer in range(3)},
                      {"num_experts": 8, "fingerprint": moeprune.fingerprint.model_fingerprint(full)})
    rows = []
    real = CheckpointReader.get_rows
    monkeypatch.setattr(CheckpointReader, "get_rows",
                        lambda self, name, r, out=None: rows.append((name, tuple(r))) or real(self, name, r, out))
    out = export(src, pattern, tmp_path / "out")
    gate_up = [r for r in rows if r[0].endswith("gate_up_proj")]
    assert sorted(gate_up) == sorted((f"model.layers.{i}.mlp.experts.gate_up_proj", (e,))
                                     for i in range(3) for e in (1, 3, 4, 6))
    with CheckpointReader(out) as reader:
        keys = reader.keys()
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in keys and not any(k.endswith("gate_up_proj") for k in keys)
    monkeypatch.undo()
    full_pattern = Pattern({layer: [0, 1, 2, 3] for layer in range(3)}, {"num_experts": 4})
    with torch.no_grad():
        want = load_slim(src, pattern)(torch.tensor(IDS)).logits
        got = load_slim(out, full_pattern, verify=False)(torch.tensor(IDS)).logits
    assert (want - got).abs().max().item() <= 1e-6


def test_failed_export_leaves_nothing(tmp_path, exported, monkeypatch):
    import moeprune.exporter as ex

    src, _, pattern = exported["qwen3_moe"]
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        from safetensors.torch import save_file

        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(ex, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export(src, pattern, tmp_path / "out", max_shard_size="50KB")
    assert list(tmp_path.iterdir()) == []


def test_cli_select_export_inspect(tmp_path, exported, capsys):
    src, _, _ = exported["qwen3_moe"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS).replace("\n    ", " ") + "\n")
    prof = tmp_path / "prof"
    assert main(["profile", str(src), "--prompts", str(prompts), "--domain", "code", "-o", str(prof), "-q"]) == 0
    pat = tmp_path / "pattern.json"
    assert main(["select", str(prof), "--keep", "0.5", "--criterion", "reap", "-o", str(pat)]) == 0
    text = capsys.readouterr().out
    assert "routing mass kept" in text and "miss rate" in text
    assert main(["inspect", str(pat), "--profile", str(prof)]) == 0
    assert "criterion     reap" in capsys.readouterr().out
    out = tmp_path / "ckpt"
    assert main(["export", str(src), "--pattern", str(pat), "-o", str(out), "-q"]) == 0
    assert (out / "model.safetensors").is_file()
    assert main(["export", str(src), "--profile", str(prof), "--keep", "4", "-o", str(out), "-q"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(src), "--profile", str(prof), "--keep", "4", "-o", str(out), "-q", "--force"]) == 0
    assert main(["select", str(prof), "--keep", "1.5", "-o", str(tmp_path / "bad.json")]) == 2
    assert "out of range" in capsys.readouterr().err
    glob = tmp_path / "global.json"
    assert main(["select", str(prof), "--keep", "0.5", "--strategy", "global", "-o", str(glob)]) == 0
    assert main(["export", str(src), "--pattern", str(glob), "-o", str(tmp_path / "g"), "-q"]) == 2
    assert "strategy='uniform'" in capsys.readouterr().err and not (tmp_path / "g").exists()
