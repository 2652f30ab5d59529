"""Tiny random MoE models of every supported family, built from configs (no network)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

COMMON = dict(
    vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)

FAMILIES: dict[str, dict] = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "minimax": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8),
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=32, norm_topk_prob=False, mlp_only_layers=[0]),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8,
                      norm_topk_prob=True, decoder_sparse_step=1),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                        first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=2, topk_group=1,
                        **_MLA),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                        first_k_dense_replace=1, n_group=2, topk_group=1, norm_topk_prob=True,
                        routed_scaling_factor=2.5, **_MLA),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    # the demo model's layout: input and output embeddings are one tensor, stored once
    "qwen3_moe_tied": dict(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                           head_dim=8, norm_topk_prob=True, decoder_sparse_step=1, tie_word_embeddings=True),
}


def tiny_config(name: str, **overrides):
    """The config of a tiny model of family `name` (a model type, or a variant such as qwen3_moe_tied)."""
    kw = {**COMMON, **FAMILIES[name], **overrides}
    return AutoConfig.for_model(kw.pop("model_type", name), **kw)


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A float32 model with random weights; routers and correction biases randomised too."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Zero-initialised routers would make every token tie; give them real preferences.
            if p.dim() >= 1 and ("gate.weight" in name or "router" in name or p.abs().sum() == 0):
                p.normal_(0, 0.5 if "router" in name or "gate" in name else 0.02)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.1)
    return model


def char_tokenizer():
    """A character-level fast tokenizer (printable ASCII), buildable offline."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in range(32, 127):
        vocab[chr(c)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_tiny(model_type: str, folder, seed: int = 0, **overrides):
    """Write a tiny model and its tokenizer as a checkpoint folder; return the model."""
    model = tiny_model(model_type, seed=seed, **overrides)
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return model
