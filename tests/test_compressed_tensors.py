"""compressed-tensors checkpoints (pack-quantized int4 with zero points and g_idx; float-quantized FP8
with per-channel scales and static input scales): load_slim, the ExpertPool and profile equal an
oracle built from independently dequantized values, export keeps the format byte for byte and
writes the original per-layer max of static input scales. Fixtures: tests/hub_fixtures.py (F4, F5, F7)."""

import json

import pytest
import torch
from hub_fixtures import (
    IDS,
    assert_close,
    assert_export_matches_oracle,
    assert_pool_matches_oracle,
    assert_profile_matches_oracle,
    ct_config,
    oracle_logits,
    pack_int32_columns,
    qwen3_moe_ct_fp8,
    qwen3_moe_ct_int,
    raises_one_line,
    random_pattern,
    variant,
)

import moeprune
from moeprune import export, load_slim
from moeprune.codecs import codec_for
from moeprune.codecs import compressed_tensors as ct
from moeprune.codecs.compressed_tensors import dequantize_packed
from moeprune.reader import CheckpointReader
from moeprune.serve import ExpertPool

PLAIN_EXPERT = "model.layers.1.mlp.experts.3.down_proj"  # stored BF16 and named in `ignore`
VARIANTS = {
    "int4 symmetric": dict(kind="int"),
    "int4 asymmetric": dict(kind="int", symmetric=False),
    "int4 actorder": dict(kind="int", actorder=True),
    "int4 asymmetric actorder, one expert ignored": dict(kind="int", symmetric=False, actorder=True,
                                                        plain=(PLAIN_EXPERT,)),
    "int8 group 64": dict(kind="int", bits=8, group=64),
    "fp8 dynamic": dict(kind="fp8"),
    "fp8 static": dict(kind="fp8", static=True),
}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    out = {}
    for i, (name, spec) in enumerate(VARIANTS.items()):
        spec = dict(spec)
        kind = spec.pop("kind")
        make = qwen3_moe_ct_int if kind == "int" else qwen3_moe_ct_fp8
        out[name] = make(root / f"v{i}", seed=i, **spec)
    return out


# ---------------------------------------------------------------------------------------- codec
def test_unpack_layout():
    """Column 8j+i in nibble i of word j (value + 8); zero points the same along dim 0; g_idx picks groups."""
    word = 0
    for i, v in enumerate([-8, -1, 0, 7, 1, 2, 3, -3]):  # column i of the row
        word |= (v + 8) << (4 * i)
    packed = torch.tensor([[word - 2**32 if word >= 2**31 else word]], dtype=torch.int32)
    got = dequantize_packed(packed, torch.ones(1, 1), (1, 8), 4, 8)
    assert got.tolist() == [[-8, -1, 0, 7, 1, 2, 3, -3]]
    assert dequantize_packed(packed, torch.ones(1, 1), (1, 5), 4, 8).tolist() == [[-8, -1, 0, 7, 1]]  # padding
    # two groups of 4 columns, scales 1 and 10; zero points (rows packed in one word) 1 and -2 for row 0
    zp = torch.tensor([[1, -2]])
    zp_packed = pack_int32_columns((zp + 8).t(), 4).t()
    got = dequantize_packed(packed, torch.tensor([[1.0, 10.0]]), (1, 8), 4, 4, zp_packed)
    assert got.tolist() == [[-9, -2, -1, 6, 30, 40, 50, -10]]
    g_idx = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.int32)  # groups swapped
    got = dequantize_packed(packed, torch.tensor([[1.0, 10.0]]), (1, 8), 4, 4, zp_packed, g_idx)
    assert got.tolist() == [[-60, 10, 20, 90, 0, 1, 2, -4]]


def test_codec_registry(hub):
    for name, fx in hub.items():
        codec = codec_for(fx.config["quantization_config"])
        assert codec.name == "compressed_tensors" and "compressed-tensors" in codec.describe(), name


