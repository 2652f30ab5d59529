"""Export rewrites the quantization config's module lists through the old->new expert map: names
of kept experts renumbered, names of pruned experts dropped, everything else (other modules, other
layers, patterns matching every expert) unchanged; a pattern naming experts by id refuses.
Fixtures: tests/hub_fixtures.py (F2, Qwen3-MoE FP8; F1, DeepSeek-V3 FP8 with its MTP layer)."""

import json
import re

import pytest
from hub_fixtures import FP8_CONFIG, deepseek_v3_fp8, qwen3_moe_fp8, variant

from moeprune import MoepruneError, Pattern, export
from moeprune.checkpoint import Checkpoint

# kept experts per layer of the 8-expert Qwen fixture: layer 0 maps 1,3,4,6 -> 0,1,2,3; layer 1 0,2,5,7 -> 0,1,2,3
KEPT = {0: [1, 3, 4, 6], 1: [0, 2, 5, 7]}

SOURCE_LISTS = [
    "lm_head",
    "model.layers.0.mlp.gate",
    "model.layers.0.mlp.experts.3.down_proj",  # kept: 3 -> 1
    "model.layers.0.mlp.experts.2.gate_proj",  # pruned
    "model.layers.0.mlp.experts.6",  # a whole expert, kept: 6 -> 3
    "model.layers.1.mlp.experts.7.up_proj.weight",  # a tensor name, kept: 7 -> 3
    "model.layers.1.mlp.experts.3.up_proj",  # pruned
    "model.layers.1.mlp.experts.0.gate_proj",  # kept, id unchanged
    "model.layers.1.self_attn.q_proj",
    "re:.*mlp\\.gate$",  # plain regexes and globs stay
    "re:model\\.layers\\.1\\.mlp\\.experts\\.\\d+\\.down_proj",
    "model.layers.*.self_attn",
    "re:.*experts\\.[0-9]+\\.gate_proj",
    "model.layers.0.mlp.experts.*",
]
WANT_LISTS = [
    "lm_head",
    "model.layers.0.mlp.gate",
    "model.layers.0.mlp.experts.1.down_proj",
    "model.layers.0.mlp.experts.3",
    "model.layers.1.mlp.experts.3.up_proj.weight",
    "model.layers.1.mlp.experts.0.gate_proj",
    "model.layers.1.self_attn.q_proj",
    "re:.*mlp\\.gate$",
    "re:model\\.layers\\.1\\.mlp\\.experts\\.\\d+\\.down_proj",
    "model.layers.*.self_attn",
    "re:.*experts\\.[0-9]+\\.gate_proj",
    "model.layers.0.mlp.experts.*",
]


def _hf_quant(lists: list[str]) -> dict:
    """A ModelOpt-style hf_quant_config.json: a list and a per-module dict keyed by name. No
    quant_algo: moeprune has no codec for ModelOpt's schemes, and these lists are what is tested."""
    return {"producer": {"name": "modelopt", "version": "0.19.0"},
            "quantization": {"quant_algo": None, "kv_cache_quant_algo": None, "exclude_modules": lists,
                             "quantized_layers": {"model.layers.0.mlp.experts.4.gate_proj": {"quant_algo": "FP8"},
                                                  "model.layers.0.mlp.experts.5.gate_proj": {"quant_algo": "FP8"},
                                                  "model.layers.0.self_attn.o_proj": {"quant_algo": "FP8"}}}}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return qwen3_moe_fp8(tmp_path_factory.mktemp("hub") / "Qwen3-MoE-FP8")


def _pattern(folder, kept: dict[int, list[int]], n: int) -> Pattern:
    with Checkpoint(folder) as ckpt:
        return Pattern(kept, {"num_experts": n, "fingerprint": ckpt.fingerprint(ckpt.read_routers())})


def _with_lists(fx, folder, lists: list[str], hf_lists: list[str] | None = None):
    """A copy of `fx` whose quantization lists (config.json, nested too, and hf_quant_config.json) are `lists`."""
    qc = {**FP8_CONFIG, "modules_to_not_convert": lists, "extra": {"ignore": lists, "kv_cache_scheme": None}}
    files = {"hf_quant_config.json": json.dumps(_hf_quant(hf_lists or lists), indent=4)}
    return variant(fx, folder, config={**fx.config, "quantization_config": qc}, files=files)


