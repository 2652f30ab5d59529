"""Quantized hub checkpoints (block FP8): load_slim, the ExpertPool, profile and export equal an
oracle built from the dequantized values, or refuse in one line. Fixtures: tests/hub_fixtures.py."""

import json

import pytest
import torch
from hub_fixtures import (
    BLOCK,
    FP8_CONFIG,
    IDS,
    assert_close,
    assert_export_matches_oracle,
    assert_pool_matches_oracle,
    assert_profile_matches_oracle,
    block_values,
    deepseek_v3_fp8,
    fuse_experts,
    oracle_logits,
    qwen3_moe_fp8,
    raises_one_line,
    random_pattern,
    variant,
)

import moeprune
from moeprune import MoepruneError, Pattern, export, load_slim
from moeprune.codecs import codec_for
from moeprune.codecs import fp8_block as fp8_module
from moeprune.codecs.fp8_block import dequantize_fp8_block
from moeprune.hooks import keep_mask
from moeprune.reader import CheckpointReader
from moeprune.serve import ExpertPool

PROMPTS = ["def f(x):\n    return x * 2", "And God said, Let there be light", "#include <stdlib.h>"]
NAMES = ["deepseek_v3", "qwen3_moe", "qwen3_moe_bf16_scales"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {
        "deepseek_v3": deepseek_v3_fp8(root / "DeepSeek-V3-FP8"),
        "qwen3_moe": qwen3_moe_fp8(root / "Qwen3-MoE-FP8"),
        # BF16 scales, as some Qwen FP8 releases store them, and experts of 1.5 blocks
        "qwen3_moe_bf16_scales": qwen3_moe_fp8(root / "Qwen3-MoE-FP8-bf16-scales", seed=1,
                                               scale_dtype=torch.bfloat16, moe_intermediate_size=192),
    }


# ---------------------------------------------------------------------------------------- codec
def test_dequantize_uses_the_configured_block():
    gen = torch.Generator().manual_seed(0)
    codes = (torch.randn(576, 300, generator=gen) * 64).to(torch.float8_e4m3fn)
    scale = torch.rand(5, 3, generator=gen) + 0.5  # 576 rows = 4.5 blocks: the grid has 5 rows
    assert torch.equal(dequantize_fp8_block(codes, scale, (BLOCK, BLOCK)), block_values(codes, scale))
    # fused over experts: the expert is axis 0 of the codes and of the grid
    stacked = dequantize_fp8_block(torch.stack([codes, codes]), torch.stack([scale, 2 * scale]), (BLOCK, BLOCK))
    assert torch.equal(stacked[1], block_values(codes, 2 * scale))
    # 144 rows over a grid of 2: rows 128.. are the second block (not 72-row blocks read off the grid)
    small = dequantize_fp8_block(codes[:144, :128], scale[:2, :1], (BLOCK, BLOCK))
    assert torch.equal(small[100], codes[100, :128].float() * scale[0, 0])
    assert torch.equal(small[130], codes[130, :128].float() * scale[1, 0])


def test_codec_registry():
    assert codec_for(None).name == "none"
    assert codec_for(FP8_CONFIG).name == "fp8_block"
    assert codec_for({**FP8_CONFIG, "weight_block_size": [64, 128]}).block == (64, 128)
    for bad in ([128], [0, 128], "128", [128.0, 128]):
        raises_one_line(lambda bad=bad: codec_for({**FP8_CONFIG, "weight_block_size": bad}), "weight_block_size")


# ---------------------------------------------------------------------------------------- load_slim
@pytest.mark.parametrize("name", NAMES)
def test_load_slim_equals_oracle(hub, name):
    fx = hub[name]
    pattern = random_pattern(fx)
    slim = load_slim(fx.folder, pattern, dtype="float32", record_reads=True)
    with torch.no_grad():
        got = slim(IDS).logits
        got_gen = slim.generate(IDS[:1], max_new_tokens=6, do_sample=False)
    want = oracle_logits(fx, pattern)
    assert_close(got, want)
    oracle = fx.oracle()
    with torch.no_grad(), keep_mask(oracle, moeprune.get_adapter(oracle), pattern.keep_masks()):
        assert torch.equal(oracle.generate(IDS[:1], max_new_tokens=6, do_sample=False), got_gen)
    assert not hasattr(slim.config, "quantization_config")  # it holds decoded floats
    assert moeprune.get_adapter(slim).num_experts(slim.config) == fx.num_experts // 2
    # read: every tensor once, except pruned experts (codes and scales) and the MTP layer
    want_reads = []
    with CheckpointReader(fx.folder) as reader:
        for key in reader.keys():  # noqa: SIM118 - the reader has no __iter__
            if key in fx.extra:
                continue
            split = moeprune.get_adapter(slim).split_expert_key(key)
            if split and split[1] not in pattern.kept[split[0]]:
                continue
            e = reader._entry(key)
            want_reads.append((e.file.name, e.start, e.nbytes))
    assert sorted(slim.moeprune_load_report.reads) == sorted(want_reads)


def test_load_slim_default_dtype_is_the_configs(hub):
    fx = hub["deepseek_v3"]
    pattern = random_pattern(fx)
    slim = load_slim(fx.folder, pattern)  # config: torch_dtype bfloat16
    # decoded FP8 weights land in bf16 (transformers itself keeps DeepSeek's router in float32)
    for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
                 "model.layers.0.mlp.down_proj.weight"):
        assert slim.get_parameter(name).dtype == torch.bfloat16
    with torch.no_grad():
        got = slim(IDS).logits.float()
    want = oracle_logits(fx, pattern)
    assert (got - want).abs().max().item() <= 0.05 * want.abs().max().item()  # bf16 rounding only


