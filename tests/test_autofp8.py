"""AutoFP8 per-tensor FP8 (`quant_method: fp8` without `weight_block_size`; neuralmagic
Mixtral-8x7B-Instruct-v0.1-FP8): load_slim, the ExpertPool and profile equal an oracle built from
independently dequantized values; export copies kept experts' `weight`/`weight_scale` byte for
byte, writes the original per-layer max of the static `input_scale`s into every kept expert and
rewrites `ignored_layers` through the old->new expert map; what the codec does not decode refuses
in one line. Fixture: tests/hub_fixtures.py (F7, `mixtral_autofp8`)."""

import json

import pytest
import torch
from hub_fixtures import (
    AUTOFP8_IGNORED_EXPERT,
    FP8_CONFIG,
    IDS,
    assert_close,
    assert_export_matches_oracle,
    assert_pool_matches_oracle,
    assert_profile_matches_oracle,
    mixtral_autofp8,
    oracle_logits,
    raises_one_line,
    random_pattern,
    variant,
)

import moeprune
from moeprune import Pattern, export, load_slim
from moeprune.codecs import codec_for, codec_for_folder
from moeprune.codecs import compressed_tensors as ct
from moeprune.codecs.fp8_block import Fp8BlockCodec
from moeprune.codecs.fp8_tensor import Fp8TensorCodec
from moeprune.fingerprint import model_fingerprint
from moeprune.reader import CheckpointReader
from moeprune.serve import ExpertPool

PROMPTS = ["def f(x):\n    return x * 2", "And God said, Let there be light"]
EXPERTS = "model.layers.{l}.block_sparse_moe.experts.{e}"
PROJS = ("w1", "w2", "w3")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("autofp8")
    return {"static": mixtral_autofp8(root / "Mixtral-FP8"),
            "dynamic": mixtral_autofp8(root / "Mixtral-FP8-dynamic", seed=1, static=False)}


def pattern_of(fx, kept: dict[int, list[int]]) -> Pattern:
    return Pattern(kept, {"num_experts": fx.num_experts, "fingerprint": model_fingerprint(fx.oracle())})


# ---------------------------------------------------------------------------------------- codec
def test_codec_registry(hub):
    static = codec_for_folder(hub["static"].folder)
    assert isinstance(static, Fp8TensorCodec) and static.static_input and static.name == "fp8_tensor"
    assert "per-tensor" in static.describe() and "static input_scale" in static.describe()
    dynamic = codec_for_folder(hub["dynamic"].folder)
    assert isinstance(dynamic, Fp8TensorCodec) and not dynamic.static_input
    # the same decoding as compressed-tensors' float "tensor" strategy: one implementation
    assert isinstance(static, ct.CompressedTensorsCodec) and static.strategy == "tensor"
    assert codec_for({"quant_method": "fp8"}).static_input is False  # activation_scheme defaults to dynamic
    assert isinstance(codec_for(FP8_CONFIG), Fp8BlockCodec)  # block FP8 unchanged


# ---------------------------------------------------------------------------------------- load_slim, pool, profile
@pytest.mark.parametrize("name", ["static", "dynamic"])
def test_load_slim_equals_oracle(hub, name):
    fx = hub[name]
    pattern = random_pattern(fx)
    slim = load_slim(fx.folder, pattern, dtype="float32")
    with torch.no_grad():
        assert_close(slim(IDS).logits, oracle_logits(fx, pattern))
    assert not hasattr(slim.config, "quantization_config")  # it holds decoded floats
    assert moeprune.get_adapter(slim).num_experts(slim.config) == fx.num_experts // 2
    oracle = fx.oracle()
    for layer, ids in pattern.kept.items():  # the decoded experts are the oracle's, kept rows only
        for proj in ("gate_up_proj", "down_proj"):
            p = f"model.layers.{layer}.mlp.experts.{proj}"
            assert torch.equal(slim.get_parameter(p), oracle.get_parameter(p)[ids]), p


def test_pool_equals_oracle(hub):
    assert_pool_matches_oracle(hub["static"])


def test_profile_decodes_with_moeprune(hub):
    assert_profile_matches_oracle(hub["static"], PROMPTS)


