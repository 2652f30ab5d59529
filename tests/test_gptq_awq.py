"""GPTQ and AWQ (4-bit, per-expert `qweight`/`qzeros`/`scales`/`g_idx`) hub checkpoints:
load_slim, the ExpertPool and profile equal an oracle built from independently dequantized
values; export copies kept experts' companions byte for byte; variants moeprune does not decode
refuse in one line. The old AutoGPTQ layout (no quantization_config, only a root
quantize_config.json) decodes and exports the same way. Fixtures: tests/hub_fixtures.py (F6)."""

import json

import pytest
import torch
from hub_fixtures import (
    AWQ_CONFIG,
    AWQ_PACK_ORDER,
    GPTQ_CONFIG,
    IDS,
    assert_close,
    assert_export_matches_oracle,
    assert_pool_matches_oracle,
    assert_profile_matches_oracle,
    int4_values,
    mixtral_gptq,
    oracle_logits,
    pack_cols_int4,
    pack_rows_int4,
    qwen3_moe_awq,
    raises_one_line,
    random_pattern,
    variant,
)

import moeprune
from moeprune import export, load_slim
from moeprune.codecs import awq as awq_module
from moeprune.codecs import codec_for, codec_for_folder
from moeprune.codecs import gptq as gptq_module
from moeprune.codecs.awq import dequantize_awq, unpack_awq
from moeprune.codecs.gptq import dequantize_gptq
from moeprune.reader import CheckpointReader
from moeprune.serve import ExpertPool