def test_fused_fp8_experts(hub, tmp_path):
    """Experts fused on disk with fused scale grids (a transformers-5 FP8 save): rows of both are read."""
    fx = hub["qwen3_moe"]
    folder = fuse_experts(fx, tmp_path / "fused")
    pattern = random_pattern(fx)
    slim = load_slim(folder, pattern, dtype="float32")
    with torch.no_grad():
        assert_close(slim(IDS).logits, oracle_logits(fx, pattern))
    raises_one_line(lambda: export(folder, pattern, tmp_path / "out"), "cannot split the quantized fused")


# ---------------------------------------------------------------------------------------- pool
@pytest.mark.parametrize("name", ["deepseek_v3", "qwen3_moe_bf16_scales"])
def test_pool_equals_oracle(hub, name):
    fx = hub[name]
    assert_pool_matches_oracle(fx)


# ---------------------------------------------------------------------------------------- profile
@pytest.mark.parametrize("name", ["deepseek_v3", "qwen3_moe"])
def test_profile_decodes_with_moeprune(hub, name):
    """profile(path) decodes through moeprune's codec: no dependence on transformers' FP8 loader
    (which cannot decode DeepSeek's 576-row kv_a_proj_with_mqa), same fingerprint as the bf16 sibling."""
    fx = hub[name]
    assert_profile_matches_oracle(fx, PROMPTS)


# ---------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("name", ["deepseek_v3", "qwen3_moe"])
def test_export_is_byte_exact(hub, name, tmp_path):
    fx = hub[name]
    pattern = random_pattern(fx)
    out = export(fx.folder, pattern, tmp_path / "pruned")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == fx.config["quantization_config"]
    k = fx.num_experts // 2
    assert config.get("num_experts", config.get("n_routed_experts")) == k
    with CheckpointReader(fx.folder) as src, CheckpointReader(out) as dst:
        for layer, ids in pattern.kept.items():
            for new, old in enumerate(ids):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    for suffix in ("weight", "weight_scale_inv"):
                        a = src.get(f"model.layers.{layer}.mlp.experts.{old}.{proj}.{suffix}")
                        b = dst.get(f"model.layers.{layer}.mlp.experts.{new}.{proj}.{suffix}")
                        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
            assert f"model.layers.{layer}.mlp.experts.{k}.up_proj.weight" not in dst
        # a multi-token-prediction layer is dropped, and the config says so, not copied with every expert
        top = f"model.layers.{fx.config['num_hidden_layers']}."
        mtp = [key for key in src.keys() if key.startswith(top)]  # noqa: SIM118
        assert bool(mtp) == (name == "deepseek_v3")
        assert not [key for key in dst.keys() if key.startswith(top)]  # noqa: SIM118
    if name == "deepseek_v3":
        assert config["num_nextn_predict_layers"] == 0 and "multi-token-prediction" in (out / "README.md").read_text()
    # the export, decoded, is the oracle under the pattern
    assert_export_matches_oracle(fx, pattern, out, k)