# ---------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("name", ["static", "dynamic"])
def test_export_is_byte_exact(hub, name, tmp_path):
    fx = hub[name]
    pattern = random_pattern(fx)
    out = export(fx.folder, pattern, tmp_path / "pruned")
    k = fx.num_experts // 2
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == k
    copied = 0
    with CheckpointReader(fx.folder) as src, CheckpointReader(out) as dst:
        for layer, ids in pattern.kept.items():
            for new, old in enumerate(ids):
                for proj in PROJS:
                    for suffix in ("weight", "weight_scale", "input_scale"):
                        key = f"{EXPERTS.format(l=layer, e=old)}.{proj}.{suffix}"
                        copy = f"{EXPERTS.format(l=layer, e=new)}.{proj}.{suffix}"
                        if key not in src:  # the ignored BF16 expert has only a weight
                            assert copy not in dst
                            continue
                        copied += 1
                        if suffix == "input_scale":
                            continue  # the layer's max: test_static_input_scale_keeps_the_layer_max
                        a, b = src.get(key), dst.get(copy)
                        assert a.dtype == b.dtype and a.shape == b.shape, key
                        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), key
            assert f"{EXPERTS.format(l=layer, e=k)}.w1.weight" not in dst
        assert sum(1 for key in dst.keys() if ".experts." in key) == copied  # noqa: SIM118
        assert dst.dtype(f"{EXPERTS.format(l=0, e=0)}.w1.weight") == torch.float8_e4m3fn
    assert ("input_scale" in json.dumps(list(fx.stored))) == (name == "static")
    qc, want = config["quantization_config"], fx.config["quantization_config"]
    assert {k: v for k, v in qc.items() if k != "ignored_layers"} == \
        {k: v for k, v in want.items() if k != "ignored_layers"}
    # the export decodes as the oracle under the pattern
    assert_export_matches_oracle(fx, pattern, out, k)


def test_static_input_scale_keeps_the_layer_max(hub, tmp_path):
    """vLLM serves a layer's experts with the max of their input scales: the export writes the
    original layer's max (per projection) into every kept expert, so pruning never lowers it."""
    fx = hub["static"]
    pattern = random_pattern(fx)
    out = export(fx.folder, pattern, tmp_path / "pruned")
    lowered = 0
    with CheckpointReader(out) as dst:
        for layer, ids in pattern.kept.items():
            for proj in PROJS:
                scales = {e: fx.stored[f"{EXPERTS.format(l=layer, e=e)}.{proj}.input_scale"]
                          for e in range(fx.num_experts) if f"{EXPERTS.format(l=layer, e=e)}.{proj}.input_scale"
                          in fx.stored}
                every = torch.stack(list(scales.values()))
                assert len(set(every.tolist())) == len(scales)  # unequal: the test has teeth
                lowered += int(max(scales[e] for e in ids if e in scales) < every.max())
                for new, old in enumerate(ids):
                    key = f"{EXPERTS.format(l=layer, e=new)}.{proj}.input_scale"
                    if old not in scales:
                        assert key not in dst
                        continue
                    got = dst.get(key)
                    assert got.dtype == torch.float32 and got.shape == ()
                    assert torch.equal(got, every.max()), (layer, proj)
        for key in ("model.layers.0.self_attn.o_proj.input_scale", "model.layers.1.self_attn.q_proj.input_scale"):
            assert torch.equal(dst.get(key), fx.stored[key])  # outside the experts: copied as they are
    assert lowered > 0  # some layer's kept experts alone would have served a lower max
    assert "largest input_scale" in (out / "README.md").read_text()


@pytest.mark.parametrize("keep_ignored", [True, False])
def test_ignored_layers_are_rewritten(hub, tmp_path, keep_ignored):
    """`ignored_layers` names expert 3 of layer 1: renumbered when it is kept, removed when it is dropped;
    the routers' and lm_head's names stay."""
    fx = hub["static"]
    kept = {0: [0, 2, 5, 7], 1: [1, 3, 4, 6] if keep_ignored else [0, 2, 5, 7]}
    out = export(fx.folder, pattern_of(fx, kept), tmp_path / "pruned")
    got = json.loads((out / "config.json").read_text())["quantization_config"]["ignored_layers"]
    source = fx.config["quantization_config"]["ignored_layers"]
    assert AUTOFP8_IGNORED_EXPERT in source
    others = [n for n in source if n != AUTOFP8_IGNORED_EXPERT]
    assert others == ["lm_head", "model.layers.0.block_sparse_moe.gate", "model.layers.1.block_sparse_moe.gate"]
    assert got == (others + ["model.layers.1.block_sparse_moe.experts.1.w2"] if keep_ignored else others)
    with CheckpointReader(out) as dst:  # the renamed entry names the BF16 weight that moved with it
        assert (dst.dtype("model.layers.1.block_sparse_moe.experts.1.w2.weight") == torch.bfloat16) == keep_ignored


