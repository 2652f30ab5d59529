"""GPT-OSS MXFP4 checkpoints (fused `_blocks`/`_scales`/biases): load_slim and the ExpertPool equal
an oracle built from transformers' own dequantization, and export keeps the format byte for byte.
Fixture: tests/hub_fixtures.py (F3)."""

import json

import pytest
import torch
from hub_fixtures import (
    IDS,
    MXFP4_CONFIG,
    assert_close,
    assert_export_matches_oracle,
    assert_pool_matches_oracle,
    assert_profile_matches_oracle,
    gpt_oss_mxfp4,
    oracle_logits,
    raises_one_line,
    random_pattern,
    variant,
)

import moeprune
from moeprune import export, load_slim
from moeprune.codecs import codec_for
from moeprune.codecs import mxfp4 as mxfp4_module
from moeprune.codecs.mxfp4 import FP4_VALUES, dequantize_mxfp4
from moeprune.reader import CheckpointReader

PROJS = ("gate_up_proj", "down_proj")


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return gpt_oss_mxfp4(tmp_path_factory.mktemp("hub") / "gpt-oss-mxfp4")


# ---------------------------------------------------------------------------------------- codec
def test_dequantize_layout():
    """Low nibble first, one E8M0 scale per 32 values, stored rows become in-memory columns."""
    blocks = torch.zeros(2, 1, 16, dtype=torch.uint8)  # 2 stored rows, one group
    blocks[0, 0, 0] = 0x72  # element 0 = code 2 (1.0), element 1 = code 7 (6.0)
    blocks[1, 0, 15] = 0x9F  # element 30 = code 15 (-6.0), element 31 = code 9 (-0.5)
    scales = torch.tensor([[127], [129]], dtype=torch.uint8)  # 2**0 and 2**2
    got = dequantize_mxfp4(blocks, scales)
    assert got.shape == (32, 2)
    want = torch.zeros(32, 2)
    want[0, 0], want[1, 0], want[30, 1], want[31, 1] = 1.0, 6.0, -24.0, -2.0
    assert torch.equal(got, want)
    assert torch.equal(dequantize_mxfp4(torch.arange(16, dtype=torch.uint8).view(1, 1, 16) * 17,
                                        torch.tensor([[127]], dtype=torch.uint8))[::2, 0],
                       torch.tensor(FP4_VALUES))


def test_dequantize_equals_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(0, 255, (3, 40, 4), generator=gen, dtype=torch.uint8)  # all but the NaN code
    assert torch.equal(dequantize_mxfp4(blocks, scales), convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))


def test_codec_registry():
    codec = codec_for(MXFP4_CONFIG)
    assert codec.name == "mxfp4" and "mxfp4" in codec.describe()


# ---------------------------------------------------------------------------------------- load_slim, pool
def test_load_slim_equals_oracle(fx):
    pattern = random_pattern(fx)
    slim = load_slim(fx.folder, pattern, dtype="float32", record_reads=True)
    with torch.no_grad():
        got = slim(IDS).logits
    assert_close(got, oracle_logits(fx, pattern))
    assert not hasattr(slim.config, "quantization_config")  # it holds decoded floats
    assert moeprune.get_adapter(slim).num_experts(slim.config) == fx.num_experts // 2
    # reads: every tensor once, and of the expert tensors only the kept rows (blocks, scales, biases)
    want_reads = []
    with CheckpointReader(fx.folder) as reader:
        for key in reader.keys():  # noqa: SIM118 - the reader has no __iter__
            e = reader._entry(key)
            if ".mlp.experts." not in key:
                want_reads.append((e.file.name, e.start, e.nbytes))
                continue
            layer = int(key.split(".")[2])
            row = e.nbytes // e.shape[0]
            want_reads += [(e.file.name, e.start + r * row, row) for r in pattern.kept[layer]]
    got_reads = sorted(slim.moeprune_load_report.reads)
    # consecutive kept rows may be read in one go: compare byte ranges
    assert _ranges(got_reads) == _ranges(sorted(want_reads))


def _ranges(reads):
    out = []
    for f, start, n in reads:
        if out and out[-1][0] == f and out[-1][2] == start:
            out[-1][2] += n
        else:
            out.append([f, start, start + n])
    return out


def test_load_slim_bf16(fx):
    pattern = random_pattern(fx)
    slim = load_slim(fx.folder, pattern, dtype="bfloat16")
    oracle = fx.oracle()
    # decoded straight into bf16: the oracle's float32 values, rounded once (logits would differ
    # by more than rounding wherever bf16 flips a top-k choice)
    for layer, ids in pattern.kept.items():
        for proj in PROJS:
            name = f"model.layers.{layer}.mlp.experts.{proj}"
            got = slim.get_parameter(name)
            assert got.dtype == torch.bfloat16
            assert torch.equal(got, oracle.get_parameter(name)[ids].to(torch.bfloat16))