# ---------------------------------------------------------------------------------------- load_slim, pool, profile
@pytest.mark.parametrize("name", list(VARIANTS))
def test_load_slim_equals_oracle(hub, name):
    fx = hub[name]
    pattern = random_pattern(fx)
    slim = load_slim(fx.folder, pattern, dtype="float32")
    with torch.no_grad():
        assert_close(slim(IDS).logits, oracle_logits(fx, pattern))
    assert not hasattr(slim.config, "quantization_config")
    # the decoded experts are the oracle's, kept rows only
    oracle = fx.oracle()
    for layer, ids in pattern.kept.items():
        for proj in ("gate_up_proj", "down_proj"):
            p = f"model.layers.{layer}.mlp.experts.{proj}"
            assert torch.equal(slim.get_parameter(p), oracle.get_parameter(p)[ids]), p


def test_pool_equals_oracle(hub):
    fx = hub["int4 asymmetric actorder, one expert ignored"]
    assert_pool_matches_oracle(fx)


@pytest.mark.parametrize("name", ["int4 asymmetric actorder, one expert ignored", "fp8 static"])
def test_profile_decodes_with_moeprune(hub, name):
    fx = hub[name]
    prompts = ["def f(x):\n    return x * 2", "And God said, Let there be light"]
    assert_profile_matches_oracle(fx, prompts)


# ---------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_is_byte_exact(hub, name, tmp_path):
    fx = hub[name]
    pattern = random_pattern(fx)
    out = export(fx.folder, pattern, tmp_path / "pruned")
    k = fx.num_experts // 2
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts"] == k
    static = "input_scale" in json.dumps([k for k in fx.stored])
    copied = 0
    with CheckpointReader(fx.folder) as src, CheckpointReader(out) as dst:
        for layer, ids in pattern.kept.items():
            for new, old in enumerate(ids):
                for key in src.keys():  # noqa: SIM118 - the reader has no __iter__
                    prefix = f"model.layers.{layer}.mlp.experts.{old}."
                    if not key.startswith(prefix):
                        continue
                    copy = f"model.layers.{layer}.mlp.experts.{new}.{key[len(prefix):]}"
                    copied += 1
                    a, b = src.get(key), dst.get(copy)
                    if key.endswith("input_scale"):
                        continue  # the layer's max: test_static_input_scale_keeps_the_layer_max
                    assert a.dtype == b.dtype and a.shape == b.shape, key
                    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), key
            assert f"model.layers.{layer}.mlp.experts.{k}.gate_proj.weight_scale" not in dst
        assert sum(1 for key in dst.keys() if ".mlp.experts." in key) == copied  # noqa: SIM118
    assert static == (name == "fp8 static")
    qc = config["quantization_config"]
    want = fx.config["quantization_config"]
    assert {k: v for k, v in qc.items() if k != "ignore"} == {k: v for k, v in want.items() if k != "ignore"}
    if name.endswith("ignored"):
        kept = pattern.kept[1]
        named = [n for n in qc["ignore"] if ".experts." in n]
        assert named == ([f"model.layers.1.mlp.experts.{kept.index(3)}.down_proj"] if 3 in kept else [])
    # the export, decoded, is the oracle under the pattern
    assert_export_matches_oracle(fx, pattern, out, k)


def test_static_input_scale_keeps_the_layer_max(hub, tmp_path):
    """vLLM serves a layer's experts with the max of their input scales: the export writes the
    original layer's max (per projection) into every kept expert, so pruning never lowers it."""
    fx = hub["fp8 static"]
    pattern = random_pattern(fx)
    out = export(fx.folder, pattern, tmp_path / "pruned")
    lowered = 0
    with CheckpointReader(out) as dst:
        for layer, ids in pattern.kept.items():
            for proj in ("gate_proj", "up_proj", "down_proj"):
                every = torch.stack([fx.stored[f"model.layers.{layer}.mlp.experts.{e}.{proj}.input_scale"]
                                     for e in range(fx.num_experts)])
                kept = every[ids]
                assert len(set(every.flatten().tolist())) == fx.num_experts  # unequal: the test has teeth
                lowered += int(kept.max() < every.max())
                for new in range(len(ids)):
                    got = dst.get(f"model.layers.{layer}.mlp.experts.{new}.{proj}.input_scale")
                    assert got.dtype == torch.float32 and got.shape == (1,)
                    assert torch.equal(got, every.amax(dim=0)), (layer, proj)
        # outside the experts, input scales are copied as they are
        key = "model.layers.0.self_attn.o_proj.input_scale"
        assert torch.equal(dst.get(key), fx.stored[key])
    assert lowered > 0  # some layer's kept experts alone would have served a lower max
    assert "largest input_scale" in (out / "README.md").read_text()


