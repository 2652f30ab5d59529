"""`curve(model, profile, prompts, data)`: quality and memory against the share of experts kept.

For each criterion and strategy and each kept fraction (legal budgets only), the perplexity ratio
pruned / full on the held-out demonstrations (k-fold, as `select_for_target` predicts it), and with
`data` on that text (the pattern selected from the whole profile), next to the memory the pattern
keeps (its share of the routed experts' parameters, and the model's bytes). `write_curve` draws
the ratios in a PNG and writes the table as JSON beside it, both atomically.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ._io import atomic_write_bytes, format_bytes
from .errors import MoepruneError
from .pattern import _check_choice, _check_profile
from .target import Folds, _load, candidate_budgets, expert_bytes, monotone, pattern_at

DEFAULT_CRITERIA = ("easy_ep", "reap", "frequency")
DEFAULT_STRATEGIES = ("uniform", "global")


def curve(
    model: nn.Module | str | os.PathLike,
    profile,
    prompts=None,
    data=None,
    *,
    criteria: Sequence[str] = DEFAULT_CRITERIA,
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    fractions: Sequence | None = None,
    folds: int = 4,
    seed: int = 0,
    tokenizer=None,
    max_length: int | None = None,
    window: int | None = None,
    max_tokens: int | None = None,
    data_tokens: int | None = 16384,
    batch_size: int = 8,
    dtype=None,
    device: str | torch.device = "cpu",
) -> dict:
    """The table behind the curve: {"rows": [...], "full": {...}, ...}; see the module docstring.

    `prompts`: the demonstrations the profile was made from (held-out curve); `data`: evaluation
    text (a .jsonl/.txt file or a list of texts; `data_tokens` caps its tokens). At least one of
    the two. `fractions`: kept fractions or counts per layer (default 1/32 .. 24/32)."""
    from .evaluate import evaluate
    from .hooks import keep_mask
    from .prompts import read_documents
    from .routers import get_adapter

    t0 = time.time()
    _check_profile(profile)
    if prompts is None and data is None:
        raise MoepruneError("curve needs the profile's prompts (held-out demonstrations), data, or both")
    if isinstance(criteria, str) or isinstance(strategies, str):
        raise MoepruneError("criteria and strategies are lists of names")
    if not criteria or not strategies:
        raise MoepruneError("curve needs at least one criterion and one strategy")
    for c in criteria:
        for s in strategies:
            _check_choice(c, s, seed)
    texts = read_documents(data) if data is not None else None
    loaded, tok = _load(model, tokenizer, dtype, device)
    adapter = get_adapter(loaded)
    total, model_total, per_expert = expert_bytes(loaded)
    n, n_layers = profile.num_experts, len(profile.moe_layers)
    fold = None
    if prompts is not None:
        fold = Folds(loaded, tok, prompts, k=folds, seed=seed, max_length=max_length, window=window,
                     max_tokens=max_tokens, batch_size=batch_size, reference=profile)
    kwargs = dict(tokenizer=tok, window=window, max_tokens=data_tokens, batch_size=batch_size)
    full_data = evaluate(loaded, texts, **kwargs) if texts is not None else None
    rows = []
    for strategy in strategies:
        budgets = candidate_budgets(profile, strategy, fractions)
        for criterion in criteria:
            measured = [fold.losses(b, criterion, strategy, seed) for b in budgets] if fold else None
            if fold:
                curves = [monotone([m[i] for m in measured]) for i in range(folds)]
            for j, b in enumerate(budgets):
                pattern = pattern_at(profile, b, criterion, strategy, seed)
                kept_bytes = sum(len(ids) * per_expert.get(layer, 0) for layer, ids in pattern.kept.items())
                row = {"criterion": criterion, "strategy": strategy, "budget": b,
                       "per_layer": b if strategy == "uniform" else b / n_layers,
                       "kept_fraction": pattern.kept_fraction, "expert_bytes": kept_bytes,
                       "model_bytes": model_total - (total - kept_bytes)}
                if fold:
                    losses = [c[j] for c in curves]
                    row.update(heldout_ratio=1 + sum(losses) / folds, heldout_min=1 + min(losses),
                               heldout_max=1 + max(losses), heldout_measured=[1 + x for x in measured[j]])
                if texts is not None:
                    with keep_mask(loaded, adapter, pattern.keep_masks()):
                        r = evaluate(loaded, texts, **kwargs)
                    row["data_ratio"] = math.exp(r.nll - full_data.nll)
                rows.append(row)
    return {
        "model": str(model) if not isinstance(model, nn.Module) else str(getattr(loaded.config, "_name_or_path", "")),
        "domain": profile.domain, "num_experts": n, "n_layers": n_layers, "folds": folds if fold else None,
        "seed": seed, "n_prompts": profile.n_prompts, "heldout_tokens": fold.eval_tokens if fold else None,
        "data_tokens": full_data.tokens if full_data else None,
        "full": {"data_perplexity": full_data.perplexity if full_data else None,
                 "expert_bytes": total, "model_bytes": model_total},
        "criteria": list(criteria), "strategies": list(strategies), "rows": rows,
        "seconds": time.time() - t0,
    }


def format_curve(result: dict) -> str:
    """The table as text, one row per criterion, strategy and budget."""
    has_h = result["folds"] is not None
    has_d = result["data_tokens"] is not None
    head = f"{'criterion':<10} {'strategy':<8} {'kept':>6} {'per layer':>9} {'model':>10}"
    if has_h:
        head += f" {'held-out':>9} {'(min':>7} {'max)':>7}"
    if has_d:
        head += f" {'data':>7}"
    lines = []
    if has_h:
        lines.append(f"held-out: pruned / full perplexity on the demonstrations left out, {result['folds']}-fold "
                     f"({result['n_prompts']} demonstrations, {result['heldout_tokens']} tokens)")
    if has_d:
        lines.append(f"data: pruned / full perplexity on the data ({result['data_tokens']} tokens, "
                     f"full perplexity {result['full']['data_perplexity']:.3f})")
    lines.append(f"full model {format_bytes(result['full']['model_bytes'])}, routed experts "
                 f"{format_bytes(result['full']['expert_bytes'])}")
    lines += [head, "-" * len(head)]
    for r in result["rows"]:
        line = (f"{r['criterion']:<10} {r['strategy']:<8} {r['kept_fraction']:>6.1%} {r['per_layer']:>9.1f} "
                f"{format_bytes(r['model_bytes']):>10}")
        if has_h:
            line += f" {r['heldout_ratio']:>9.3f} {r['heldout_min']:>7.3f} {r['heldout_max']:>7.3f}"
        if has_d:
            line += f" {r['data_ratio']:>7.3f}"
        lines.append(line)
    return "\n".join(lines)


def write_curve(result: dict, path: str | os.PathLike) -> tuple[Path, Path]:
    """The PNG at `path` and the table as JSON beside it (same name, .json), each written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() == ".json":
        raise MoepruneError(f"{path}: the curve is a PNG; its table goes beside it as .json")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ci, c in enumerate(result["criteria"]):
        for s in result["strategies"]:
            rows = sorted((r for r in result["rows"] if r["criterion"] == c and r["strategy"] == s),
                          key=lambda r: r["kept_fraction"])
            xs = [r["kept_fraction"] for r in rows] + [1.0]
            style = "-" if s == "uniform" else "--"
            color = colors[ci % len(colors)]
            if result["folds"] is not None:
                ax.plot(xs, [r["heldout_ratio"] for r in rows] + [1.0], style, marker="o", color=color,
                        label=f"{c} {s}, held-out demos")
                ax.fill_between(xs, [r["heldout_min"] for r in rows] + [1.0], [r["heldout_max"] for r in rows] + [1.0],
                                color=color, alpha=0.08)
            if result["data_tokens"] is not None:
                ax.plot(xs, [r["data_ratio"] for r in rows] + [1.0], style, marker="s", color=color,
                        alpha=0.6, label=f"{c} {s}, data")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of routed experts kept")
    ax.set_ylabel("pruned / full perplexity")
    full = result["full"]
    share = full["expert_bytes"] / full["model_bytes"] if full["model_bytes"] else 0
    top = ax.secondary_xaxis("top", functions=(lambda f: 1 - share * (1 - f), lambda m: 1 - (1 - m) / share
                                               if share else m))
    top.set_xlabel(f"fraction of model memory kept (full {format_bytes(full['model_bytes'])})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(f"How much can be pruned ({result['domain'] or 'profile'})", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    table = path.with_suffix(".json")
    atomic_write_bytes(table, (json.dumps(result, indent=1) + "\n").encode())
    return path, table