# ---------------------------------------------------------------------------------------- refusals
CONFIG_REFUSALS = {
    "fmt 'e5m2'": {"fmt": "e5m2"},
    "activation_scheme 'per-token'": {"activation_scheme": "per-token"},
    "kv_cache_scheme": {"kv_cache_scheme": "static"},
}


@pytest.mark.parametrize("what", list(CONFIG_REFUSALS))
def test_unsupported_fp8_configs_refuse_everywhere(hub, what, tmp_path):
    fx = hub["static"]
    qc = {**fx.config["quantization_config"], **CONFIG_REFUSALS[what]}
    folder = variant(fx, tmp_path / "ckpt", config={**fx.config, "quantization_config": qc})
    pattern = random_pattern(fx)
    for call in (lambda: load_slim(folder, pattern), lambda: ExpertPool(folder, 6),
                 lambda: moeprune.profile(folder, PROMPTS), lambda: export(folder, pattern, tmp_path / "out")):
        raises_one_line(call, what)
    assert not (tmp_path / "out").exists()


def test_broken_checkpoints_refuse(hub, tmp_path):
    fx, dyn = hub["static"], hub["dynamic"]
    pattern = random_pattern(fx)
    x = f"{EXPERTS.format(l=1, e=pattern.kept[1][0])}.w1"
    codes = fx.stored[f"{x}.weight"]
    cases = {  # tensors replaced (None: removed) -> what the one-line refusal says
        "per-channel scale": ({f"{x}.weight_scale": torch.full((codes.shape[0], 1), 1e-3)},
                              r"weight_scale .*has shape \[96, 1\]; a per-tensor scale needs \[\]"),
        "scale grid": ({f"{x}.weight_scale": torch.full((2, 2), 1e-3)}, r"has shape \[2, 2\]; a per-tensor scale"),
        "no scale": ({f"{x}.weight_scale": None}, f"has no {x}.weight_scale"),
        "no input_scale": ({f"{x}.input_scale": None}, f"has no {x}.input_scale"),
        "input_scale of the wrong shape": ({f"{x}.input_scale": torch.ones(2)}, "static per-tensor input scale"),
        "int scale": ({f"{x}.weight_scale": torch.tensor(1, dtype=torch.int32)}, "weight_scale .*int32"),
        "e5m2 codes": ({f"{x}.weight": codes.float().to(torch.float8_e5m2)}, "float8_e5m2"),
        "block scales": ({f"{x}.weight_scale_inv": torch.ones(1, 1)}, "without weight_block_size"),
    }
    for name, (tensors, match) in cases.items():
        folder = variant(fx, tmp_path / name.replace(" ", "_"), tensors=tensors)
        raises_one_line(lambda folder=folder: load_slim(folder, pattern), match)
        raises_one_line(lambda folder=folder: export(folder, pattern, tmp_path / "out"), match)
    # an input scale under dynamic activations would be dropped silently by a loader: refused
    y = f"{EXPERTS.format(l=0, e=random_pattern(dyn).kept[0][0])}.w2"
    folder = variant(dyn, tmp_path / "dyn", tensors={f"{y}.input_scale": torch.tensor(0.5)})
    raises_one_line(lambda: load_slim(folder, random_pattern(dyn)), "input activations are dynamic")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- teeth
def test_the_oracle_catches_an_ignored_scale(hub, monkeypatch):
    """Decoding the FP8 codes without their per-tensor scale leaves the oracle."""
    real_read = ct.CompressedTensorsCodec.read_into

    def no_scale(self, reader, key, out, rows=None):
        real_read(self, reader, key, out, rows)
        if self.encoded(reader, key):
            out.copy_(reader.get(key).float())
    monkeypatch.setattr(ct.CompressedTensorsCodec, "read_into", no_scale)
    fx = hub["static"]
    pattern = random_pattern(fx)
    with torch.no_grad():
        got = load_slim(fx.folder, pattern, dtype="float32")(IDS).logits
    assert (got - oracle_logits(fx, pattern)).abs().max().item() > 1e-2


def test_byte_copied_input_scales_would_be_caught(hub, monkeypatch, tmp_path):
    """Without the layer max (a plain byte copy of each kept expert's input_scale), the test above fails."""
    monkeypatch.setattr(ct.CompressedTensorsCodec, "export_tensor", lambda self, reader, key, siblings: None)
    with pytest.raises(AssertionError):
        test_static_input_scale_keeps_the_layer_max(hub, tmp_path)
