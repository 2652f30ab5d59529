"""Retrieval signatures of raw text, computed the way `profile()` records them for its prompts.

Two kinds, both averaged over a text's real tokens at the first MoE layer:
- `router`: the router's probability over experts (what PreMoe indexes);
- `hidden`: the hidden state entering that router.
Only the layers up to the first MoE router run: the forward stops there, so a slim model (or a
model whose later layers are not even loaded: `load_signature_model`) embeds queries just as well.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn

from ..errors import MoepruneError
from ..models import context_length, model_device
from ..prompts import Prompt, encode
from ..routers import get_adapter

KINDS = ("router", "hidden")

# A hook on a shared router sees every thread's forward: one embedding at a time (it is cheap).
_EMBED_LOCK = threading.Lock()


class _Stop(Exception):
    """Raised inside the forward once the first router's input is known."""


def profile_signatures(profile, kind: str) -> torch.Tensor:
    """The per-prompt signatures a Profile recorded, for `kind`."""
    if kind == "router":
        return profile.signatures.float()
    if kind == "hidden":
        if profile.hidden_signatures is None:
            raise MoepruneError("this profile has no hidden-state signatures (profiled by an older moeprune); "
                                "profile again or use the router signature")
        return profile.hidden_signatures.float()
    raise MoepruneError(f"unknown signature kind {kind!r}; choose one of {', '.join(KINDS)}")


def load_signature_model(model_path, dtype=None, device: str | torch.device = "cpu") -> nn.Module:
    """A model of `model_path` that holds only what runs up to the first MoE router (the embedding,
    the layers before it, that layer's attention, norms and router), read through the byte-range
    reader: a few percent of the model, enough for `embed` (its forward stops at that router).
    Everything else stays on the meta device; the model carries the checkpoint's fingerprint."""
    from ..checkpoint import Checkpoint, run_reads

    with Checkpoint(model_path) as ckpt:
        routers = ckpt.read_routers()
        first = ckpt.layers[0]
        model, _ = ckpt.slim_skeleton({layer: list(range(ckpt.num_experts)) for layer in ckpt.layers},
                                      ckpt.dtype(dtype), routers)
        adapter = ckpt.adapter
        later = tuple(f"{name}." for name, m in model.named_modules()
                      if any(m is layer for layer in adapter.decoder_layers(model)[first + 1:]))
        head = model.get_output_embeddings()
        head_names = {f"{n}.{p}" for n, m in model.named_modules() if m is head for p, _ in m.named_parameters()}
        experts = set(adapter.fused_keys(first))
        plan, _ = ckpt.backbone_plan(model, {n for layer in ckpt.layers for n in adapter.fused_keys(layer)}
                                     | set(routers))
        wanted = [r for r in plan if not r.name.startswith(later) and r.name not in head_names | experts]
        buffers, jobs = ckpt.plan_reads(wanted)
        run_reads(jobs, 4)
        buffers.update({n: routers[n] for n in adapter.router_keys(first) if n in routers})
        ckpt.fill(model, {n: t.to(device) for n, t in buffers.items()})
        fingerprint = ckpt.fingerprint(routers)
    for module in model.modules():  # tables computed at construction (rotary): to the device too
        for name, buf in module._buffers.items():
            if buf is not None and not buf.is_meta:
                module._buffers[name] = buf.to(device)
    model.eval()
    model.config._name_or_path = str(ckpt.folder)
    model.moeprune_source_fingerprint = fingerprint
    return model


@torch.no_grad()
def embed(model: nn.Module, tokenizer, texts: list[Prompt], kind: str = "router", max_length: int = 512,
          batch_size: int = 8) -> torch.Tensor:
    """Signatures [len(texts), dim] (float32, not normalised) of raw texts or chat-message lists."""
    if kind not in KINDS:
        raise MoepruneError(f"unknown signature kind {kind!r}; choose one of {', '.join(KINDS)}")
    adapter = get_adapter(model)
    _, block = adapter.blocks(model)[0]
    router = adapter.router(block)
    device = model_device(model)
    ctx = context_length(model.config)
    encoded, pad, _ = encode(texts, tokenizer, min(max_length, ctx) if ctx else max_length, what="query")
    captured: dict[str, torch.Tensor] = {}

    owner = threading.get_ident()

    def grab(module, args):
        if threading.get_ident() != owner:  # another thread (a server's generation) shares this model
            return None
        x = args[0]
        if kind == "router":  # .forward() bypasses this hook; the router's own maths gives its logits
            x = adapter.router_probs(module, module.forward(x)[0])
        captured["x"] = x
        raise _Stop

    out = []
    with _EMBED_LOCK:
        return _run(model, router, grab, captured, encoded, pad, device, batch_size, out)


def _run(model, router, grab, captured, encoded, pad, device, batch_size, out) -> torch.Tensor:
    handle = router.register_forward_pre_hook(grab)
    try:
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            width = max(len(e) for e in chunk)
            ids = torch.tensor([e + [pad] * (width - len(e)) for e in chunk], device=device)
            mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in chunk], device=device)
            with contextlib.suppress(_Stop):
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            x = captured.pop("x").reshape(len(chunk), width, -1)
            m = mask.unsqueeze(-1).to(torch.float64)
            out.append(((x.double() * m).sum(1) / m.sum(1)).float().cpu())
    finally:
        handle.remove()
    return torch.cat(out)
