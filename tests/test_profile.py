"""Profiling: criteria formulas, exactness of the recording forward, padding invariance, artefacts."""

import json

import pytest
import torch
from tiny import FAMILIES, char_tokenizer, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

import moeprune
from moeprune import FormatVersionError, MoepruneError, Profile, PromptError, UnsupportedModelError

PROMPTS = [
    "def add(a, b):\n    return a + b",
    "In the beginning God created the heaven and the earth.",
    "#include <stdio.h>",
    "Permission is hereby granted, free of charge, to any person",
    "x",
    "The quick brown fox jumps over the lazy dog, again and again and again.",
]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_profiling_leaves_logits_unchanged(model_type, tok):
    model = tiny_model(model_type)
    seen = []
    handle = model.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((kwargs["input_ids"], kwargs["attention_mask"], out.logits)),
        with_kwargs=True,
    )
    prof = moeprune.profile(model, PROMPTS, tokenizer=tok, batch_size=3)
    handle.remove()
    assert model.config._experts_implementation == "grouped_mm"  # restored
    assert len(seen) == 2
    with torch.no_grad():
        for ids, mask, logits in seen:
            plain = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            assert (plain - logits).abs().max().item() <= 1e-5
    assert prof.n_tokens == sum(len(tok(p)["input_ids"]) for p in PROMPTS)
    k = get_k(model)
    for s in prof.stats["frequency"]:
        assert s.sum().item() == prof.n_tokens * k  # every real token picks k experts, padding none


def get_k(model):
    return moeprune.get_adapter(model).top_k(model.config)