def test_pool_equals_oracle(fx):
    assert_pool_matches_oracle(fx)


# ---------------------------------------------------------------------------------------- profile
def test_profile_decodes_with_moeprune(fx):
    """profile(path) decodes the experts through moeprune's codec (never transformers' MXFP4 kernels,
    which bypass the router module), with the fingerprint of the dequantized sibling."""
    prompts = ["def f(x):\n    return x * 2", "And God said, Let there be light"]
    assert_profile_matches_oracle(fx, prompts)


# ---------------------------------------------------------------------------------------- export
def test_export_is_byte_exact(fx, tmp_path):
    pattern = random_pattern(fx)
    out = export(fx.folder, pattern, tmp_path / "pruned")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == fx.config["quantization_config"]
    k = fx.num_experts // 2
    assert config["num_local_experts"] == k
    with CheckpointReader(fx.folder) as src, CheckpointReader(out) as dst:
        for layer, ids in pattern.kept.items():
            index = torch.as_tensor(ids)
            for proj in PROJS:
                for suffix in ("_blocks", "_scales", "_bias"):
                    key = f"model.layers.{layer}.mlp.experts.{proj}{suffix}"
                    a, b = src.get(key).index_select(0, index), dst.get(key)
                    assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), key
                assert f"model.layers.{layer}.mlp.experts.{proj}" not in dst  # stays quantized
    # the export, decoded, is the oracle under the pattern
    assert_export_matches_oracle(fx, pattern, out, k)


def test_export_reloads_in_transformers(fx, tmp_path):
    """Vanilla transformers on CPU dequantizes the exported MXFP4 experts itself: same logits."""
    from transformers import AutoModelForCausalLM

    pattern = random_pattern(fx)
    out = export(fx.folder, pattern, tmp_path / "pruned")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert_close(model(IDS).logits, oracle_logits(fx, pattern))


# ---------------------------------------------------------------------------------------- refusals
def test_broken_checkpoints_refuse(fx, tmp_path):
    pattern = random_pattern(fx)
    key = "model.layers.1.mlp.experts.down_proj"
    folder = variant(fx, tmp_path / "no-scales", tensors={f"{key}_scales": None})
    for call in (lambda: load_slim(folder, pattern), lambda: export(folder, pattern, tmp_path / "out")):
        raises_one_line(call, f"has no {key}_scales")
    bad = fx.stored[f"{key}_scales"][:, :, :1]
    folder = variant(fx, tmp_path / "grid", tensors={f"{key}_scales": bad})
    raises_one_line(lambda: load_slim(folder, pattern), "need one scale a group")
    nan = fx.stored[f"{key}_scales"].clone()
    nan[pattern.kept[1][0], 0, 0] = 255
    folder = variant(fx, tmp_path / "nan", tensors={f"{key}_scales": nan})
    raises_one_line(lambda: load_slim(folder, pattern), "NaN")
    # codes no mxfp4 checkpoint holds
    attn = "model.layers.0.self_attn.q_proj.weight"
    folder = variant(fx, tmp_path / "fp8", tensors={attn: fx.stored[attn].to(torch.float8_e4m3fn)})
    raises_one_line(lambda: load_slim(folder, pattern), "float8_e4m3fn; mxfp4")
    assert not (tmp_path / "out").exists()


def test_without_quantization_config_refuses(fx, tmp_path):
    """U8 blocks never pass for a plain checkpoint's weights."""
    config = {k: v for k, v in fx.config.items() if k != "quantization_config"}
    folder = variant(fx, tmp_path / "plain", config=config)
    raises_one_line(lambda: load_slim(folder, random_pattern(fx)), "stores the experts of layer 0 as .*_blocks")


# ---------------------------------------------------------------------------------------- teeth
@pytest.mark.parametrize("broken", ["nibbles swapped", "not transposed", "scale skipped"])
def test_the_oracle_catches_a_broken_codec(fx, monkeypatch, broken):
    real = mxfp4_module.dequantize_mxfp4

    def wrong(blocks, scales):
        if broken == "nibbles swapped":
            return real((blocks >> 4) | (blocks << 4), scales)
        if broken == "not transposed":
            out = real(blocks, scales)  # the stored [out, in] order read as if it were [in, out]
            return out.transpose(-1, -2).contiguous().view(out.shape)
        return real(blocks, torch.full_like(scales, 127))

    monkeypatch.setattr(mxfp4_module, "dequantize_mxfp4", wrong)
    pattern = random_pattern(fx)
    with torch.no_grad():
        got = load_slim(fx.folder, pattern, dtype="float32")(IDS).logits
    assert (got - oracle_logits(fx, pattern)).abs().max().item() > 1e-2
