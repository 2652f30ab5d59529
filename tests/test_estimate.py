"""`moeprune estimate`: sizes from the headers alone, equal to what LayerStream, load_slim and export
then take; no tensor data read but the routers; bad input refused in one line."""

import json
import struct

import pytest
import torch
from hub_fixtures import qwen3_moe_fp8, raises_one_line
from tiny import save_tiny
from transformers import AutoConfig, AutoModelForCausalLM

import moeprune
from moeprune.checkpoint import Checkpoint
from moeprune.cli import main
from moeprune.estimate import FLOOR_BYTES, estimate
from moeprune.pattern import Pattern
from moeprune.reader import CheckpointReader
from moeprune.slim import load_full
from moeprune.stream import LayerStream, module_bytes

FAMILIES = ["qwen3_moe", "qwen3_moe_tied", "deepseek_v3", "mixtral"]  # deepseek: a dense first layer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("estimate")
    out = {family: root / family for family in FAMILIES}
    for family, folder in out.items():
        save_tiny(family, folder)
    out["fp8"] = qwen3_moe_fp8(root / "fp8").folder  # per-expert FP8 with weight_scale_inv companions
    return out


@pytest.fixture
def reads(monkeypatch):
    """Bytes of tensor data read by any CheckpointReader while the test runs."""
    seen = {"bytes": 0}
    original = CheckpointReader._pread

    def counted(self, file, view, offset):
        seen["bytes"] += len(view)
        return original(self, file, view, offset)

    monkeypatch.setattr(CheckpointReader, "_pread", counted)
    return seen