# ---------------------------------------------------------------------------------------- refusals
def _fp8_weights(**kw):
    return {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False, **kw}


_INT4 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": True, "dynamic": False}
CONFIG_REFUSALS = {
    "sparsity": {**ct_config("pack-quantized", _INT4), "sparsity_config": {"format": "sparse-24-bitmask"}},
    "'marlin-24'": ct_config("marlin-24", _INT4),
    "'nvfp4-pack-quantized'": ct_config("nvfp4-pack-quantized", {**_INT4, "num_bits": 4, "type": "float"}),
    "'naive-quantized'": ct_config("naive-quantized", _INT4),
    "int weights of 2 bits": ct_config("pack-quantized", {**_INT4, "num_bits": 2}),
    "strategy 'block'": ct_config("float-quantized", _fp8_weights(strategy="block")),
    "mixed-precision": {**ct_config("pack-quantized", _INT4),
                        "config_groups": {"a": {"format": "pack-quantized", "weights": _INT4},
                                          "b": {"format": "pack-quantized", "weights": {**_INT4, "num_bits": 8}}}},
    "KV-cache": {**ct_config("float-quantized", _fp8_weights()), "kv_cache_scheme": {"num_bits": 8}},
    "transforms": {**ct_config("pack-quantized", _INT4), "transform_config": {"config_groups": {"r": {}}}},
    "quantization_status 'frozen'": {**ct_config("pack-quantized", _INT4), "quantization_status": "frozen"},
    "quantized input_activations": ct_config("pack-quantized", _INT4, {"num_bits": 8, "type": "int"}),
    "output_activations": {**ct_config("pack-quantized", _INT4),
                           "config_groups": {"g": {"format": "pack-quantized", "weights": _INT4,
                                                   "output_activations": {"num_bits": 8}}}},
}


@pytest.mark.parametrize("what", list(CONFIG_REFUSALS))
def test_unsupported_compressed_tensors_refuse_everywhere(hub, what, tmp_path):
    fx = hub["int4 symmetric"]
    folder = variant(fx, tmp_path / "ckpt", config={**fx.config, "quantization_config": CONFIG_REFUSALS[what]})
    pattern = random_pattern(fx)
    for call in (lambda: load_slim(folder, pattern), lambda: ExpertPool(folder, 6),
                 lambda: moeprune.profile(folder, ["hello"]), lambda: export(folder, pattern, tmp_path / "out")):
        msg = raises_one_line(call, "compressed-tensors")
        assert what.split(" (")[0].strip("'") in msg, msg
    assert not (tmp_path / "out").exists()


def test_broken_checkpoints_refuse(hub, tmp_path):
    sym, asym, act, fp8 = hub["int4 symmetric"], hub["int4 asymmetric"], hub["int4 actorder"], hub["fp8 static"]
    patterns = {id(fx): random_pattern(fx) for fx in (sym, asym, act, fp8)}
    e = patterns[id(sym)].kept[1][0]
    assert all(p.kept[1][0] == e for p in patterns.values())  # same seed: the same kept experts
    key = f"model.layers.1.mlp.experts.{e}.down_proj.weight"
    cases = [
        (sym, {f"{key}_scale": None}, f"has no {key}_scale"),
        (sym, {f"{key}_scale": sym.stored[f"{key}_scale"][:, :1]}, "in groups of 32"),
        (sym, {f"{key}_zero_point": asym.stored[f"{key}_zero_point"]}, "symmetric: inconsistent"),
        (asym, {f"{key}_zero_point": None}, f"has no {key}_zero_point"),
        (act, {f"{key}_g_idx": None}, "actorder is 'group'"),
        (act, {f"{key}_g_idx": torch.full_like(act.stored[f"{key}_g_idx"], 7)}, "names groups outside"),
        (sym, {f"{key}_shape": torch.tensor([64, 72])}, "weight_packed of"),
    ]
    for i, (fx, tensors, match) in enumerate(cases):
        folder = variant(fx, tmp_path / f"c{i}", tensors=tensors)
        raises_one_line(lambda folder=folder, fx=fx: load_slim(folder, patterns[id(fx)]), match)
    pattern = patterns[id(fp8)]
    for i, (tensors, match) in enumerate([({f"{key[:-6]}input_scale": None}, "has no .*input_scale"),
                                          ({f"{key}_scale": fp8.stored[f"{key}_scale"][:2]}, "per-channel scale")]):
        folder = variant(fp8, tmp_path / f"f{i}", tensors=tensors)
        raises_one_line(lambda folder=folder: load_slim(folder, pattern), match)
        raises_one_line(lambda folder=folder: export(folder, pattern, tmp_path / "out"), match)
    dyn = hub["fp8 dynamic"]
    folder = variant(dyn, tmp_path / "dyn", tensors={"model.layers.0.self_attn.o_proj.input_scale": torch.ones(1)})
    raises_one_line(lambda: load_slim(folder, random_pattern(dyn)), "input activations are dynamic")
    assert not (tmp_path / "out").exists()


