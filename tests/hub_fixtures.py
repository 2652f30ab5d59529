"""Tiny checkpoints laid out as the hub ships them (../shared/notes/hub-formats.md, F1 to F3).

Written by hand, not by `save_pretrained`: `config.json` in the hub's own spelling (`num_experts`
for Qwen, `n_routed_experts` for DeepSeek), tensors under the hub's keys, quantized Linears as
F8_E4M3 codes with a `weight_scale_inv` per 128x128 block (GPT-OSS: MXFP4 expert `_blocks`/`_scales`),
routers and norms in BF16.

Each fixture knows the float32 value of every tensor the model uses (`dense`), computed here
block by block, independently of moeprune's codec. Its oracle is the model transformers builds
from those values alone (an unquantized float32 checkpoint), used under the adapter's keep-mask.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny import char_tokenizer

import moeprune
from moeprune import MoepruneError, Pattern
from moeprune.fingerprint import model_fingerprint
from moeprune.hooks import keep_mask

BLOCK = 128
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]}


def block_values(codes: torch.Tensor, scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """float32 values of FP8 `codes` [R, C]: each block times its scale; edge blocks are partial."""
    out = torch.empty(codes.shape, dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rows, cols] = codes[rows, cols].float() * scale[i, j].float()
    return out


@dataclass
class Fixture:
    """A written checkpoint: `folder`, its `config` (as written), `dense` (hub key -> the float32
    value the model must hold), `quantized` (keys stored as FP8), `extra` (keys a loader skips)."""

    folder: Path
    config: dict
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    stored: dict[str, torch.Tensor] = field(default_factory=dict)
    quantized: set[str] = field(default_factory=set)
    extra: set[str] = field(default_factory=set)
    _oracle: object = None

    @property
    def num_experts(self) -> int:
        return (self.config.get("num_experts") or self.config.get("n_routed_experts")
                or self.config.get("num_local_experts"))

    def oracle(self):
        """transformers' model of the dense values (float32, no quantization), built once."""
        if self._oracle is None:
            from transformers import AutoModelForCausalLM

            folder = self.folder.parent / f"{self.folder.name}-oracle"
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir()
            config = {k: v for k, v in self.config.items() if k not in ("quantization_config", "auto_map")}
            config["torch_dtype"] = "float32"
            (folder / "config.json").write_text(json.dumps(config, indent=2))
            save_file({k: v.contiguous() for k, v in self.dense.items()}, str(folder / "model.safetensors"))
            self._oracle = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return self._oracle


class _Writer:
    def __init__(self, seed: int, scale_dtype: torch.dtype):
        self.gen = torch.Generator().manual_seed(seed)
        self.scale_dtype = scale_dtype
        self.fx: Fixture | None = None

    def fp8(self, key: str, rows: int, cols: int, extra: bool = False) -> None:
        """A quantized Linear weight: FP8 codes (up to +-448) and one positive scale per block."""
        codes = (torch.randn(rows, cols, generator=self.gen) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        grid = (math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))
        # real weights are ~0.02; scales differ per block so a misplaced block shows
        scale = ((torch.rand(grid, generator=self.gen) * 1.5 + 0.5) * (0.02 / 64)).to(self.scale_dtype)
        self._put(key, codes, block_values(codes, scale), extra)
        self.fx.stored[f"{key}_scale_inv"] = scale
        self.fx.quantized.add(key)
        if extra:
            self.fx.extra.add(f"{key}_scale_inv")

    def plain(self, key: str, shape: tuple[int, ...], std: float, mean: float = 0.0,
              dtype: torch.dtype = torch.bfloat16, extra: bool = False) -> None:
        value = (torch.randn(shape, generator=self.gen) * std + mean).to(dtype)
        self._put(key, value, value.float(), extra)

    def _put(self, key: str, stored: torch.Tensor, value: torch.Tensor, extra: bool) -> None:
        self.fx.stored[key] = stored
        if extra:
            self.fx.extra.add(key)
        else:
            self.fx.dense[key] = value

    def save(self, shards: int = 1) -> Fixture:
        fx = self.fx
        fx.folder.mkdir(parents=True, exist_ok=True)
        (fx.folder / "config.json").write_text(json.dumps(fx.config, indent=2))
        tok = char_tokenizer()
        tok.save_pretrained(fx.folder)
        (fx.folder / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": fx.config["bos_token_id"], "eos_token_id": fx.config["eos_token_id"]}))
        keys = list(fx.stored)
        if shards == 1:
            save_file({k: fx.stored[k].contiguous() for k in keys}, str(fx.folder / "model.safetensors"))
            return fx
        size = math.ceil(len(keys) / shards)
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = keys[i * size:(i + 1) * size]
            save_file({k: fx.stored[k].contiguous() for k in part}, str(fx.folder / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, name))
        (fx.folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in fx.stored.values())},
             "weight_map": weight_map}, indent=2))
        return fx