def _pattern(folder, kept: dict[int, list[int]] | None = None, k: int = 4) -> Pattern:
    """A pattern made for the checkpoint in `folder` (its fingerprint), `k` experts per layer by default."""
    with Checkpoint(folder) as ckpt:
        fp = ckpt.fingerprint(ckpt.read_routers())
        n = ckpt.num_experts
        half = n // 2  # k // 2 from each half: DeepSeek's two expert groups keep the same count
        kept = kept or {layer: sorted(g * half + (layer + j) % half for g in (0, 1) for j in range(k // 2))
                        for layer in ckpt.layers}
    return Pattern(kept, {"num_experts": n, "fingerprint": fp})


def _router_bytes(folder) -> int:
    with Checkpoint(folder) as ckpt:
        ckpt.read_routers()
        return ckpt.reader.bytes_read


@pytest.mark.parametrize("family", [*FAMILIES, "fp8"])
def test_layer_sizes_are_the_streams_and_nothing_is_read(folders, family, reads):
    folder = folders[family]
    est = estimate(folder)
    assert reads["bytes"] == 0 and est.tensor_bytes_read == 0  # headers and config only
    with LayerStream(folder) as ls:
        assert est.layer_bytes == [ls.layer_bytes(i) for i in range(len(ls.layers))]
        assert est.dtype == ls.dtype
        assert est.n_layers == len(ls.layers) and est.moe_layers == ls.ckpt.layers
    assert est.model_bytes == module_bytes(load_full(folder))  # the whole model, assembled (tied head once)
    files = list(folder.glob("*.safetensors"))
    assert est.disk_bytes == sum(f.stat().st_size for f in files) and est.n_files == len(files)
    if family == "deepseek_v3":
        assert len(set(est.layer_bytes)) > 1  # the dense first layer differs: min/median/max mean something


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_moe_tied"])
def test_embedding_and_head(folders, family):
    est = estimate(folders[family])
    model = AutoModelForCausalLM.from_pretrained(folders[family])
    ends = {id(p): p for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in m.parameters()}
    assert est.head_bytes == sum(p.numel() * p.element_size() for p in ends.values())
    if family == "qwen3_moe_tied":  # a tied head is the embedding: counted once
        assert est.head_bytes == module_bytes(model.get_input_embeddings())
    assert est.streamed_peak == 2 * max(est.layer_bytes) + est.head_bytes + est.activation_bytes + FLOOR_BYTES
    assert est.in_memory_peak == est.model_bytes + est.activation_bytes + FLOOR_BYTES


def test_activations_and_budget_plan_are_the_streams(folders):
    """The activations a streamed run caches for N prompts x T tokens, and its read-ahead and spill
    decisions under a budget, are the estimate's."""
    folder = folders["qwen3_moe"]
    n, t = 3, 16
    ids = torch.randint(4, 100, (n, t), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    largest = max(estimate(folder).layer_bytes)
    acts = estimate(folder, prompts=n, tokens=t).activation_bytes
    for budget in (10**9, 2 * largest + acts, 2 * largest + acts - 1, largest + 1):
        est = estimate(folder, prompts=n, tokens=t, memory_budget=budget)
        with LayerStream(folder, memory_budget=budget) as ls:
            report = ls.run(batches)
        plan = est.budget_plan()
        assert est.activation_bytes == report.cache_bytes
        assert (plan["prefetch"], plan["spill"]) == (report.prefetch, report.spilled), budget
        assert plan["streams"]
    est = estimate(folder, memory_budget=largest - 1)  # below one layer: the stream refuses it, and so does this
    assert not est.budget_plan()["streams"] and not est.budget_plan()["in_memory_fits"]
    with pytest.raises(moeprune.MoepruneError, match="smaller than one decoder layer"):
        LayerStream(folder, memory_budget=largest - 1)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_moe_tied", "deepseek_v3", "fp8"])
def test_slim_and_export_sizes(folders, family, tmp_path, reads):
    folder = folders[family]
    pattern = _pattern(folder)
    reads["bytes"] = 0
    est = estimate(folder, pattern=pattern)
    assert reads["bytes"] == est.tensor_bytes_read == _router_bytes(folder)  # the routers, nothing more
    slim = moeprune.load_slim(folder, pattern)
    assert est.slim_bytes == module_bytes(slim) and est.slim_bytes < est.model_bytes
    assert est.kept == pattern.counts
    out = moeprune.export(folder, pattern, tmp_path / "out", max_shard_size="20KB")
    files = sorted(out.glob("*.safetensors"))
    with CheckpointReader(out) as r:
        tensors = sum(r.nbytes(k) for k in r.keys())  # noqa: SIM118
    assert est.export_bytes == tensors
    headers = sum(8 + struct.unpack("<Q", f.read_bytes()[:8])[0] for f in files)
    assert est.export_bytes == sum(f.stat().st_size for f in files) - headers
    assert len(files) > 1  # sharded: one header per shard
    if family == "fp8":  # the export keeps FP8 and its scales: what was stored, not the compute dtype
        weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        assert any(k.endswith("experts.0.up_proj.weight_scale_inv") for k in weight_map)
        assert est.export_bytes < est.slim_bytes


def test_non_uniform_pattern(folders):
    folder = folders["qwen3_moe"]
    with Checkpoint(folder) as ckpt:
        layers = ckpt.layers
    pattern = _pattern(folder, {layer: list(range(2 + i)) for i, layer in enumerate(layers)})
    est = estimate(folder, pattern=pattern)
    assert est.slim_bytes == module_bytes(moeprune.load_slim(folder, pattern))
    assert est.export_bytes is None and "non-uniform" in est.export_note


def test_cli_output(folders, tmp_path, capsys):
    folder = folders["fp8"]
    pattern = _pattern(folder)
    pattern.save(tmp_path / "p.json")
    assert main(["estimate", str(folder), "--pattern", str(tmp_path / "p.json"), "--prompts", "8",
                 "--tokens", "32", "--memory-budget", "1MB"]) == 0
    text = capsys.readouterr().out
    for want in ("2 decoder layers, 2 MoE layers x 8 experts", "per layer  min",
                 "8 prompts x 32 tokens x hidden 256 x 2 bytes", "streamed profiling", "in-memory profiling",
                 "memory budget", "slim model (load_slim)", "export on disk", "4 of 8 experts per layer kept",
                 "routers only"):
        assert want in text, (want, text)
    assert "bfloat16" in text


def _one_line(capfd) -> str:
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moeprune: error:"), err
    return lines[0]


def test_bad_input(folders, tmp_path, capfd):
    dense = tmp_path / "dense"
    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(dense)
    other = tmp_path / "other"
    save_tiny("qwen3_moe", other, seed=1)  # same shapes, other routers: another model
    _pattern(other).save(tmp_path / "other.json")
    folder = str(folders["qwen3_moe"])
    cases = {
        "not found": [str(tmp_path / "missing")],
        "'llama'": [str(dense)],
        "another model": [folder, "--pattern", str(tmp_path / "other.json")],
        "not a size": [folder, "--memory-budget", "lots"],
        "must be positive": [folder, "--memory-budget", "0"],
        "prompts must be >= 1": [folder, "--prompts", "0"],
        "beyond the model's context": [folder, "--tokens", "100000"],
        "unknown dtype": [folder, "--dtype", "float7"],
    }
    for match, argv in cases.items():
        assert main(["estimate", *argv]) == 2, argv
        line = _one_line(capfd)
        assert match in line or match.lower() in line.lower(), (match, line)
    raises_one_line(lambda: estimate(folder, pattern=tmp_path / "other.json"), "another model")