# ---------------------------------------------------------------------------------------- refusals
SCHEMES = {
    "compressed-tensors": ({"quant_method": "compressed-tensors", "format": "pack-quantized",
                            "config_groups": {}, "ignore": ["lm_head"]}, None),
    "gptq": ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}, None),
    "awq": ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}, None),
    "bitsandbytes": ({"quant_method": "bitsandbytes", "load_in_4bit": True}, None),
    "without weight_block_size": ({"quant_method": "fp8", "activation_scheme": "dynamic"}, None),
    "static": ({**FP8_CONFIG, "activation_scheme": "static"}, None),
    "fmt 'e5m2'": ({**FP8_CONFIG, "fmt": "e5m2"}, None),
    "NVFP4": (None, {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4", "group_size": 16}}),
}


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_unknown_schemes_refuse_everywhere(hub, scheme, tmp_path):
    fx = hub["qwen3_moe"]
    qc, hf = SCHEMES[scheme]
    config = {k: v for k, v in fx.config.items() if k != "quantization_config"}
    if qc is not None:
        config["quantization_config"] = qc
    folder = variant(fx, tmp_path / "ckpt", config=config,
                     files={"hf_quant_config.json": json.dumps(hf)} if hf else None)
    pattern = random_pattern(fx)
    for call in (lambda: load_slim(folder, pattern),
                 lambda: ExpertPool(folder, 6),
                 lambda: moeprune.profile(folder, PROMPTS),
                 lambda: export(folder, pattern, tmp_path / "out")):
        raises_one_line(call, scheme)
    assert not (tmp_path / "out").exists()


def test_a_scheme_that_does_not_match_the_tensors_refuses(hub, tmp_path):
    """A known scheme (mxfp4) declared over tensors it does not store (FP8 codes): refused by name."""
    fx = hub["qwen3_moe"]
    config = {**fx.config, "quantization_config": {"quant_method": "mxfp4",
                                                   "modules_to_not_convert": ["model.layers.*.self_attn"]}}
    folder = variant(fx, tmp_path / "ckpt", config=config)
    pattern = random_pattern(fx)
    for call in (lambda: load_slim(folder, pattern),
                 lambda: ExpertPool(folder, 6),
                 lambda: moeprune.profile(folder, PROMPTS),
                 lambda: export(folder, pattern, tmp_path / "out")):
        raises_one_line(call, "float8_e4m3fn; mxfp4")
    assert not (tmp_path / "out").exists()


def _qwen_variant(hub, tmp_path, **kw):
    fx = hub["qwen3_moe"]
    return fx, variant(fx, tmp_path / "ckpt", **kw), random_pattern(fx)


def test_fp8_codes_without_a_quantization_config_refuse(hub, tmp_path):
    """The old silent bug: FP8 codes cast to floats with their scales never read."""
    fx = hub["qwen3_moe"]
    config = {k: v for k, v in fx.config.items() if k != "quantization_config"}
    _, folder, pattern = _qwen_variant(hub, tmp_path, config=config)
    raises_one_line(lambda: load_slim(folder, pattern), "float8_e4m3fn.*quantization_config")
    raises_one_line(lambda: ExpertPool(folder, 6), "float8_e4m3fn.*quantization_config")


def test_unknown_tensors_refuse(hub, tmp_path):
    """A companion moeprune does not decode (a static input scale) is never dropped silently."""
    _, folder, pattern = _qwen_variant(
        hub, tmp_path, tensors={"model.layers.0.self_attn.q_proj.input_scale": torch.tensor(0.5)})
    raises_one_line(lambda: load_slim(folder, pattern), "does not know how to use.*q_proj.input_scale")
    raises_one_line(lambda: ExpertPool(folder, 6), "q_proj.input_scale")


def test_fills_check_shape_and_dtype_class(hub, tmp_path):
    fx, folder, pattern = _qwen_variant(hub, tmp_path, tensors={"model.norm.weight": torch.ones(255, dtype=torch.bfloat16)})
    raises_one_line(lambda: load_slim(folder, pattern), r"model.norm.weight .*shape \[255\].*expects \[256\]")
    folder = variant(fx, tmp_path / "int", tensors={"model.norm.weight": torch.ones(256, dtype=torch.int32)})
    raises_one_line(lambda: load_slim(folder, pattern), "int32 values where the model needs")


def test_e8m0_scales_refuse(hub, tmp_path):
    fx = hub["qwen3_moe"]
    key = "model.layers.0.self_attn.k_proj.weight_scale_inv"
    _, folder, pattern = _qwen_variant(hub, tmp_path, tensors={key: fx.stored[key].to(torch.float8_e8m0fnu)})
    for call in (lambda: load_slim(folder, pattern), lambda: export(folder, pattern, tmp_path / "out")):
        raises_one_line(call, "F8_E8M0")


def test_quantized_router_refuses(hub, tmp_path):
    fx = hub["qwen3_moe"]
    key = "model.layers.1.mlp.gate.weight"
    _, folder, pattern = _qwen_variant(hub, tmp_path, tensors={key: fx.stored[key].view(torch.uint8)[:, :256]})
    for call in (lambda: load_slim(folder, pattern, verify=False), lambda: export(folder, pattern, tmp_path / "o")):
        raises_one_line(call, "router tensor .*uint8")


def test_scale_grid_and_missing_scale_refuse(hub, tmp_path):
    fx = hub["qwen3_moe"]
    config = {**fx.config, "quantization_config": {**FP8_CONFIG, "weight_block_size": [64, 64]}}
    _, folder, pattern = _qwen_variant(hub, tmp_path, config=config)
    raises_one_line(lambda: load_slim(folder, pattern), r"in 64x64 blocks \(weight_block_size\) needs")
    raises_one_line(lambda: export(folder, pattern, tmp_path / "out"), "weight_block_size")
    kept = pattern.kept[0][0]
    missing = f"model.layers.0.mlp.experts.{kept}.up_proj.weight_scale_inv"
    folder = variant(fx, tmp_path / "no-scale", tensors={missing: None})
    raises_one_line(lambda: load_slim(folder, pattern), f"has no {missing}")
    raises_one_line(lambda: export(folder, pattern, tmp_path / "out"), f"has no {missing}")


def test_expert_ids_in_quantization_lists_are_renumbered(hub, tmp_path):
    """Those lists are rewritten on export (tests/test_quant_lists.py); decoding does not read them."""
    fx = hub["qwen3_moe"]
    qc = dict(fx.config["quantization_config"])
    qc["modules_to_not_convert"] = [*qc["modules_to_not_convert"], "model.layers.0.mlp.experts.3.down_proj"]
    _, folder, pattern = _qwen_variant(hub, tmp_path, config={**fx.config, "quantization_config": qc})
    load_slim(folder, pattern, dtype="float32")
    out = export(folder, pattern, tmp_path / "out")
    lists = json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    kept = pattern.kept[0]
    want = [f"model.layers.0.mlp.experts.{kept.index(3)}.down_proj"] if 3 in kept else []
    assert lists == [*fx.config["quantization_config"]["modules_to_not_convert"], *want]


# ---------------------------------------------------------------------------------------- teeth
@pytest.mark.parametrize("broken", ["scale skipped", "one scale per tensor"])
def test_the_oracle_catches_a_broken_codec(hub, monkeypatch, broken):
    """The comparison above would have caught the old bug (codes cast, scales never read) and a
    misplaced block: break the codec on purpose and watch the result leave the oracle."""
    real = fp8_module.dequantize_fp8_block

    def wrong(weight, scale, block, out=None):
        if broken == "scale skipped":
            return weight.float() if out is None else out.copy_(weight)
        return real(weight, scale[..., :1, :1].expand(scale.shape), block, out=out)

    monkeypatch.setattr(fp8_module, "dequantize_fp8_block", wrong)
    fx = hub["deepseek_v3"]
    pattern = random_pattern(fx)
    with torch.no_grad():
        got = load_slim(fx.folder, pattern, dtype="float32")(IDS).logits
    assert (got - oracle_logits(fx, pattern)).abs().max().item() > 1e-2


def test_export_prunes_the_mtp_layer_with_the_last_layers_experts(hub, tmp_path):
    """--mtp prune: the multi-token-prediction layer keeps the last MoE layer's experts and router rows."""
    fx = hub["deepseek_v3"]
    pattern = random_pattern(fx)
    mtp, last = fx.config["num_hidden_layers"], max(pattern.kept)
    out = export(fx.folder, pattern, tmp_path / "pruned", mtp="prune")
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == fx.config["num_nextn_predict_layers"]
    assert "keep the experts of the last MoE layer" in (out / "README.md").read_text()
    ids = pattern.kept[last]
    with CheckpointReader(fx.folder) as src, CheckpointReader(out) as dst:
        for new, old in enumerate(ids):
            for suffix in ("gate_proj.weight", "gate_proj.weight_scale_inv", "down_proj.weight"):
                a = src.get(f"model.layers.{mtp}.mlp.experts.{old}.{suffix}")
                b = dst.get(f"model.layers.{mtp}.mlp.experts.{new}.{suffix}")
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        assert f"model.layers.{mtp}.mlp.experts.{len(ids)}.up_proj.weight" not in dst
        index = torch.as_tensor(ids)
        assert torch.equal(dst.get(f"model.layers.{mtp}.mlp.gate.weight"),
                           src.get(f"model.layers.{mtp}.mlp.gate.weight").index_select(0, index))
        bias = f"model.layers.{mtp}.mlp.gate.e_score_correction_bias"
        assert torch.equal(dst.get(bias), src.get(bias).index_select(0, index))
    full = Pattern({layer: list(range(len(ids))) for layer in pattern.kept}, {"num_experts": len(ids)})
    with torch.no_grad():  # the MTP layer is not part of the model's forward: the logits are unchanged
        assert_close(load_slim(out, full, dtype="float32", verify=False)(IDS).logits, oracle_logits(fx, pattern))
    with pytest.raises(MoepruneError, match="mtp must be"):
        export(fx.folder, pattern, tmp_path / "other", mtp="keep")
