"""Retrieval signatures of raw text, computed the way `profile()` records them for its prompts.

Two kinds, both averaged over a text's real tokens at the first MoE layer:
- `router`: the router's probability over experts (what PreMoe indexes);
- `hidden`: the hidden state entering that router.
Only the layers up to the first MoE router run: the forward stops there, so a slim model (or a
model whose later layers are not even loaded) embeds queries just as well.
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
