"""`profile(model, prompts)`: run a domain's prompts through the MoE and record, per MoE layer
and expert, what each criterion needs. Only real tokens count; padding never does.

Per token t and pick (expert i, gate weight g): frequency += 1, mass += g,
gate_norm += g * ||E_i(h)||, easy_ep += g * ||E_i(h)|| * max(0, 1 - cos(h_t, h_t + routed_t)),
and tcess += p_i(t) (router probability, counted only where >= the confidence threshold).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import os
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import MoepruneError
from .fingerprint import model_fingerprint
from .hooks import record_experts
from .models import check_int, load_model, model_device, resolve_length
from .profiles import STATS, Profile
from .prompts import encode, read_prompts
from .routers import get_adapter
from .routers.base import MoEAdapter
from .version import PROFILE_FORMAT, __version__


class _Recorder:
    """Accumulates the statistics of every MoE layer while the model runs."""

    def __init__(self, adapter: MoEAdapter, n_layers: int, n_experts: int, n_prompts: int, threshold: float,
                 routing_cap: int):
        self.adapter = adapter
        self.n_experts = n_experts
        self.threshold = threshold
        self.stats = {k: torch.zeros(n_layers, n_experts, dtype=torch.float64) for k in STATS}
        self.sig_sum = torch.zeros(n_prompts, n_experts, dtype=torch.float64)
        self.sig_count = torch.zeros(n_prompts, dtype=torch.float64)
        self.hidden_sum: torch.Tensor | None = None  # [n_prompts, hidden]: router input at the first MoE layer
        self.valid: torch.Tensor | None = None  # [B*S] bool: real tokens of the current batch
        self.prompt_ids: torch.Tensor | None = None  # [B*S] long
        self.batch = 0  # the current batch's index: orders the routing record across devices
        self.residual: dict[int, torch.Tensor] = {}
        # Per-token top-k picks (first `routing_cap` real tokens) for miss-rate diagnostics, by batch.
        self.routing: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(n_layers)]
        self.routing_left = [routing_cap] * n_layers

    def _add(self, pos: int, index: torch.Tensor, **values: torch.Tensor) -> None:
        # One index_add for all statistics of a layer: fewer small kernels per forward.
        rows = torch.stack([v.reshape(-1).float() for v in values.values()])
        acc = torch.zeros(len(values), self.n_experts, dtype=torch.float32, device=rows.device)
        acc.index_add_(1, index, rows)
        acc = acc.to("cpu", torch.float64)
        for i, name in enumerate(values):
            self.stats[name][pos] += acc[i]

    def on_router(self, pos: int, router: nn.Module, logits: torch.Tensor) -> None:
        # the masks follow each tensor's device: a device_map model spreads its layers over GPUs
        probs = self.adapter.router_probs(router, logits).reshape(-1, self.n_experts)[self.valid.to(logits.device)]
        kept = probs if self.threshold <= 0 else probs * (probs >= self.threshold)
        self.stats["tcess"][pos] += kept.sum(0).to("cpu", torch.float64)
        if pos == 0:
            ids = self.prompt_ids[self.valid].cpu()  # both on the batch's device
            self.sig_sum.index_add_(0, ids, probs.to("cpu", torch.float64))
            self.sig_count.index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))

    def on_router_input(self, hidden: torch.Tensor) -> None:
        x = hidden.reshape(-1, hidden.shape[-1])[self.valid.to(hidden.device)].to("cpu", torch.float64)
        if self.hidden_sum is None:
            self.hidden_sum = torch.zeros(len(self.sig_count), x.shape[-1], dtype=torch.float64)
        self.hidden_sum.index_add_(0, self.prompt_ids[self.valid].cpu(), x)

    def on_residual(self, pos: int, hidden: torch.Tensor) -> None:
        self.residual[pos] = hidden.reshape(-1, hidden.shape[-1])

    def on_experts(self, pos: int, indices, weights, per_pick, routed) -> None:
        # Reduce the big [T, K, H] and [T, H] tensors first; select real tokens on the small results.
        norms = torch.linalg.vector_norm(per_pick, dim=-1, dtype=torch.float32)  # ||E_i(h_t)|| per pick
        h = self.residual.pop(pos)
        # in float32: for a bf16 model, 1 - cos of nearly parallel vectors would round to 0
        h32 = h.float()
        contribution = (1 - torch.cosine_similarity(h32, h32 + routed.float(), dim=-1)).clamp(min=0)
        v = self.valid.to(indices.device)
        picks = indices[v]
        flat = picks.reshape(-1)
        if self.routing_left[pos] > 0:
            kept = picks[: self.routing_left[pos]].to("cpu", torch.int16)
            self.routing[pos].append((self.batch, kept))
            self.routing_left[pos] -= len(kept)
        w = weights[v].float()
        gn = w * norms[v]
        self._add(pos, flat, frequency=torch.ones_like(w), mass=w, gate_norm=gn,
                  easy_ep=gn * contribution[v].unsqueeze(-1))


def _merged(recs: list[_Recorder], cap: int) -> _Recorder:
    """Recorders of disjoint batches (one per device) as one: float64 sums, and the routing record
    of the first `cap` tokens in batch order, as one recorder over every batch keeps."""
    out = recs[0]
    for r in recs[1:]:
        for k in out.stats:
            out.stats[k] += r.stats[k]
        out.sig_sum += r.sig_sum
        out.sig_count += r.sig_count
        if r.hidden_sum is not None:  # a device with no batch never saw the first router's input
            out.hidden_sum = r.hidden_sum if out.hidden_sum is None else out.hidden_sum + r.hidden_sum
    for pos in range(len(out.routing)):
        chunks = sorted((c for r in recs for c in r.routing[pos]), key=lambda c: c[0])
        picks = torch.cat([t for _, t in chunks])[:cap] if chunks else None
        out.routing[pos] = [] if picks is None else [(0, picks)]
    return out


@contextlib.contextmanager
def _recording(model: nn.Module, adapter: MoEAdapter, rec: _Recorder) -> Iterator[None]:
    """`rec`'s hooks on every MoE layer of `model` (router, router input, residual norm, experts);
    any failure, even while registering, leaves the model as it was."""
    blocks, layers = adapter.blocks(model), adapter.decoder_layers(model)
    callbacks = {adapter.experts(block): (lambda *a, pos=pos: rec.on_experts(pos, *a))
                 for pos, (_, block) in enumerate(blocks)}
    handles: list = []
    try:
        for pos, (layer, block) in enumerate(blocks):
            handles.append(adapter.router(block).register_forward_hook(
                lambda mod, args, out, pos=pos: rec.on_router(pos, mod, out[0])))
            if pos == 0:
                handles.append(adapter.router(block).register_forward_pre_hook(
                    lambda mod, args: rec.on_router_input(args[0])))
            handles.append(adapter.residual_norm(layers[layer]).register_forward_pre_hook(
                lambda mod, args, pos=pos: rec.on_residual(pos, args[0])))
        with record_experts(model, callbacks):
            yield
    finally:
        for h in handles:
            h.remove()


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Prompt indices grouped by similar length (longest first) to waste little on padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def profile(
    model: nn.Module | str | os.PathLike,
    prompts: Sequence | str | os.PathLike,
    *,
    tokenizer=None,
    domain: str | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    tcess_threshold: float = 0.0,
    routing_tokens: int = 65536,
    dtype=None,
    stream: bool = True,
    memory_budget: int | str | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Profile:
    """Profile a domain: run `prompts` through `model` and return per-expert importance statistics.

    `model` is a loaded transformers MoE model or a checkpoint folder (or hub id). A folder is
    streamed one decoder layer at a time (`moeprune.stream`: exact, and memory stays about two
    layers plus the activations, which `memory_budget` bounds by spilling them to disk) on
    `device`, or data parallel on several ("cuda:0,cuda:1": each runs every n-th batch; the
    statistics are float64 sums of theirs); `stream=False` loads it whole first. `prompts` is a list of strings / chat-message
    lists, or a .txt (one per line) or .jsonl (`text` or `messages`) file. Prompts run in
    right-padded batches; padding tokens are never counted. Prompts longer than `max_length`
    tokens (default 512, or the model's context if shorter) are cut; the profile's `n_cut` says
    how many. The top-k picks of the first `routing_tokens` real tokens are kept for diagnostics.
    """
    check_int(batch_size, "batch_size", minimum=1)
    if max_length is not None:
        check_int(max_length, "max_length", minimum=1)
    check_int(routing_tokens, "routing_tokens", minimum=0)
    if isinstance(tcess_threshold, bool) or not isinstance(tcess_threshold, (int, float)) \
            or not 0.0 <= tcess_threshold < 1.0:
        raise MoepruneError(f"tcess_threshold must be a number in [0, 1), got {tcess_threshold!r}")
    if domain is not None and not isinstance(domain, str):
        raise MoepruneError(f"domain must be a string, got {type(domain).__name__}")
    if not isinstance(model, (nn.Module, str, os.PathLike)):
        raise MoepruneError(f"model must be a loaded transformers model or a checkpoint folder, "
                            f"got {type(model).__name__}")
    items = read_prompts(prompts)  # before loading a big model: bad prompts fail fast
    streamed = None
    if isinstance(model, (str, os.PathLike)):
        from .models import check_model_path, load_config, load_tokenizer

        path = check_model_path(model)  # once: for a hub id it may ask the network
        max_length = resolve_length(max_length, 512, load_config(path), "max_length")
        if stream:
            from .stream import LayerStream, parse_bytes

            parse_bytes(memory_budget)  # a bad budget fails before anything is read
            streamed = LayerStream(path, dtype=dtype, device=device, memory_budget=memory_budget)
            model = streamed.model
            tokenizer = tokenizer or load_tokenizer(path)
        else:
            from .stream import one_device

            model, loaded_tok = load_model(path, dtype=dtype, device=str(one_device(device)))
            tokenizer = tokenizer or loaded_tok
    try:
        return _profile(model, items, streamed, tokenizer, domain, batch_size, max_length, tcess_threshold,
                        routing_tokens, progress)
    finally:
        if streamed is not None:
            streamed.close()


def _profile(model, items, streamed, tokenizer, domain, batch_size, max_length, tcess_threshold,
             routing_tokens, progress) -> Profile:
    if tokenizer is None:
        raise MoepruneError("profile() needs a tokenizer when given a loaded model: pass tokenizer=...")
    if not callable(tokenizer):
        raise MoepruneError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    adapter = get_adapter(model)
    max_length = resolve_length(max_length, 512, model.config, "max_length")
    blocks = adapter.blocks(model)
    n_experts = adapter.num_experts(model.config)
    models = streamed.models if streamed is not None else [model]
    device_of = streamed.device_of if streamed is not None else (lambda b: model_device(model))
    index_of = streamed.device_index if streamed is not None else (lambda b: 0)

    encoded, pad_id, n_cut = encode(items, tokenizer, max_length)

    recs = [_Recorder(adapter, len(blocks), n_experts, len(items), tcess_threshold, routing_tokens) for _ in models]
    batches = _batches([len(e) for e in encoded], batch_size)
    inputs, masks = [], []
    for batch in batches:
        width = max(len(encoded[i]) for i in batch)
        ids = torch.tensor([encoded[i] + [pad_id] * (width - len(encoded[i])) for i in batch])
        mask = torch.tensor([[1] * len(encoded[i]) + [0] * (width - len(encoded[i])) for i in batch])
        owner = torch.tensor(batch).unsqueeze(1).expand(-1, width)
        inputs.append({"input_ids": ids, "attention_mask": mask})
        device = device_of(len(masks))
        masks.append((mask.reshape(-1).bool().to(device), owner.reshape(-1).to(device)))

    def select(b: int) -> None:  # on the thread of the batch's device, whose recorder only it touches
        rec = recs[index_of(b)]
        rec.valid, rec.prompt_ids = masks[b]
        rec.batch = b

    was_training = model.training
    try:
        model.eval()
        with contextlib.ExitStack() as stack:
            for m, r in zip(models, recs, strict=True):
                stack.enter_context(_recording(m, adapter, r))
            if streamed is not None:
                streamed.run(inputs, before=lambda layer, b: select(b), progress=progress)
            else:
                for b in tqdm(range(len(inputs)), desc="profiling", unit="batch", disable=not progress):
                    select(b)
                    model(**{k: v.to(device_of(b)) for k, v in inputs[b].items()}, use_cache=False)
    finally:
        model.train(was_training)
    rec = _merged(recs, routing_tokens)

    n_tokens = int(sum(len(e) for e in encoded))
    meta = {
        "model_type": model.config.model_type,
        "family": adapter.family,
        "model": str(getattr(model.config, "_name_or_path", "") or ""),
        "fingerprint": streamed.fingerprint if streamed is not None else model_fingerprint(model),
        "domain": domain,
        "n_prompts": len(items),
        "n_tokens": n_tokens,
        "moe_layers": [layer for layer, _ in blocks],
        "num_experts": n_experts,
        "top_k": adapter.top_k(model.config),
        "groups": adapter.groups(model.config),
        "tcess_threshold": tcess_threshold,
        "max_length": max_length,
        "n_cut": n_cut,
        "moeprune_version": __version__,
        "format_version": PROFILE_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if streamed is not None:  # what the layer-by-layer run read and held
        meta["stream"] = dataclasses.asdict(streamed.report)
    count = rec.sig_count.clamp(min=1).unsqueeze(-1)
    signatures = (rec.sig_sum / count).float()
    hidden = (rec.hidden_sum / count).float() if rec.hidden_sum is not None else None
    routing = torch.stack([torch.cat([t for _, t in r]) for r in rec.routing]) if routing_tokens > 0 else None
    return Profile(dict(rec.stats), signatures, meta, routing, hidden)