def deepseek_v3_fp8(folder: Path, seed: int = 0) -> Fixture:
    """F1: DeepSeek-V3/R1 FP8 with its MTP layer (index num_hidden_layers), sharded in two files.
    kv_a_proj_with_mqa has 576 rows: 4.5 blocks, so its scale grid has 5 rows."""
    H, V, E, I_MOE, I_DENSE, LAYERS = 256, 128, 16, 128, 384, 3
    heads, q_rank, kv_rank, rope, nope, v_dim = 2, 64, 512, 64, 64, 64
    config = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                     "AutoModel": "modeling_deepseek.DeepseekV3Model",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
        "bos_token_id": 1,
        "eos_token_id": 2,
        "ep_size": 1,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": H,
        "initializer_range": 0.02,
        "intermediate_size": I_DENSE,
        "kv_lora_rank": kv_rank,
        "max_position_embeddings": 256,
        "model_type": "deepseek_v3",
        "moe_intermediate_size": I_MOE,
        "moe_layer_freq": 1,
        "n_group": 4,
        "n_routed_experts": E,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": heads,
        "num_experts_per_tok": 4,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": heads,
        "num_nextn_predict_layers": 1,
        "q_lora_rank": q_rank,
        "qk_nope_head_dim": nope,
        "qk_rope_head_dim": rope,
        "quantization_config": dict(FP8_CONFIG),
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "tie_word_embeddings": False,
        "topk_group": 2,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1",
        "use_cache": True,
        "v_head_dim": v_dim,
        "vocab_size": V,
    }
    w = _Writer(seed, torch.float32)
    w.fx = Fixture(Path(folder), config)
    w.plain("model.embed_tokens.weight", (V, H), 0.5)
    for i in range(LAYERS + 1):  # the last one is the MTP layer
        mtp = i == LAYERS
        p = f"model.layers.{i}"
        if mtp:
            w.plain(f"{p}.embed_tokens.weight", (V, H), 0.5, extra=True)
            w.plain(f"{p}.enorm.weight", (H,), 0.1, 1.0, extra=True)
            w.plain(f"{p}.hnorm.weight", (H,), 0.1, 1.0, extra=True)
            w.plain(f"{p}.eh_proj.weight", (H, 2 * H), 0.02, extra=True)
        w.fp8(f"{p}.self_attn.q_a_proj.weight", q_rank, H, extra=mtp)
        w.plain(f"{p}.self_attn.q_a_layernorm.weight", (q_rank,), 0.1, 1.0, extra=mtp)
        w.fp8(f"{p}.self_attn.q_b_proj.weight", heads * (nope + rope), q_rank, extra=mtp)
        w.fp8(f"{p}.self_attn.kv_a_proj_with_mqa.weight", kv_rank + rope, H, extra=mtp)
        w.plain(f"{p}.self_attn.kv_a_layernorm.weight", (kv_rank,), 0.1, 1.0, extra=mtp)
        w.fp8(f"{p}.self_attn.kv_b_proj.weight", heads * (nope + v_dim), kv_rank, extra=mtp)
        w.fp8(f"{p}.self_attn.o_proj.weight", H, heads * v_dim, extra=mtp)
        w.plain(f"{p}.input_layernorm.weight", (H,), 0.1, 1.0, extra=mtp)
        w.plain(f"{p}.post_attention_layernorm.weight", (H,), 0.1, 1.0, extra=mtp)
        if i == 0:
            w.fp8(f"{p}.mlp.gate_proj.weight", I_DENSE, H)
            w.fp8(f"{p}.mlp.up_proj.weight", I_DENSE, H)
            w.fp8(f"{p}.mlp.down_proj.weight", H, I_DENSE)
            continue
        w.plain(f"{p}.mlp.gate.weight", (E, H), 0.5, extra=mtp)
        w.plain(f"{p}.mlp.gate.e_score_correction_bias", (E,), 0.1, dtype=torch.float32, extra=mtp)
        for e in range(E):
            w.fp8(f"{p}.mlp.experts.{e}.gate_proj.weight", I_MOE, H, extra=mtp)
            w.fp8(f"{p}.mlp.experts.{e}.up_proj.weight", I_MOE, H, extra=mtp)
            w.fp8(f"{p}.mlp.experts.{e}.down_proj.weight", H, I_MOE, extra=mtp)
        w.fp8(f"{p}.mlp.shared_experts.gate_proj.weight", I_MOE, H, extra=mtp)
        w.fp8(f"{p}.mlp.shared_experts.up_proj.weight", I_MOE, H, extra=mtp)
        w.fp8(f"{p}.mlp.shared_experts.down_proj.weight", H, I_MOE, extra=mtp)
        if mtp:
            w.plain(f"{p}.shared_head.norm.weight", (H,), 0.1, 1.0, extra=True)
            w.plain(f"{p}.shared_head.head.weight", (V, H), 0.05, extra=True)
    w.plain("model.norm.weight", (H,), 0.1, 1.0)
    w.plain("lm_head.weight", (V, H), 0.05)
    return w.save(shards=2)


def qwen3_moe_hub_config(quantization_config: dict, H: int, I_MOE: int, E: int, layers: int, head_dim: int,
                         heads: int, kv_heads: int, V: int, torch_dtype: str = "bfloat16",
                         transformers_version: str = "4.51.0") -> dict:
    """A Qwen3-MoE config.json as the hub spells it (`num_experts`), with `quantization_config`."""
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 1, "decoder_sparse_step": 1, "eos_token_id": 2, "head_dim": head_dim,
        "hidden_act": "silu", "hidden_size": H, "initializer_range": 0.02, "intermediate_size": 3 * H,
        "max_position_embeddings": 256, "max_window_layers": layers, "mlp_only_layers": [],
        "model_type": "qwen3_moe", "moe_intermediate_size": I_MOE, "norm_topk_prob": True,
        "num_attention_heads": heads, "num_experts": E, "num_experts_per_tok": 2, "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads, "output_router_logits": False, "quantization_config": quantization_config,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": torch_dtype,
        "transformers_version": transformers_version, "use_cache": True, "use_sliding_window": False, "vocab_size": V,
    }