def test_quantized_router_refuses(hub, tmp_path):
    """An `ignore` list that does not name the router: the router is stored packed. Refused, never misread."""
    fx = hub["int4 symmetric"]
    router = "model.layers.0.mlp.gate.weight"
    packed = pack_int32_columns(torch.randint(0, 16, (8, 64)), 4)
    folder = variant(fx, tmp_path / "ckpt", config={**fx.config, "quantization_config": {
        **fx.config["quantization_config"], "ignore": ["lm_head"]}},
        tensors={router: None, f"{router}_packed": packed, f"{router}_scale": torch.ones(8, 2, dtype=torch.bfloat16),
                 f"{router}_shape": torch.tensor([8, 64])})
    pattern = random_pattern(fx)
    for call in (lambda: load_slim(folder, pattern), lambda: export(folder, pattern, tmp_path / "out")):
        raises_one_line(call, "router tensor .*stored quantized")


# ---------------------------------------------------------------------------------------- teeth
@pytest.mark.parametrize("broken", ["nibbles reversed", "zero point ignored", "g_idx ignored", "fp8 scale ignored"])
def test_the_oracle_catches_a_broken_codec(hub, monkeypatch, broken):
    real_unpack, real_deq = ct._unpack_last, ct.dequantize_packed
    if broken == "nibbles reversed":
        monkeypatch.setattr(ct, "_unpack_last", lambda p, bits: real_unpack(p, bits).unflatten(-1, (-1, 32 // bits))
                            .flip(-1).flatten(-2))
    elif broken == "zero point ignored":
        monkeypatch.setattr(ct, "dequantize_packed", lambda *a, **kw: real_deq(*a[:5]))
    elif broken == "g_idx ignored":
        monkeypatch.setattr(ct, "dequantize_packed", lambda *a, **kw: real_deq(*a[:6]))
    else:
        real_read = ct.CompressedTensorsCodec.read_into

        def no_scale(self, reader, key, out, rows=None):
            real_read(self, reader, key, out, rows)
            if self.format == ct.FLOAT and self.encoded(reader, key):
                out.copy_(reader.get(key).float())
        monkeypatch.setattr(ct.CompressedTensorsCodec, "read_into", no_scale)
    fx = hub[{"nibbles reversed": "int4 symmetric", "zero point ignored": "int4 asymmetric",
              "g_idx ignored": "int4 actorder", "fp8 scale ignored": "fp8 dynamic"}[broken]]
    pattern = random_pattern(fx)
    with torch.no_grad():
        got = load_slim(fx.folder, pattern, dtype="float32")(IDS).logits
    assert (got - oracle_logits(fx, pattern)).abs().max().item() > 1e-2


def test_byte_copied_input_scales_would_be_caught(hub, monkeypatch, tmp_path):
    """Without the layer max (a plain byte copy of each kept expert's input_scale), the test above fails."""
    monkeypatch.setattr(ct.CompressedTensorsCodec, "export_tensor", lambda self, reader, key, siblings: None)
    with pytest.raises(AssertionError):
        test_static_input_scale_keeps_the_layer_max(hub, tmp_path)
