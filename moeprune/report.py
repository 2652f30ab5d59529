"""Human-readable summaries and plots of profiles."""

from __future__ import annotations

import math
import os

import torch

from .errors import MoepruneError
from .profiles import CRITERIA, Profile, criterion_name


def concentration(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer: effective number of experts (exp of the entropy of the score shares) and the
    share held by the top quarter of experts."""
    share = scores.clamp(min=0) / scores.clamp(min=0).sum(-1, keepdim=True).clamp(min=1e-30)
    entropy = -(share * share.clamp(min=1e-30).log()).sum(-1)
    quarter = max(1, scores.shape[-1] // 4)
    top = share.topk(quarter, dim=-1).values.sum(-1)
    return entropy.exp(), top


def summarize_profile(profile: Profile, top: int = 5) -> str:
    m = profile.meta
    lines = [
        f"Profile of {m.get('family', m.get('model_type'))} model {m.get('model') or '(unnamed)'}",
        f"  domain        {profile.domain or '-'}",
        f"  fingerprint   {profile.fingerprint}",
        f"  prompts       {profile.n_prompts}   real tokens {profile.n_tokens}",
        f"  MoE layers    {len(profile.moe_layers)} (ids {_ranges(profile.moe_layers)}), "
        f"{profile.num_experts} experts each, top-{profile.top_k}",
        f"  written by    moeprune {m.get('moeprune_version', '?')} (format {m.get('format_version', '?')}), "
        f"{m.get('created', '?')}",
        "",
        "Routing concentration (by frequency): effective experts = exp(entropy of the routing shares);",
        f"top-quarter share = routing share of the {max(1, profile.num_experts // 4)} busiest experts.",
    ]
    eff, quarter = concentration(profile.scores("frequency"))
    width = max(5, len(str(max(profile.moe_layers))))
    lines.append(f"  {'layer':>{width}}  {'effective experts':>17}  {'top-quarter share':>17}")
    for i, layer in enumerate(profile.moe_layers):
        lines.append(f"  {layer:>{width}}  {eff[i].item():>10.1f} / {profile.num_experts:<4}  {quarter[i].item():>16.1%}")
    lines.append("")
    lines.append(f"Top {top} experts per layer, by criterion:")
    head = f"  {'layer':>{width}}  " + "  ".join(f"{c:<{_col(top)}}" for c in CRITERIA)
    lines.append(head)
    ranked = {c: profile.scores(c).argsort(dim=-1, descending=True)[:, :top] for c in CRITERIA}
    for i, layer in enumerate(profile.moe_layers):
        cells = [",".join(str(int(e)) for e in ranked[c][i]) for c in CRITERIA]
        lines.append(f"  {layer:>{width}}  " + "  ".join(f"{cell:<{_col(top)}}" for cell in cells))
    return "\n".join(lines)


def _col(top: int) -> int:
    return max(10, 4 * top)


def _ranges(ids: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(ids):
        if start is None:
            start = x
        if i + 1 == len(ids) or ids[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)


def plot_profile(profile: Profile, out: str | os.PathLike, criterion: str = "easy_ep") -> None:
    """Layer x expert heatmap of a criterion, each layer normalised to shares that sum to 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = criterion_name(criterion)
    scores = profile.scores(c).clamp(min=0)
    share = (scores / scores.sum(-1, keepdim=True).clamp(min=1e-30)).numpy()
    n_layers, n_experts = share.shape
    fig, ax = plt.subplots(figsize=(min(16, 2 + 0.25 * n_experts), min(12, 1.5 + 0.35 * n_layers)))
    im = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(n_layers), [str(x) for x in profile.moe_layers])
    step = max(1, math.ceil(n_experts / 32))
    ax.set_xticks(range(0, n_experts, step))
    ax.set_title(f"{c} share per layer — {profile.meta.get('model_type')}, domain {profile.domain or '-'}, "
                 f"{profile.n_prompts} prompts")
    fig.colorbar(im, ax=ax, label="share of the layer's score")
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=120)
    except (OSError, ValueError) as e:
        raise MoepruneError(f"cannot write plot {out}: {e}") from None
    finally:
        plt.close(fig)


def summarize_pattern(pattern, profile=None, diagnostics=None) -> str:
    """A pattern's budget and kept experts; with a profile, its routing-mass and miss-rate diagnostics."""
    from .pattern import diagnose

    m = pattern.meta
    counts = pattern.counts
    lines = [
        f"Pattern for {m.get('family') or m.get('model_type')} model {m.get('model') or ''}".rstrip(),
        f"  domains       {', '.join(m.get('domains') or []) or '-'}",
        f"  criterion     {m.get('criterion')}   keep {m.get('keep')}   strategy {m.get('strategy')}",
        f"  kept          {pattern.n_kept} of {len(counts) * pattern.num_experts} experts "
        f"({pattern.kept_fraction:.1%}); per layer {min(counts.values())}-{max(counts.values())}"
        f"{' (uniform)' if pattern.is_uniform else ' (non-uniform)'}",
        f"  fingerprint   {pattern.fingerprint}",
    ]
    if profile is not None and diagnostics is None:
        diagnostics = diagnose(profile, pattern)
    if diagnostics is not None:
        d = diagnostics
        lines.append(f"  routing mass kept {d.mean_mass_kept:.1%} (mean over layers)")
        if d.miss_rate is not None:
            lines.append(f"  tokens whose top-k hit a pruned expert: {d.mean_miss_rate:.1%} per layer on average, "
                         f"{d.any_layer_miss:.1%} in at least one layer ({d.n_tokens} calibration tokens)")
    lines.append("")
    head = f"  {'layer':>5}  {'kept':>4}"
    if diagnostics is not None:
        head += f"  {'mass kept':>9}"
        if diagnostics.miss_rate is not None:
            head += f"  {'miss rate':>9}"
    lines.append(head + "  experts")
    for layer, ids in pattern.kept.items():
        row = f"  {layer:>5}  {len(ids):>4}"
        if diagnostics is not None:
            row += f"  {diagnostics.mass_kept[layer]:>9.1%}"
            if diagnostics.miss_rate is not None:
                row += f"  {diagnostics.miss_rate[layer]:>9.1%}"
        lines.append(row + "  " + ",".join(map(str, ids)))
    return "\n".join(lines)