def test_lists_are_renumbered(qwen, tmp_path):
    folder = _with_lists(qwen, tmp_path / "ckpt", SOURCE_LISTS)
    out = export(folder, _pattern(folder, KEPT, 8), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    want_qc = {**FP8_CONFIG, "modules_to_not_convert": WANT_LISTS,
               "extra": {"ignore": WANT_LISTS, "kv_cache_scheme": None}}
    # transformers 5 reads the expert count as num_local_experts: the export writes both spellings
    assert config == {**qwen.config, "num_experts": 4, "num_local_experts": 4, "quantization_config": want_qc,
                      "moeprune_source": config["moeprune_source"]}
    hf = json.loads((out / "hf_quant_config.json").read_text())
    want_hf = _hf_quant(WANT_LISTS)
    # 4 -> 2 kept, 5 pruned, the attention module unchanged
    want_hf["quantization"]["quantized_layers"] = {"model.layers.0.mlp.experts.2.gate_proj": {"quant_algo": "FP8"},
                                                   "model.layers.0.self_attn.o_proj": {"quant_algo": "FP8"}}
    assert hf == want_hf


def test_lists_without_experts_are_copied_as_they_are(qwen, tmp_path):
    folder = _with_lists(qwen, tmp_path / "ckpt", ["lm_head", "re:.*mlp\\.gate$"], hf_lists=["lm_head"])
    hf_quant = (folder / "hf_quant_config.json").read_bytes()
    hf = json.loads(hf_quant)
    hf["quantization"]["quantized_layers"] = {"model.layers.0.self_attn.o_proj": {"quant_algo": "FP8"}}
    (folder / "hf_quant_config.json").write_text(json.dumps(hf, indent=4))
    out = export(folder, _pattern(folder, KEPT, 8), tmp_path / "out")
    assert (out / "hf_quant_config.json").read_bytes() == (folder / "hf_quant_config.json").read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == json.loads((folder / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("entry", [
    "re:.*experts\\.5\\..*",
    "re:model\\.layers\\.0\\.mlp\\.experts\\.[0-3]\\.down_proj",
    "model.layers.*.mlp.experts.5.gate_proj",
])
@pytest.mark.parametrize("where", ["config.json", "hf_quant_config.json"])
def test_patterns_naming_experts_by_id_refuse(qwen, tmp_path, entry, where):
    lists, hf_lists = (["lm_head", entry], None) if where == "config.json" else (["lm_head"], ["lm_head", entry])
    folder = _with_lists(qwen, tmp_path / "ckpt", lists, hf_lists)
    with pytest.raises(MoepruneError, match=f"^{re.escape(where)}( quantization_config)? holds {re.escape(repr(entry))}") as info:
        export(folder, _pattern(folder, KEPT, 8), tmp_path / "out")
    assert "\n" not in str(info.value) and "pattern that names experts by id" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_layers_without_a_pattern_are_unchanged(tmp_path):
    """DeepSeek: the dense layer 0 and the MTP layer (3, not exported) keep their names."""
    fx = deepseek_v3_fp8(tmp_path / "DeepSeek-V3-FP8")
    kept = {layer: [0, 2, 5, 6, 8, 9, 13, 15] for layer in (1, 2)}  # two of each group of four
    lists = ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.experts.5.down_proj",
             "model.layers.2.mlp.experts.1.up_proj", "model.layers.2.mlp.shared_experts.gate_proj",
             "model.layers.3.mlp.experts.11.gate_proj", "model.layers.3.mlp.experts.5"]
    folder = variant(fx, tmp_path / "ckpt", config={**fx.config, "quantization_config": {**FP8_CONFIG, "ignore": lists}})
    out = export(folder, _pattern(folder, kept, 16), tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["ignore"] == [
        "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.experts.2.down_proj",
        "model.layers.2.mlp.shared_experts.gate_proj",
        "model.layers.3.mlp.experts.11.gate_proj", "model.layers.3.mlp.experts.5"]


def test_expert_names_without_a_layer(qwen, tmp_path):
    """GPTQ's modules_in_block_to_quantize names experts without their layer: with the same count kept in
    every layer and every kept expert listed, experts 0..k-1 keep their names and the rest go."""
    every = [f"mlp.experts.{e}.{p}" for e in range(8) for p in ("gate_proj", "down_proj")]
    qc = {**FP8_CONFIG, "modules_in_block_to_quantize": [["self_attn.q_proj"], every]}
    folder = variant(qwen, tmp_path / "ckpt", config={**qwen.config, "quantization_config": qc})
    out = export(folder, _pattern(folder, KEPT, 8), tmp_path / "out")
    got = json.loads((out / "config.json").read_text())["quantization_config"]["modules_in_block_to_quantize"]
    assert got == [["self_attn.q_proj"], [f"mlp.experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "down_proj")]]
    kept = next(iter(KEPT.values()))
    partial = [n for n in every if f".{kept[0]}." not in n]  # a kept expert is missing from the list
    qc = {**FP8_CONFIG, "modules_in_block_to_quantize": [partial]}
    folder = variant(qwen, tmp_path / "ckpt2", config={**qwen.config, "quantization_config": qc})
    with pytest.raises(MoepruneError, match="names an expert without its layer") as info:
        export(folder, _pattern(folder, KEPT, 8), tmp_path / "out2")
    assert "\n" not in str(info.value) and not (tmp_path / "out2").exists()