PROMPTS = ["def f(x):\n    return x * 2", "And God said, Let there be light", "#include <stdlib.h>"]
NAMES = ["mixtral_gptq", "mixtral_gptq_no_act_order", "qwen3_moe_awq"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {
        "mixtral_gptq": mixtral_gptq(root / "Mixtral-GPTQ"),
        # the common layout: desc_act false, symmetric, g_idx = row // group_size
        "mixtral_gptq_no_act_order": mixtral_gptq(root / "Mixtral-GPTQ-plain", seed=1, quantization_config={
            **GPTQ_CONFIG, "desc_act": False, "sym": True, "checkpoint_format": "gptq"}),
        "qwen3_moe_awq": qwen3_moe_awq(root / "Qwen3-MoE-AWQ"),
    }


def expert_parts(fx) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(expert key prefix format, projections, companion suffixes) of a fixture."""
    if fx.config["model_type"] == "mixtral":
        return ("model.layers.{l}.block_sparse_moe.experts.{e}", ("w1", "w2", "w3"),
                ("qweight", "qzeros", "scales", "g_idx"))
    return "model.layers.{l}.mlp.experts.{e}", ("gate_proj", "up_proj", "down_proj"), ("qweight", "qzeros", "scales")


# ---------------------------------------------------------------------------------------- codec
def test_awq_nibble_order():
    word = sum(k << (4 * k) for k in range(8))  # nibble k holds k
    codes = unpack_awq(torch.tensor([[word]], dtype=torch.int32))
    # nibble k holds column AWQ_PACK_ORDER[k]: column 2 is nibble 1, column 1 nibble 4
    assert codes.tolist() == [[0, 4, 1, 5, 2, 6, 3, 7]]
    assert pack_cols_int4(codes, AWQ_PACK_ORDER).item() == word


def test_dequantize_equals_integer_values():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (96, 40), generator=gen)  # [in, out]
    zeros = torch.randint(1, 16, (3, 40), generator=gen)
    scales = torch.rand(3, 40, generator=gen).half()
    groups = (torch.argsort(torch.randperm(96, generator=gen)) // 32).int()
    want = int4_values(codes, zeros, scales, groups)
    got = dequantize_gptq(pack_rows_int4(codes), pack_cols_int4(zeros - 1), scales, groups)
    assert torch.equal(got, want)
    plain = (torch.arange(96) // 32).int()
    got = dequantize_awq(pack_cols_int4(codes, AWQ_PACK_ORDER), pack_cols_int4(zeros, AWQ_PACK_ORDER), scales, 32)
    assert torch.equal(got, int4_values(codes, zeros, scales, plain))
    # a code of 15 in the top nibble makes the int32 word negative: still decoded as 15
    assert pack_rows_int4(torch.full((8, 1), 15)).item() == -1
    assert dequantize_gptq(torch.tensor([[-1]], dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32),
                           torch.ones(1, 8).half(), torch.zeros(8, dtype=torch.int32))[0].tolist() == [14.0] * 8


def test_codec_registry():
    assert codec_for(GPTQ_CONFIG).name == "gptq"
    assert codec_for({**GPTQ_CONFIG, "checkpoint_format": "gptq"}).desc_act is True
    assert codec_for(AWQ_CONFIG).name == "awq"
    assert codec_for({**AWQ_CONFIG, "version": "GEMM", "group_size": -1}).group_size == -1
    refused = [
        ({**GPTQ_CONFIG, "bits": 8}, "bits 8"),
        ({**GPTQ_CONFIG, "bits": 3}, "bits 3"),
        ({**GPTQ_CONFIG, "checkpoint_format": "gptq_v2"}, "checkpoint_format 'gptq_v2'"),
        ({**GPTQ_CONFIG, "checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
        ({**GPTQ_CONFIG, "is_marlin_format": True}, "checkpoint_format 'marlin'"),
        ({**GPTQ_CONFIG, "group_size": 100}, "group_size"),
        ({**GPTQ_CONFIG, "desc_act": "yes"}, "desc_act"),
        ({**AWQ_CONFIG, "bits": 8}, "bits 8"),
        ({**AWQ_CONFIG, "version": "gemv"}, "version 'gemv'"),
        ({**AWQ_CONFIG, "version": "gemv_fast"}, "version 'gemv_fast'"),
        ({**AWQ_CONFIG, "version": "exllama"}, "version 'exllama'"),
        ({**AWQ_CONFIG, "version": "marlin"}, "version 'marlin'"),
        ({**AWQ_CONFIG, "version": "ipex"}, "version 'ipex'"),
        ({**AWQ_CONFIG, "zero_point": False}, "zero_point False"),
    ]
    for qc, match in refused:
        raises_one_line(lambda qc=qc: codec_for(qc), match)


# ---------------------------------------------------------------------------------------- load_slim, pool, profile
@pytest.mark.parametrize("name", NAMES)
def test_load_slim_equals_oracle(hub, name):
    fx = hub[name]
    pattern = random_pattern(fx)
    slim = load_slim(fx.folder, pattern, dtype="float32")
    with torch.no_grad():
        assert_close(slim(IDS).logits, oracle_logits(fx, pattern))
    assert not hasattr(slim.config, "quantization_config")  # it holds decoded floats
    assert moeprune.get_adapter(slim).num_experts(slim.config) == fx.num_experts // 2


@pytest.mark.parametrize("name", ["mixtral_gptq", "qwen3_moe_awq"])
def test_pool_equals_oracle(hub, name):
    fx = hub[name]
    assert_pool_matches_oracle(fx)


@pytest.mark.parametrize("name", ["mixtral_gptq", "qwen3_moe_awq"])
def test_profile_decodes_with_moeprune(hub, name):
    fx = hub[name]
    assert_profile_matches_oracle(fx, PROMPTS)


# ---------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("name", ["mixtral_gptq", "qwen3_moe_awq"])
def test_export_is_byte_exact(hub, name, tmp_path):
    fx = hub[name]
    pattern = random_pattern(fx)
    out = export(fx.folder, pattern, tmp_path / "pruned")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == fx.config["quantization_config"]
    k = fx.num_experts // 2
    prefix, projs, suffixes = expert_parts(fx)
    with CheckpointReader(fx.folder) as src, CheckpointReader(out) as dst:
        for layer, ids in pattern.kept.items():
            for new, old in enumerate(ids):
                for proj in projs:
                    for suffix in suffixes:
                        a = src.get(f"{prefix.format(l=layer, e=old)}.{proj}.{suffix}")
                        b = dst.get(f"{prefix.format(l=layer, e=new)}.{proj}.{suffix}")
                        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
            assert f"{prefix.format(l=layer, e=k)}.{projs[0]}.qweight" not in dst
            assert not any(key.endswith(".weight") and ".experts." in key for key in dst.keys())  # noqa: SIM118
    assert_export_matches_oracle(fx, pattern, out, k)


# ---------------------------------------------------------------------------------------- refusals
def test_unsupported_variants_refuse_everywhere(hub, tmp_path):
    fx = hub["mixtral_gptq"]
    pattern = random_pattern(fx)
    for i, (qc, match) in enumerate([({**GPTQ_CONFIG, "bits": 8}, "bits 8"),
                                     ({**GPTQ_CONFIG, "checkpoint_format": "gptq_v2"}, "gptq_v2"),
                                     ({**AWQ_CONFIG, "version": "gemv"}, "gemv")]):
        folder = variant(fx, tmp_path / f"ckpt{i}", config={**fx.config, "quantization_config": qc})
        for call in (lambda folder=folder: load_slim(folder, pattern),
                     lambda folder=folder: ExpertPool(folder, 6),
                     lambda folder=folder: moeprune.profile(folder, PROMPTS),
                     lambda folder=folder, i=i: export(folder, pattern, tmp_path / f"out{i}")):
            raises_one_line(call, match)
        assert not (tmp_path / f"out{i}").exists()


def test_broken_checkpoints_refuse(hub, tmp_path):
    fx = hub["mixtral_gptq"]
    pattern = random_pattern(fx)
    e = pattern.kept[0][0]
    x = f"model.layers.0.block_sparse_moe.experts.{e}.w2"
    groups = fx.stored[f"{x}.scales"].shape[0]
    cases = {
        "no_zeros": ({f"{x}.qzeros": None}, "has no .*qzeros"),
        "scales": ({f"{x}.scales": fx.stored[f"{x}.scales"][:1]}, "scales .*has shape"),
        "g_idx": ({f"{x}.g_idx": torch.full_like(fx.stored[f"{x}.g_idx"], groups)}, "g_idx .*names groups"),
        "no_g_idx": ({f"{x}.g_idx": None}, "no g_idx, but desc_act"),
        "qweight_dtype": ({f"{x}.qweight": fx.stored[f"{x}.qweight"].float()}, "qweight .*int32"),
    }
    for name, (tensors, match) in cases.items():
        folder = variant(fx, tmp_path / name, tensors=tensors)
        raises_one_line(lambda folder=folder: load_slim(folder, pattern, dtype="float32"), match)
    # AWQ rejects a g_idx it would not read: no key is left unexplained
    awq = hub["qwen3_moe_awq"]
    y = "model.layers.0.mlp.experts.0.down_proj"
    folder = variant(awq, tmp_path / "awq_g_idx", tensors={f"{y}.g_idx": torch.zeros(64, dtype=torch.int32)})
    raises_one_line(lambda: load_slim(folder, random_pattern(awq), dtype="float32"), "does not know how to use")


# ---------------------------------------------------------------------------------------- teeth
@pytest.mark.parametrize("broken", ["gptq zero offset", "gptq g_idx ignored", "gptq nibble order",
                                    "awq nibble order", "awq zero offset"])
def test_the_oracle_catches_a_broken_codec(hub, monkeypatch, broken):
    """Break each codec once on purpose and watch the result leave the oracle."""
    real = gptq_module.dequantize_gptq
    if broken == "gptq zero offset":
        monkeypatch.setattr(gptq_module, "dequantize_gptq", lambda q, z, s, g: real(q, z, s, g, zero_offset=0))
    elif broken == "gptq g_idx ignored":
        monkeypatch.setattr(gptq_module, "dequantize_gptq",
                            lambda q, z, s, g: real(q, z, s, (torch.arange(g.numel()) // 32).int()))
    elif broken == "gptq nibble order":  # rows of a word read highest nibble first
        real_unpack = gptq_module.unpack_int4
        monkeypatch.setattr(gptq_module, "unpack_int4", lambda p, dim: real_unpack(p, dim) if dim else
                            real_unpack(p, dim).view(-1, 8, p.shape[1]).flip(1).reshape(-1, p.shape[1]))
    elif broken == "awq nibble order":
        monkeypatch.setattr(awq_module, "NIBBLE_OF_COLUMN", tuple(range(8)))
    else:
        real_awq = awq_module.dequantize_awq
        monkeypatch.setattr(awq_module, "dequantize_awq", lambda q, z, s, g: real_awq(q, z, s, g) - s.float()[
            torch.arange(q.shape[0]) // g].t())  # zeros read one too high, as a GPTQ v1 offset would
    fx = hub["qwen3_moe_awq" if broken.startswith("awq") else "mixtral_gptq"]
    pattern = random_pattern(fx)
    with torch.no_grad():
        got = load_slim(fx.folder, pattern, dtype="float32")(IDS).logits
    assert (got - oracle_logits(fx, pattern)).abs().max().item() > 1e-3


# ---------------------------------------------------------------------------------------- old AutoGPTQ layout
@pytest.fixture(scope="module")
def legacy(hub, tmp_path_factory):
    """TheBloke-era layout: config.json without quantization_config, the GPTQ config only in the
    root quantize_config.json (no quant_method), as AutoGPTQ wrote it."""
    fx = hub["mixtral_gptq"]
    config = {k: v for k, v in fx.config.items() if k != "quantization_config"}
    folder = variant(fx, tmp_path_factory.mktemp("legacy") / "Mixtral-GPTQ-legacy", config=config)
    assert "quant_method" not in json.loads((folder / "quantize_config.json").read_text())
    return fx, folder


def test_quantize_config_json_is_read_as_gptq(legacy):
    fx, folder = legacy
    codec = codec_for_folder(folder)
    assert codec.name == "gptq" and codec.desc_act is True and codec.group_size == 32
    pattern = random_pattern(fx)
    slim = load_slim(folder, pattern, dtype="float32")
    with torch.no_grad():
        assert_close(slim(IDS).logits, oracle_logits(fx, pattern))
    assert not hasattr(slim.config, "quantization_config")


def test_quantize_config_json_export_round_trips(legacy, tmp_path):
    fx, folder = legacy
    pattern = random_pattern(fx)
    out = export(folder, pattern, tmp_path / "pruned")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    # no expert names in it: copied byte for byte, and the export decodes the same way
    assert (out / "quantize_config.json").read_bytes() == (folder / "quantize_config.json").read_bytes()
    assert codec_for_folder(out).describe() == codec_for_folder(folder).describe()
    k = fx.num_experts // 2
    prefix, projs, suffixes = expert_parts(fx)
    with CheckpointReader(folder) as src, CheckpointReader(out) as dst:
        for layer, ids in pattern.kept.items():
            for new, old in enumerate(ids):
                for proj in projs:
                    for suffix in suffixes:
                        a = src.get(f"{prefix.format(l=layer, e=old)}.{proj}.{suffix}")
                        b = dst.get(f"{prefix.format(l=layer, e=new)}.{proj}.{suffix}")
                        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert_export_matches_oracle(fx, pattern, out, k)


def test_quantize_config_json_expert_names_are_rewritten(legacy, tmp_path):
    """A quantize_config.json that names experts goes through the same rewrite as quantization_config."""
    fx, folder = legacy
    pattern = random_pattern(fx)
    kept, dropped = pattern.kept[1][1], next(e for e in range(fx.num_experts) if e not in pattern.kept[1])
    qc = json.loads((folder / "quantize_config.json").read_text())
    names = ["lm_head", f"model.layers.1.block_sparse_moe.experts.{kept}.w2",
             f"model.layers.1.block_sparse_moe.experts.{dropped}.w2"]
    src = variant(fx, tmp_path / "ckpt", config=json.loads((folder / "config.json").read_text()),
                  files={"quantize_config.json": json.dumps({**qc, "modules_to_not_convert": names})})
    out = export(src, pattern, tmp_path / "pruned")
    got = json.loads((out / "quantize_config.json").read_text())
    assert got == {**qc, "modules_to_not_convert": ["lm_head", "model.layers.1.block_sparse_moe.experts.1.w2"]}


LEGACY_REFUSALS = {
    "not JSON": ('{"bits": 4, "group_size": 32,', r"cannot read .*quantize_config.json"),
    "bits 3": (json.dumps({"bits": 3, "group_size": 32, "desc_act": False}), r"quantize_config.json: gptq .*bits 3"),
    "bits 8": (json.dumps({"bits": 8, "group_size": 32, "desc_act": False}), r"quantize_config.json: gptq .*bits 8"),
    "quant_method awq": (json.dumps({"bits": 4, "group_size": 32, "quant_method": "awq"}),
                         r"quantize_config.json declares quant_method 'awq'"),
    "a list": ("[4, 32]", r"quantize_config.json is not a JSON object"),
}


@pytest.mark.parametrize("what", list(LEGACY_REFUSALS))
def test_bad_quantize_config_json_refuses(legacy, what, tmp_path):
    fx, folder = legacy
    text, match = LEGACY_REFUSALS[what]
    bad = variant(fx, tmp_path / "ckpt", config=json.loads((folder / "config.json").read_text()),
                  files={"quantize_config.json": text})
    pattern = random_pattern(fx)
    for call in (lambda: load_slim(bad, pattern), lambda: ExpertPool(bad, 6),
                 lambda: moeprune.profile(bad, PROMPTS), lambda: export(bad, pattern, tmp_path / "out")):
        raises_one_line(call, match)
    assert not (tmp_path / "out").exists()


def test_quantization_config_wins_over_quantize_config_json(hub, tmp_path):
    """Where config.json has a quantization_config, the root file is not read (nor is it by transformers)."""
    fx = hub["mixtral_gptq_no_act_order"]
    folder = variant(fx, tmp_path / "ckpt", files={"quantize_config.json": json.dumps({"bits": 8, "desc_act": True})})
    codec = codec_for_folder(folder)
    assert codec.name == "gptq" and codec.desc_act is False