def qwen3_moe_fp8(folder: Path, seed: int = 0, scale_dtype: torch.dtype = torch.float32,
                  moe_intermediate_size: int = 256) -> Fixture:
    """F2: Qwen3-30B-A3B-FP8 layout (per-expert FP8 + weight_scale_inv, BF16 router and norms).
    A moe_intermediate_size that is not a multiple of 128 gives experts partial edge blocks."""
    H, V, E, LAYERS, head_dim, heads, kv_heads = 256, 128, 8, 2, 64, 4, 2
    I_MOE = moe_intermediate_size
    keep = ["lm_head"]
    for i in range(LAYERS):
        keep += [f"model.layers.{i}.input_layernorm", f"model.layers.{i}.mlp.gate",
                 f"model.layers.{i}.post_attention_layernorm"]
    config = qwen3_moe_hub_config({**FP8_CONFIG, "modules_to_not_convert": keep}, H, I_MOE, E, LAYERS, head_dim,
                                  heads, kv_heads, V)
    w = _Writer(seed, scale_dtype)
    w.fx = Fixture(Path(folder), config)
    w.plain("model.embed_tokens.weight", (V, H), 0.5)
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        w.fp8(f"{p}.self_attn.q_proj.weight", heads * head_dim, H)
        w.fp8(f"{p}.self_attn.k_proj.weight", kv_heads * head_dim, H)
        w.fp8(f"{p}.self_attn.v_proj.weight", kv_heads * head_dim, H)
        w.fp8(f"{p}.self_attn.o_proj.weight", H, heads * head_dim)
        w.plain(f"{p}.self_attn.q_norm.weight", (head_dim,), 0.1, 1.0)
        w.plain(f"{p}.self_attn.k_norm.weight", (head_dim,), 0.1, 1.0)
        w.plain(f"{p}.mlp.gate.weight", (E, H), 0.5)
        for e in range(E):
            w.fp8(f"{p}.mlp.experts.{e}.gate_proj.weight", I_MOE, H)
            w.fp8(f"{p}.mlp.experts.{e}.up_proj.weight", I_MOE, H)
            w.fp8(f"{p}.mlp.experts.{e}.down_proj.weight", H, I_MOE)
        w.plain(f"{p}.input_layernorm.weight", (H,), 0.1, 1.0)
        w.plain(f"{p}.post_attention_layernorm.weight", (H,), 0.1, 1.0)
    w.plain("model.norm.weight", (H,), 0.1, 1.0)
    w.plain("lm_head.weight", (V, H), 0.05)
    return w.save()


def fuse_experts(fx: Fixture, folder: Path) -> Path:
    """A copy of a per-expert FP8 Qwen fixture with each layer's experts fused on disk, as a
    transformers-5 FP8 save keeps them: `experts.gate_up_proj` [E, 2I, H] and `down_proj` with
    `_scale_inv` grids fused the same way (gate rows, then up rows; needs I % 128 == 0)."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    for f in fx.folder.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copyfile(f, folder / f.name)
    out = {k: v for k, v in fx.stored.items() if ".experts." not in k}
    E = fx.num_experts
    for i in range(fx.config["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp.experts"
        for suffix in ("", "_scale_inv"):
            out[f"{p}.gate_up_proj{suffix}"] = torch.stack([
                torch.cat([fx.stored[f"{p}.{e}.gate_proj.weight{suffix}"], fx.stored[f"{p}.{e}.up_proj.weight{suffix}"]])
                for e in range(E)])
            out[f"{p}.down_proj{suffix}"] = torch.stack([fx.stored[f"{p}.{e}.down_proj.weight{suffix}"]
                                                         for e in range(E)])
    save_file({k: v.contiguous() for k, v in out.items()}, str(folder / "model.safetensors"))
    return folder


def variant(fx: Fixture, folder: Path, config: dict | None = None, tensors: dict | None = None,
            files: dict[str, str] | None = None) -> Path:
    """A copy of a fixture with its config replaced, tensors replaced or added (None removes one),
    and extra files written."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    for f in fx.folder.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copyfile(f, folder / f.name)
    (folder / "config.json").write_text(json.dumps(fx.config if config is None else config, indent=2))
    stored = dict(fx.stored)
    for k, v in (tensors or {}).items():
        if v is None:
            stored.pop(k, None)
        else:
            stored[k] = v
    save_file({k: v.contiguous() for k, v in stored.items()}, str(folder / "model.safetensors"))
    for name, text in (files or {}).items():
        (folder / name).write_text(text)
    return folder


MXFP4_CONFIG = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"}