def test_implementation_restored_on_error(tok):
    model = tiny_model("mixtral")
    model.set_experts_implementation("eager")

    def boom(*a):
        raise RuntimeError("boom")

    h = model.model.layers[1].mlp.gate.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        moeprune.profile(model, PROMPTS, tokenizer=tok)
    h.remove()
    assert model.config._experts_implementation == "eager"
    # profiling on top of the eager implementation records what it records on the grouped kernel
    eager = moeprune.profile(model, PROMPTS, tokenizer=tok)
    model.set_experts_implementation("grouped_mm")
    grouped = moeprune.profile(model, PROMPTS, tokenizer=tok)
    for key in grouped.stats:
        torch.testing.assert_close(eager.stats[key], grouped.stats[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eager.hidden_signatures, grouped.hidden_signatures)
    assert torch.equal(eager.routing, grouped.routing)
    assert eager.stats["frequency"][0].sum() == eager.n_tokens * get_k(model)


def test_criteria_match_hand_computation(tok):
    """One MoE layer, 4 experts, top-2: every criterion recomputed from the weights by hand."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=128, hidden_size=8, intermediate_size=16, moe_intermediate_size=4,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.mlp.gate.weight.normal_(0, 1.0)
    captured = {}
    layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: captured.__setitem__("h", a[0][0]))
    layer.post_attention_layernorm.register_forward_hook(lambda m, a, o: captured.__setitem__("x", o[0]))
    text = "expert routing by hand"
    with torch.no_grad():
        model(input_ids=torch.tensor([tok(text)["input_ids"]]))
    h, x = captured["h"], captured["x"]  # [T, H]
    W = layer.mlp.gate.weight
    gate_up, down = layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj
    probs = torch.softmax(x @ W.T, dim=-1)
    top_w, top_i = probs.topk(2, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)

    def expert(e, v):
        g, u = (gate_up[e] @ v).chunk(2)
        return down[e] @ (torch.nn.functional.silu(g) * u)

    want = {k: torch.zeros(4, dtype=torch.float64) for k in ("frequency", "mass", "gate_norm", "easy_ep")}
    n_routed = torch.zeros(4)
    for t in range(x.shape[0]):
        outs = [expert(int(e), x[t]) for e in top_i[t]]
        routed = sum(w * o for w, o in zip(top_w[t], outs, strict=True))
        s_t = max(0.0, 1 - torch.nn.functional.cosine_similarity(h[t], h[t] + routed, dim=0).item())
        for w, e, o in zip(top_w[t], top_i[t], outs, strict=True):
            e = int(e)
            want["frequency"][e] += 1
            want["mass"][e] += w.item()
            want["gate_norm"][e] += w.item() * o.norm().item()
            want["easy_ep"][e] += w.item() * o.norm().item() * s_t
            n_routed[e] += 1
    prof = moeprune.profile(model, [text], tokenizer=tok)
    for key, value in want.items():
        torch.testing.assert_close(prof.stats[key][0], value, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(prof.scores("reap")[0], want["gate_norm"] / n_routed.clamp(min=1).double(),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(prof.scores("tcess")[0], probs.mean(0).double(), rtol=1e-5, atol=1e-7)
    thr = 0.3
    filtered = moeprune.profile(model, [text], tokenizer=tok, tcess_threshold=thr)
    torch.testing.assert_close(filtered.scores("tcess")[0], (probs * (probs >= thr)).mean(0).double(),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(prof.signatures[0], probs.mean(0), rtol=1e-5, atol=1e-7)


def test_padding_invariance(tok):
    model = tiny_model("mixtral")
    batched = moeprune.profile(model, PROMPTS, tokenizer=tok, batch_size=len(PROMPTS))
    single = moeprune.profile(model, PROMPTS, tokenizer=tok, batch_size=1)
    for key in batched.stats:
        torch.testing.assert_close(batched.stats[key], single.stats[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched.signatures, single.signatures, rtol=1e-5, atol=1e-6)
    assert batched.n_tokens == single.n_tokens


def test_save_load_merge(tmp_path, tok):
    model = tiny_model("deepseek_v3")
    a = moeprune.profile(model, PROMPTS[:3], tokenizer=tok, domain="code", batch_size=1)
    b = moeprune.profile(model, PROMPTS[3:], tokenizer=tok, domain="code", batch_size=1)
    whole = moeprune.profile(model, PROMPTS, tokenizer=tok, domain="code", batch_size=1)
    merged = a.merge(b)
    for key in whole.stats:
        torch.testing.assert_close(merged.stats[key], whole.stats[key], rtol=1e-6, atol=1e-8)
    assert merged.n_prompts == 6 and merged.n_tokens == whole.n_tokens and merged.domain == "code"
    assert merged.signatures.shape == (6, 8)
    merged.save(tmp_path / "p")
    back = Profile.load(tmp_path / "p")
    assert back.meta["fingerprint"] == whole.fingerprint and back.meta["format_version"] == 1
    for key in whole.stats:
        assert torch.equal(back.stats[key], merged.stats[key])
    assert (a + moeprune.profile(model, PROMPTS[:1], tokenizer=tok, domain="bible")).domain == "code+bible"
    other = moeprune.profile(tiny_model("deepseek_v3", seed=5), PROMPTS[:1], tokenizer=tok)
    with pytest.raises(MoepruneError, match="fingerprint"):
        a.merge(other)
    with pytest.raises(MoepruneError, match="not empty"):
        merged.save(tmp_path / "p")
    merged.save(tmp_path / "p", overwrite=True)


def test_prompt_sources(tmp_path, tok):
    model = tiny_model("olmoe")
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\nsecond prompt\n")
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"text": "first prompt"}) + "\n"
                  + json.dumps({"messages": [{"role": "user", "content": "second prompt"}]}) + "\n")
    assert moeprune.profile(model, txt, tokenizer=tok).n_prompts == 2
    assert moeprune.profile(model, str(jl), tokenizer=tok).n_prompts == 2


def test_bad_prompt_input(tmp_path, tok):
    model = tiny_model("mixtral")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(PromptError, match="no prompts"):
        moeprune.profile(model, empty, tokenizer=tok)
    with pytest.raises(PromptError, match="not found"):
        moeprune.profile(model, tmp_path / "missing.jsonl", tokenizer=tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(PromptError, match=r"bad\.jsonl, line 2"):
        moeprune.profile(model, bad, tokenizer=tok)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"content": "x"}\n')
    with pytest.raises(PromptError, match="line 1"):
        moeprune.profile(model, wrong, tokenizer=tok)
    with pytest.raises(MoepruneError, match="tokenizer"):
        moeprune.profile(model, ["x"])
    with pytest.raises(MoepruneError, match="batch_size"):
        moeprune.profile(model, ["x"], tokenizer=tok, batch_size=0)


def test_bad_model_input(tmp_path, tok):
    with pytest.raises(MoepruneError, match="not found"):
        moeprune.profile(tmp_path / "nope", ["x"])
    dense = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(UnsupportedModelError, match="llama"):
        moeprune.profile(dense, ["x"], tokenizer=tok)
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(UnsupportedModelError, match="llama"):
        moeprune.profile(tmp_path / "dense", ["x"])


def test_newer_format_is_refused(tmp_path, tok):
    prof = moeprune.profile(tiny_model("qwen3_moe"), PROMPTS[:2], tokenizer=tok)
    prof.save(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "profile.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "p" / "profile.json").write_text(json.dumps(meta))
    with pytest.raises(FormatVersionError, match="newer"):
        Profile.load(tmp_path / "p")
    with pytest.raises(MoepruneError, match="not found"):
        Profile.load(tmp_path / "missing")


def test_chat_template_is_applied(tmp_path):
    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    model = tiny_model("qwen3_moe")
    messages = [{"role": "user", "content": "hi there"}]
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": messages}) + "\n")
    prof = moeprune.profile(model, f, tokenizer=tok)
    assert prof.n_tokens == len(tok("[user]hi there")["input_ids"])