def gpt_oss_mxfp4(folder: Path, seed: int = 0) -> Fixture:
    """F3: GPT-OSS-20B/120B MXFP4 layout: each layer's experts fused on disk as U8
    `gate_up_proj_blocks` [E, 2I, H/32, 16] + `_scales` [E, 2I, H/32] (likewise `down_proj`),
    BF16 biases, router, attention (with sinks) and embeddings. The dense value of an expert
    weight is transformers' own dequantization (`convert_moe_packed_tensors`, in float32),
    stored under the in-memory name (`experts.gate_up_proj` [E, H, 2I])."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    H, I_MOE, V, E, LAYERS, heads, kv_heads, head_dim = 64, 64, 128, 8, 3, 4, 2, 16
    config = {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "experts_per_token": 2,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": H,
        "initial_context_length": 4096,
        "initializer_range": 0.02,
        "intermediate_size": I_MOE,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "max_position_embeddings": 131072,
        "model_type": "gpt_oss",
        "num_attention_heads": heads,
        "num_experts_per_tok": 2,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": kv_heads,
        "num_local_experts": E,
        "output_router_logits": False,
        "pad_token_id": 0,
        "quantization_config": dict(MXFP4_CONFIG),
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                         "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
        "rope_theta": 150000,
        "router_aux_loss_coef": 0.9,
        "sliding_window": 6,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "transformers_version": "4.55.0.dev0",
        "use_cache": True,
        "vocab_size": V,
    }
    w = _Writer(seed, torch.bfloat16)
    w.fx = Fixture(Path(folder), config)
    w.plain("model.embed_tokens.weight", (V, H), 0.5)
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        w.plain(f"{p}.input_layernorm.weight", (H,), 0.1, 1.0)
        w.plain(f"{p}.post_attention_layernorm.weight", (H,), 0.1, 1.0)
        for proj, rows, cols in (("q", heads * head_dim, H), ("k", kv_heads * head_dim, H),
                                 ("v", kv_heads * head_dim, H), ("o", H, heads * head_dim)):
            w.plain(f"{p}.self_attn.{proj}_proj.weight", (rows, cols), 0.05)
            w.plain(f"{p}.self_attn.{proj}_proj.bias", (rows,), 0.02)
        w.plain(f"{p}.self_attn.sinks", (heads,), 0.5)
        w.plain(f"{p}.mlp.router.weight", (E, H), 0.5)
        w.plain(f"{p}.mlp.router.bias", (E,), 0.1)
        for proj, rows, cols in (("gate_up_proj", 2 * I_MOE, H), ("down_proj", H, I_MOE)):
            key = f"{p}.mlp.experts.{proj}"
            blocks = torch.randint(0, 256, (E, rows, cols // 32, 16), generator=w.gen, dtype=torch.uint8)
            # scales 2**-7..2**-3, different per group, so a misplaced group or nibble shows
            scales = torch.randint(120, 125, (E, rows, cols // 32), generator=w.gen, dtype=torch.uint8)
            w.fx.stored[f"{key}_blocks"] = blocks
            w.fx.stored[f"{key}_scales"] = scales
            w.fx.dense[key] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
            w.fx.quantized.add(key)
            w.plain(f"{key}_bias", (E, rows), 0.05)
    w.plain("model.norm.weight", (H,), 0.1, 1.0)
    w.plain("lm_head.weight", (V, H), 0.05)
    fx = w.save()
    # the hub repo also ships the OpenAI-format weights and a Metal build: decoys no loader may read
    (fx.folder / "original").mkdir()
    save_file({"block.0.mlp.mlp1_weight.blocks": torch.zeros(1, dtype=torch.uint8)},
              str(fx.folder / "original" / "model.safetensors"))
    (fx.folder / "metal").mkdir()
    (fx.folder / "metal" / "model.bin").write_bytes(b"not a safetensors file")
    return fx


# ---------------------------------------------------------------------------------------- test helpers
IDS = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def random_pattern(fx, seed: int = 0) -> Pattern:
    """Half of every MoE layer's experts; for DeepSeek two of each group of four."""
    oracle = fx.oracle()
    adapter = moeprune.get_adapter(oracle)
    rng, n = random.Random(seed), fx.num_experts
    kept = {}
    for layer in adapter.moe_layers(oracle.config):
        if adapter.groups(oracle.config):
            kept[layer] = sorted(e for g in range(0, n, 4) for e in rng.sample(range(g, g + 4), 2))
        else:
            kept[layer] = sorted(rng.sample(range(n), n // 2))
    return Pattern(kept, {"num_experts": n, "fingerprint": model_fingerprint(oracle)})


def oracle_logits(fx, pattern: Pattern) -> torch.Tensor:
    oracle = fx.oracle()
    with torch.no_grad(), keep_mask(oracle, moeprune.get_adapter(oracle), pattern.keep_masks()):
        return oracle(IDS).logits


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert (got - want).abs().max().item() <= 1e-5


def assert_export_matches_oracle(fx, pattern: Pattern, out, k: int) -> None:
    """The export at `out` (k experts per layer), decoded, is the oracle under `pattern`."""
    full = Pattern({layer: list(range(k)) for layer in pattern.kept}, {"num_experts": k})
    slim = moeprune.load_slim(out, full, dtype="float32", verify=False)
    with torch.no_grad():
        assert_close(slim(IDS).logits, oracle_logits(fx, pattern))


def raises_one_line(fn, match: str) -> str:
    with pytest.raises(MoepruneError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


# ---------------------------------------------------------------------------------------- GPTQ / AWQ (F6)
# AutoAWQ's packing order: nibble k of a word holds output column 8c + AWQ_PACK_ORDER[k]
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _int32_words(words: torch.Tensor) -> torch.Tensor:
    """int64 words 0..2**32-1 as the int32 bit patterns a checkpoint stores."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows_int4(codes: torch.Tensor) -> torch.Tensor:
    """GPTQ qweight: codes [in, out] -> [in/8, out], input row 8r+k in bits 4k of word r."""
    words = torch.zeros(codes.shape[0] // 8, codes.shape[1], dtype=torch.int64)
    for k in range(8):
        words |= codes[k::8].long() << (4 * k)
    return _int32_words(words)


def pack_cols_int4(codes: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """codes [rows, out] -> [rows, out/8], column 8c+order[k] in bits 4k of word c (GPTQ qzeros:
    the plain order; AWQ: AWQ_PACK_ORDER)."""
    words = torch.zeros(codes.shape[0], codes.shape[1] // 8, dtype=torch.int64)
    for k in range(8):
        words |= codes[:, order[k]::8].long() << (4 * k)
    return _int32_words(words)


def int4_values(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """float32 [out, in] of integer `codes` [in, out] with true `zeros`/`scales` [groups, out]
    and the group of each input row: written from unpacked integers, not by any codec."""
    out = torch.empty(codes.shape[1], codes.shape[0], dtype=torch.float32)
    for i in range(codes.shape[0]):
        g = int(groups[i])
        out[:, i] = (codes[i].float() - zeros[g].float()) * scales[g].float()
    return out


def _int4_linear(w: _Writer, key: str, rows: int, cols: int, scheme: str, group: int, desc_act: bool = False) -> None:
    """A 4-bit Linear weight `key` [rows(out), cols(in)] stored as GPTQ or AWQ companions."""
    base = key.removesuffix(".weight")
    codes = torch.randint(0, 16, (cols, rows), generator=w.gen)
    n_groups = math.ceil(cols / group)
    zeros = torch.randint(1, 16, (n_groups, rows), generator=w.gen)  # 1..15: a GPTQ v1 zero minus one fits 4 bits
    # ~0.02-sized weights; scales differ per group and column so a misplaced nibble or group shows
    scales = ((torch.rand(n_groups, rows, generator=w.gen) * 1.5 + 0.5) * 0.004).to(torch.float16)
    if desc_act:  # act-order: each row's group follows a permutation of the rows
        groups = (torch.argsort(torch.randperm(cols, generator=w.gen)) // group).to(torch.int32)
    else:
        groups = (torch.arange(cols) // group).to(torch.int32)
    if scheme == "gptq":
        w.fx.stored[f"{base}.qweight"] = pack_rows_int4(codes)
        w.fx.stored[f"{base}.qzeros"] = pack_cols_int4(zeros - 1)  # the v1 format stores zero - 1
        w.fx.stored[f"{base}.scales"] = scales
        w.fx.stored[f"{base}.g_idx"] = groups
    else:
        w.fx.stored[f"{base}.qweight"] = pack_cols_int4(codes, AWQ_PACK_ORDER)
        w.fx.stored[f"{base}.qzeros"] = pack_cols_int4(zeros, AWQ_PACK_ORDER)
        w.fx.stored[f"{base}.scales"] = scales
    w.fx.dense[key] = int4_values(codes, zeros, scales, groups)
    w.fx.quantized.add(key)


GPTQ_CONFIG = {"bits": 4, "damp_percent": 0.1, "desc_act": True, "group_size": 32, "model_file_base_name": "model",
               "model_name_or_path": None, "quant_method": "gptq", "static_groups": False, "sym": False,
               "true_sequential": True}


def mixtral_gptq(folder: Path, seed: int = 0, quantization_config: dict | None = None) -> Fixture:
    """F6 (GPTQ): TheBloke's Mixtral-8x7B GPTQ layout: attention and per-expert w1/w2/w3 as
    `qweight`/`qzeros`/`scales`/`g_idx` (act-order, groups of 32), FP16 router, norms and
    embeddings, `num_local_experts` spelling, and the old AutoGPTQ root `quantize_config.json`."""
    H, I_MOE, V, E, LAYERS, heads, kv_heads = 64, 96, 128, 8, 2, 4, 2
    head_dim = H // heads
    qc = dict(GPTQ_CONFIG if quantization_config is None else quantization_config)
    config = {
        "architectures": ["MixtralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": H,
        "initializer_range": 0.02,
        "intermediate_size": I_MOE,
        "max_position_embeddings": 256,
        "model_type": "mixtral",
        "num_attention_heads": heads,
        "num_experts_per_tok": 2,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": kv_heads,
        "num_local_experts": E,
        "output_router_logits": False,
        "pretraining_tp": 1,
        "quantization_config": qc,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.36.0.dev0",
        "use_cache": True,
        "vocab_size": V,
    }
    w = _Writer(seed, torch.float16)
    w.fx = Fixture(Path(folder), config)
    desc_act = bool(qc.get("desc_act"))
    group = qc.get("group_size", 32)
    w.plain("model.embed_tokens.weight", (V, H), 0.5, dtype=torch.float16)
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for proj, rows, cols in (("q", heads * head_dim, H), ("k", kv_heads * head_dim, H),
                                 ("v", kv_heads * head_dim, H), ("o", H, heads * head_dim)):
            _int4_linear(w, f"{p}.self_attn.{proj}_proj.weight", rows, cols, "gptq", group, desc_act)
        w.plain(f"{p}.block_sparse_moe.gate.weight", (E, H), 0.5, dtype=torch.float16)
        for e in range(E):
            x = f"{p}.block_sparse_moe.experts.{e}"
            _int4_linear(w, f"{x}.w1.weight", I_MOE, H, "gptq", group, desc_act)
            _int4_linear(w, f"{x}.w3.weight", I_MOE, H, "gptq", group, desc_act)
            _int4_linear(w, f"{x}.w2.weight", H, I_MOE, "gptq", group, desc_act)
        w.plain(f"{p}.input_layernorm.weight", (H,), 0.1, 1.0, dtype=torch.float16)
        w.plain(f"{p}.post_attention_layernorm.weight", (H,), 0.1, 1.0, dtype=torch.float16)
    w.plain("model.norm.weight", (H,), 0.1, 1.0, dtype=torch.float16)
    w.plain("lm_head.weight", (V, H), 0.05, dtype=torch.float16)
    fx = w.save()
    (fx.folder / "quantize_config.json").write_text(json.dumps(
        {k: v for k, v in qc.items() if k != "quant_method"}, indent=2))
    return fx


AWQ_CONFIG = {"bits": 4, "group_size": 32, "modules_to_not_convert": None, "quant_method": "awq",
              "version": "gemm", "zero_point": True}


def qwen3_moe_awq(folder: Path, seed: int = 0, quantization_config: dict | None = None) -> Fixture:
    """F6 (AWQ): a Qwen3-30B-A3B-AWQ layout: attention and per-expert gate/up/down as AutoAWQ GEMM
    `qweight`/`qzeros`/`scales` (interleaved nibbles, groups of 32), FP16 router, norms and
    embeddings, `num_experts` spelling."""
    H, I_MOE, V, E, LAYERS, heads, kv_heads, head_dim = 64, 64, 128, 8, 2, 4, 2, 16
    qc = dict(AWQ_CONFIG if quantization_config is None else quantization_config)
    config = qwen3_moe_hub_config(qc, H, I_MOE, E, LAYERS, head_dim, heads, kv_heads, V, torch_dtype="float16",
                                  transformers_version="4.51.3")
    w = _Writer(seed, torch.float16)
    w.fx = Fixture(Path(folder), config)
    group = qc.get("group_size", 32)
    w.plain("model.embed_tokens.weight", (V, H), 0.5, dtype=torch.float16)
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for proj, rows, cols in (("q", heads * head_dim, H), ("k", kv_heads * head_dim, H),
                                 ("v", kv_heads * head_dim, H), ("o", H, heads * head_dim)):
            _int4_linear(w, f"{p}.self_attn.{proj}_proj.weight", rows, cols, "awq", group)
        w.plain(f"{p}.self_attn.q_norm.weight", (head_dim,), 0.1, 1.0, dtype=torch.float16)
        w.plain(f"{p}.self_attn.k_norm.weight", (head_dim,), 0.1, 1.0, dtype=torch.float16)
        w.plain(f"{p}.mlp.gate.weight", (E, H), 0.5, dtype=torch.float16)
        for e in range(E):
            x = f"{p}.mlp.experts.{e}"
            _int4_linear(w, f"{x}.gate_proj.weight", I_MOE, H, "awq", group)
            _int4_linear(w, f"{x}.up_proj.weight", I_MOE, H, "awq", group)
            _int4_linear(w, f"{x}.down_proj.weight", H, I_MOE, "awq", group)
        w.plain(f"{p}.input_layernorm.weight", (H,), 0.1, 1.0, dtype=torch.float16)
        w.plain(f"{p}.post_attention_layernorm.weight", (H,), 0.1, 1.0, dtype=torch.float16)
    w.plain("model.norm.weight", (H,), 0.1, 1.0, dtype=torch.float16)
    w.plain("lm_head.weight", (V, H), 0.05, dtype=torch.float16)
    return w.save()


# ---------------------------------------------------------------------------------------- compressed-tensors (F4, F5, F7)
def ct_config(fmt: str, weights: dict, input_activations: dict | None = None,
              ignore: list[str] | None = None) -> dict:
    """A compressed-tensors quantization_config as llm-compressor writes it (one config group)."""
    return {
        "config_groups": {"group_0": {"format": fmt, "input_activations": input_activations,
                                      "output_activations": None, "targets": ["Linear"], "weights": weights}},
        "format": fmt, "global_compression_ratio": None,
        "ignore": ignore if ignore is not None else ["lm_head", "re:.*mlp.gate$"],
        "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
        "sparsity_config": {}, "transform_config": {}, "version": "0.10.2",
    }


def pack_int32_columns(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [R, C] packed one column at a time: column c in bits bits*(c % p) of word
    c // p, p = 32 / bits (compressed-tensors' `pack_to_int32`); int32 bit patterns."""
    per_word = 32 // bits
    words = torch.zeros(codes.shape[0], -(-codes.shape[1] // per_word), dtype=torch.int64)
    for c in range(codes.shape[1]):
        words[:, c // per_word] |= codes[:, c].long() << (bits * (c % per_word))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def qwen3_moe_ct_int(folder: Path, seed: int = 0, symmetric: bool = True, actorder: bool = False,
                     plain: tuple[str, ...] = (), bits: int = 4, group: int = 32) -> Fixture:
    """F4: a compressed-tensors W4A16 Qwen3-MoE (pack-quantized, groups of `group`): every Linear
    but the router and lm_head as `weight_packed` I32 + `weight_scale` BF16 + `weight_shape` I64,
    with `weight_zero_point` (asymmetric) and `weight_g_idx` (actorder). `plain`: Linear names
    (e.g. one expert's down_proj) stored in BF16 and listed by name in `ignore`."""
    H, I_MOE, V, E, LAYERS, head_dim, heads, kv_heads = 64, 64, 128, 8, 2, 16, 4, 2
    weights = {"actorder": "group" if actorder else None, "block_structure": None, "dynamic": False,
               "group_size": group, "num_bits": bits, "observer": "minmax", "observer_kwargs": {},
               "strategy": "group", "symmetric": symmetric, "type": "int"}
    qc = ct_config("pack-quantized", weights, ignore=["lm_head", "re:.*mlp.gate$", *plain])
    w = _Writer(seed, torch.bfloat16)
    w.fx = Fixture(Path(folder), qwen3_moe_hub_config(qc, H, I_MOE, E, LAYERS, head_dim, heads, kv_heads, V))
    half, per_word = 1 << (bits - 1), 32 // bits

    def linear(name: str, rows: int, cols: int) -> None:
        if name in plain:
            w.plain(f"{name}.weight", (rows, cols), 0.05)
            return
        groups = cols // group
        q = torch.randint(-half, half, (rows, cols), generator=w.gen)
        scale = ((torch.rand(rows, groups, generator=w.gen) + 0.5) * (0.05 / half)).to(torch.bfloat16)
        zp = torch.zeros(rows, groups, dtype=torch.long)
        if not symmetric:
            zp = torch.randint(-half, half, (rows, groups), generator=w.gen)
        g_idx = torch.arange(cols) // group
        if actorder:  # columns assigned to groups in a shuffled order, group_size columns each
            g_idx = torch.randperm(cols, generator=w.gen) // group
        dense = torch.empty(rows, cols)
        for c in range(cols):  # one column at a time, with its own group's scale and zero point
            g = int(g_idx[c])
            dense[:, c] = (q[:, c] - zp[:, g]).float() * scale[:, g].float()
        fx = w.fx
        fx.stored[f"{name}.weight_packed"] = pack_int32_columns(q + half, bits)
        fx.stored[f"{name}.weight_scale"] = scale
        fx.stored[f"{name}.weight_shape"] = torch.tensor([rows, cols], dtype=torch.int64)
        if not symmetric:  # packed along dim 0: the columns of the transpose
            fx.stored[f"{name}.weight_zero_point"] = pack_int32_columns((zp + half).t(), bits).t()
            assert fx.stored[f"{name}.weight_zero_point"].shape == (-(-rows // per_word), groups)
        if actorder:
            fx.stored[f"{name}.weight_g_idx"] = g_idx.to(torch.int32)
        fx.dense[f"{name}.weight"] = dense
        fx.quantized.add(f"{name}.weight")

    _ct_qwen3_tensors(w, linear, H, I_MOE, V, E, LAYERS, head_dim, heads, kv_heads)
    return w.save()


def _ct_qwen3_tensors(w: _Writer, linear, H: int, I_MOE: int, V: int, E: int, layers: int, head_dim: int,
                      heads: int, kv_heads: int) -> None:
    w.plain("model.embed_tokens.weight", (V, H), 0.5)
    for i in range(layers):
        p = f"model.layers.{i}"
        linear(f"{p}.self_attn.q_proj", heads * head_dim, H)
        linear(f"{p}.self_attn.k_proj", kv_heads * head_dim, H)
        linear(f"{p}.self_attn.v_proj", kv_heads * head_dim, H)
        linear(f"{p}.self_attn.o_proj", H, heads * head_dim)
        w.plain(f"{p}.self_attn.q_norm.weight", (head_dim,), 0.1, 1.0)
        w.plain(f"{p}.self_attn.k_norm.weight", (head_dim,), 0.1, 1.0)
        w.plain(f"{p}.mlp.gate.weight", (E, H), 0.5)
        for e in range(E):
            linear(f"{p}.mlp.experts.{e}.gate_proj", I_MOE, H)
            linear(f"{p}.mlp.experts.{e}.up_proj", I_MOE, H)
            linear(f"{p}.mlp.experts.{e}.down_proj", H, I_MOE)
        w.plain(f"{p}.input_layernorm.weight", (H,), 0.1, 1.0)
        w.plain(f"{p}.post_attention_layernorm.weight", (H,), 0.1, 1.0)
    w.plain("model.norm.weight", (H,), 0.1, 1.0)
    w.plain("lm_head.weight", (V, H), 0.05)


def qwen3_moe_ct_fp8(folder: Path, seed: int = 0, static: bool = False) -> Fixture:
    """F5 / F7: a compressed-tensors FP8 Qwen3-MoE (float-quantized): every Linear but the router
    and lm_head as F8_E4M3 `weight` + per-channel `weight_scale` BF16 [out, 1]. `static`: FP8
    static activations, each Linear with an F32 `input_scale` [1]; the experts' differ (the
    gate and up of one expert share theirs, as they read the same input)."""
    H, I_MOE, V, E, LAYERS, head_dim, heads, kv_heads = 64, 64, 128, 8, 2, 16, 4, 2
    weights = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": None, "num_bits": 8,
               "observer": "minmax", "observer_kwargs": {}, "strategy": "channel", "symmetric": True,
               "type": "float"}
    inputs = ({"actorder": None, "block_structure": None, "dynamic": False, "group_size": None, "num_bits": 8,
               "observer": "minmax", "observer_kwargs": {}, "strategy": "tensor", "symmetric": True, "type": "float"}
              if static else
              {"actorder": None, "block_structure": None, "dynamic": True, "group_size": None, "num_bits": 8,
               "observer": None, "observer_kwargs": {}, "strategy": "token", "symmetric": True, "type": "float"})
    qc = ct_config("float-quantized", weights, inputs)
    w = _Writer(seed, torch.bfloat16)
    w.fx = Fixture(Path(folder), qwen3_moe_hub_config(qc, H, I_MOE, E, LAYERS, head_dim, heads, kv_heads, V))
    shared: dict[str, torch.Tensor] = {}

    def linear(name: str, rows: int, cols: int) -> None:
        codes = (torch.randn(rows, cols, generator=w.gen) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        scale = ((torch.rand(rows, 1, generator=w.gen) + 0.5) * (0.02 / 64)).to(torch.bfloat16)
        w._put(f"{name}.weight", codes, codes.float() * scale.float(), extra=False)
        w.fx.stored[f"{name}.weight_scale"] = scale
        w.fx.quantized.add(f"{name}.weight")
        if static:
            # Linears reading the same input share a scale: q/k/v, and an expert's gate/up
            reader = name.rsplit(".", 1)[0] + (".qkv" if name.endswith(("q_proj", "k_proj", "v_proj")) else
                                               ".gate_up" if name.endswith(("gate_proj", "up_proj")) else name)
            if reader not in shared:
                shared[reader] = torch.rand(1, generator=w.gen) * 0.05 + 0.01
            w.fx.stored[f"{name}.input_scale"] = shared[reader].clone()

    _ct_qwen3_tensors(w, linear, H, I_MOE, V, E, LAYERS, head_dim, heads, kv_heads)
    return w.save()


def assert_pool_matches_oracle(fx) -> None:
    """An ExpertPool over `fx` with room for fewer experts than two patterns need equals the oracle
    while it switches between them (so it evicts), and has the oracle's fingerprint."""
    from moeprune.serve import ExpertPool

    a, b = random_pattern(fx, seed=0), random_pattern(fx, seed=1)
    with ExpertPool(fx.folder, fx.num_experts // 2 + 1, dtype="float32") as pool:
        assert pool.fingerprint == model_fingerprint(fx.oracle())  # the bf16 sibling's fingerprint
        assert not hasattr(pool.model.config, "quantization_config")  # it holds decoded floats
        for pattern in (a, b, a):
            with pool.serve(pattern), torch.no_grad():
                assert_close(pool.model(IDS).logits, oracle_logits(fx, pattern))
        assert pool.stats["evictions"] > 0


def assert_profile_matches_oracle(fx, prompts: list[str]) -> None:
    """profile(path) decodes through moeprune's codec and records what the oracle records, with the
    fingerprint of the dequantized sibling."""
    prof = moeprune.profile(fx.folder, prompts, dtype="float32")
    ref = moeprune.profile(fx.oracle(), prompts, tokenizer=char_tokenizer())
    assert prof.fingerprint == ref.fingerprint
    for stat in ("frequency", "mass", "gate_norm"):
        assert torch.allclose(prof.stats[stat], ref.stats[stat], rtol=1e-5, atol=1e-6), stat


# ---------------------------------------------------------------------------------------- AutoFP8 per-tensor FP8 (F7)
def mixtral_hub_config(quantization_config: dict | None, H: int, I_MOE: int, E: int, layers: int, heads: int,
                       kv_heads: int, V: int, torch_dtype: str = "bfloat16",
                       transformers_version: str = "4.40.0") -> dict:
    """A Mixtral config.json as the hub spells it (`num_local_experts`); no `quantization_config`
    key at all when `quantization_config` is None."""
    config = {
        "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": H, "initializer_range": 0.02, "intermediate_size": I_MOE,
        "max_position_embeddings": 256, "model_type": "mixtral", "num_attention_heads": heads,
        "num_experts_per_tok": 2, "num_hidden_layers": layers, "num_key_value_heads": kv_heads,
        "num_local_experts": E, "output_router_logits": False, "quantization_config": quantization_config,
        "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": torch_dtype, "transformers_version": transformers_version,
        "use_cache": True, "vocab_size": V,
    }
    if quantization_config is None:
        del config["quantization_config"]
    return config


AUTOFP8_IGNORED_EXPERT = "model.layers.1.block_sparse_moe.experts.3.w2"  # stored BF16, named in ignored_layers


def mixtral_autofp8(folder: Path, seed: int = 0, static: bool = True,
                    plain: tuple[str, ...] = (AUTOFP8_IGNORED_EXPERT,)) -> Fixture:
    """F7: neuralmagic's AutoFP8 Mixtral-8x7B-Instruct-v0.1-FP8 layout: attention q/k/v/o and
    per-expert w1/w2/w3 as F8_E4M3 `weight` [out, in] with a per-tensor F32 `weight_scale` [] and
    (`static`) an F32 `input_scale` [] that differs across experts (w1 and w3 of one expert share
    theirs, as do q/k/v: they read the same input); BF16 router, norms, embeddings and lm_head.
    `quantization_config = {"quant_method": "fp8", "activation_scheme": ..., "ignored_layers": [...]}`
    lists lm_head and every layer's router by name, and the `plain` Linears (one expert's w2, to
    test the export's rewrite), which are stored in BF16."""
    H, I_MOE, V, E, LAYERS, heads, kv_heads = 64, 96, 128, 8, 2, 4, 2
    head_dim = H // heads
    ignored = ["lm_head", *(f"model.layers.{i}.block_sparse_moe.gate" for i in range(LAYERS)), *plain]
    qc = {"activation_scheme": "static" if static else "dynamic", "ignored_layers": ignored, "quant_method": "fp8"}
    w = _Writer(seed, torch.float32)
    w.fx = Fixture(Path(folder), mixtral_hub_config(qc, H, I_MOE, E, LAYERS, heads, kv_heads, V))
    shared: dict[str, torch.Tensor] = {}

    def linear(name: str, rows: int, cols: int) -> None:
        if name in plain:
            w.plain(f"{name}.weight", (rows, cols), 0.05)
            return
        codes = (torch.randn(rows, cols, generator=w.gen) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        scale = (torch.rand((), generator=w.gen) + 0.5) * (0.02 / 64)  # F32 []
        w._put(f"{name}.weight", codes, codes.float() * scale, extra=False)
        w.fx.stored[f"{name}.weight_scale"] = scale
        w.fx.quantized.add(f"{name}.weight")
        if static:
            reader = name.rsplit(".", 1)[0] + (".qkv" if name.endswith(("q_proj", "k_proj", "v_proj")) else
                                               ".w13" if name.endswith(("w1", "w3")) else name)
            if reader not in shared:
                shared[reader] = torch.rand((), generator=w.gen) * 0.05 + 0.01
            w.fx.stored[f"{name}.input_scale"] = shared[reader].clone()

    w.plain("model.embed_tokens.weight", (V, H), 0.5)
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for proj, rows, cols in (("q", heads * head_dim, H), ("k", kv_heads * head_dim, H),
                                 ("v", kv_heads * head_dim, H), ("o", H, heads * head_dim)):
            linear(f"{p}.self_attn.{proj}_proj", rows, cols)
        w.plain(f"{p}.block_sparse_moe.gate.weight", (E, H), 0.5)
        for e in range(E):
            x = f"{p}.block_sparse_moe.experts.{e}"
            linear(f"{x}.w1", I_MOE, H)
            linear(f"{x}.w3", I_MOE, H)
            linear(f"{x}.w2", H, I_MOE)
        w.plain(f"{p}.input_layernorm.weight", (H,), 0.1, 1.0)
        w.plain(f"{p}.post_attention_layernorm.weight", (H,), 0.1, 1.0)
    w.plain("model.norm.weight", (H,), 0.1, 1.0)
    w.plain("lm_head.weight", (V, H), 0.05)
    return w.save()
