"""The criteria benchmark: which experts to keep, measured by perplexity on held-out text.

For each domain: profile its calibration demonstrations (several counts, to show how few are
enough), select at each keep level with each criterion and strategy (plus random with several
seeds and a cross-domain baseline: the pattern of another domain's prompts), and measure
perplexity on the domain's eval text. The pruned models are evaluated through the keep-mask on
the full model, which gives exactly the slim model's logits (tested for every family) at a
fraction of the cost of loading each slim model.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ._io import atomic_write_bytes
from .errors import MoepruneError
from .evaluate import evaluate
from .hooks import keep_mask
from .pattern import Pattern
from .profiler import profile
from .prompts import read_documents, read_prompts
from .routers import get_adapter

DOMAINS = ("python", "c_headers", "legal", "bible", "german", "dictionary", "manpages")
REPORT_FILES = ("criteria.md", "criteria.json", "criteria_ratio.png", "pattern_overlap.png")


@dataclass
class BenchConfig:
    domains: tuple[str, ...] = DOMAINS
    calib_sizes: tuple[int, ...] = (8, 16, 64)
    keeps: tuple[float, ...] = (0.5, 0.25, 0.125)
    strategies: tuple[str, ...] = ("uniform", "global")
    criteria: tuple[str, ...] = ("frequency", "tcess", "easy_ep", "reap")
    random_seeds: tuple[int, ...] = (0, 1, 2)
    cross_criterion: str = "easy_ep"
    eval_tokens: int = 16384
    max_length: int = 256
    window: int = 256
    small_calib_criteria: tuple[str, ...] = ("frequency", "easy_ep", "reap")
    # Folding (moeprune.fold) against plain pruning, for these criteria and every strategy and keep:
    # each similarity is measured on the calibration texts, and the best there on the eval texts.
    fold_criteria: tuple[str, ...] = ()  # off by default: it lost to plain pruning (criteria-125/criteria.md)
    fold_similarities: tuple[str, ...] = ("router", "weights")
    fold_calib_tokens: int = 4096  # calibration-text tokens scored to choose the similarity
    # profile and evaluate layer by layer from the checkpoint (moeprune.stream), for a model that does not
    # fit: each pruned model is then the slim model run streamed, not a keep-mask on the loaded one
    stream: bool = False
    extra: dict = field(default_factory=dict)


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def run_benchmark(model_dir: str | os.PathLike, corpora: str | os.PathLike, config: BenchConfig | None = None,
                  progress: bool = True) -> dict:
    """Run the benchmark; returns {"config", "full", "rows", "overlap", "seconds"}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = config or BenchConfig()
    corpora = Path(corpora)
    for d in cfg.domains:
        for split in ("calib", "eval"):
            if not (corpora / d / f"{split}.jsonl").is_file():
                raise MoepruneError(f"corpus file missing: {corpora / d / f'{split}.jsonl'}")
    if cfg.stream and cfg.fold_criteria:
        raise MoepruneError("folding rewrites the loaded model's experts: it cannot run streamed (stream=False, "
                            "or no fold criteria)")
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(model_dir)
    # streamed: the checkpoint folder itself, run layer by layer in float32 by profile() and evaluate()
    model = model_dir if cfg.stream else AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    adapter = None if cfg.stream else get_adapter(model)
    run_kwargs = {"dtype": torch.float32} if cfg.stream else {}
    calib = {d: read_prompts(corpora / d / "calib.jsonl") for d in cfg.domains}
    texts = {d: read_documents(corpora / d / "eval.jsonl") for d in cfg.domains}
    calib_texts = {d: read_documents(corpora / d / "calib.jsonl") for d in cfg.domains}

    def ppl(d: str, pattern: Pattern | None, split: str = "eval") -> float:
        data = texts[d] if split == "eval" else calib_texts[d]
        tokens = cfg.eval_tokens if split == "eval" else cfg.fold_calib_tokens
        kwargs = dict(tokenizer=tok, window=cfg.window, max_tokens=tokens, batch_size=16, **run_kwargs)
        if pattern is None:
            return evaluate(model, data, **kwargs).perplexity
        if cfg.stream:
            return evaluate(model, data, pattern=pattern, **kwargs).perplexity
        with keep_mask(model, adapter, pattern.keep_masks()):
            return evaluate(model, data, **kwargs).perplexity

    largest = max(cfg.calib_sizes)
    profiles = {}
    for d in cfg.domains:
        for n in cfg.calib_sizes:
            profiles[d, n] = profile(model, calib[d][:n], tokenizer=tok, domain=d, max_length=cfg.max_length,
                                     **run_kwargs)
    full = {d: ppl(d, None) for d in cfg.domains}
    rows = []

    def add(d, n, keep, strategy, criterion, pattern, seed=None, source=None):
        value = ppl(d, pattern)
        rows.append({"domain": d, "calib": n, "keep": keep, "strategy": strategy, "criterion": criterion,
                     "seed": seed, "source": source or d, "ppl": value, "ratio": value / full[d],
                     "kept_per_layer": sorted(set(pattern.counts.values()))})

    fold_rows = []
    full_calib = {}
    if cfg.fold_criteria:
        from .fold import fold

        originals = {name: model.get_parameter(name).detach().clone()
                     for layer in adapter.moe_layers(model.config) for name in adapter.fused_keys(layer)}

        def restore():
            with torch.no_grad():
                for name, t in originals.items():
                    model.get_parameter(name).copy_(t)

        full_calib = {d: ppl(d, None, "calib") for d in cfg.domains}

    def add_fold(d, keep, strategy, criterion, pattern, prof):
        """Plain and folded ratios on the calibration texts for every similarity; the one with the lowest
        calibration ratio (chosen per domain, never on eval texts) is then measured on the eval texts."""
        base = {"domain": d, "keep": keep, "strategy": strategy, "criterion": criterion,
                "kept_per_layer": sorted(set(pattern.counts.values()))}

        def measure(sim, split):
            try:
                if sim is not None:
                    fold(model, pattern, prof, similarity=sim)
                value = ppl(d, pattern, split)
            finally:
                if sim is not None:
                    restore()
            full_ppl = full_calib[d] if split == "calib" else full[d]
            fold_rows.append({**base, "similarity": sim, "split": split, "ppl": value, "ratio": value / full_ppl})
            return value

        plain = [r for r in rows if (r["domain"], r["keep"], r["strategy"], r["criterion"], r["calib"], r["seed"])
                 == (d, keep, strategy, criterion, largest, None)]
        if len(plain) == 1 and plain[0]["kept_per_layer"] == base["kept_per_layer"]:  # measured already
            fold_rows.append({**base, "similarity": None, "split": "eval", "ppl": plain[0]["ppl"],
                              "ratio": plain[0]["ratio"]})
        else:
            measure(None, "eval")
        measure(None, "calib")
        calib_ppl = {sim: measure(sim, "calib") for sim in cfg.fold_similarities}
        chosen = min(calib_ppl, key=calib_ppl.get)
        measure(chosen, "eval")

    from tqdm.auto import tqdm

    bar = tqdm(cfg.domains, desc="criteria benchmark", unit="domain", disable=not progress)
    for i, d in enumerate(bar):
        for keep in cfg.keeps:
            prof = profiles[d, largest]
            for strategy in cfg.strategies:
                for c in cfg.criteria:
                    add(d, largest, keep, strategy, c, prof.select(keep=keep, criterion=c, strategy=strategy))
            for seed in cfg.random_seeds:
                add(d, largest, keep, "uniform", "random", prof.select(keep=keep, criterion="random", seed=seed),
                    seed=seed)
            for n in cfg.calib_sizes:
                if n == largest:
                    continue
                for c in cfg.small_calib_criteria:
                    add(d, n, keep, "uniform", c, profiles[d, n].select(keep=keep, criterion=c))
            if len(cfg.domains) > 1:
                other = cfg.domains[(i + 1) % len(cfg.domains)]
                add(d, largest, keep, "uniform", "cross-domain",
                    profiles[other, largest].select(keep=keep, criterion=cfg.cross_criterion), source=other)
            for strategy in cfg.strategies:
                for c in cfg.fold_criteria:
                    add_fold(d, keep, strategy, c, prof.select(keep=keep, criterion=c, strategy=strategy), prof)
    if cfg.fold_criteria:  # the model is the original again: the last fold was undone
        check = ppl(cfg.domains[0], None)
        if check != full[cfg.domains[0]]:
            raise MoepruneError(f"internal: folding was not undone ({check} != {full[cfg.domains[0]]})")
    overlap = {}
    for keep in cfg.keeps:
        pats = {d: profiles[d, largest].select(keep=keep, criterion=cfg.cross_criterion) for d in cfg.domains}
        overlap[str(keep)] = [[pats[a].jaccard(pats[b]) for b in cfg.domains] for a in cfg.domains]
    return {"config": asdict(cfg), "model": str(model_dir), "full": full, "rows": rows, "overlap": overlap,
            "full_calib": full_calib, "fold_rows": fold_rows,
            "n_experts": profiles[cfg.domains[0], largest].meta["num_experts"], "seconds": time.time() - t0}


def fold_summary(fold_rows: list[dict]) -> dict[tuple, float]:
    """(criterion, strategy, keep, method, split) -> geometric mean over domains of pruned / full perplexity;
    method is "plain", "folded" (eval texts: the similarity each domain chose on its calibration texts) or
    the similarity (calibration texts)."""
    groups: dict[tuple, list[float]] = {}
    for r in fold_rows:
        sim = r["similarity"]
        method = "plain" if sim is None else ("folded" if r["split"] == "eval" else sim)
        groups.setdefault((r["criterion"], r["strategy"], r["keep"], method, r["split"]), []).append(r["ratio"])
    return {k: _geomean(v) for k, v in groups.items()}


def summary(result: dict) -> dict[tuple, float]:
    """(criterion, strategy, calib, keep) -> geometric mean over domains of pruned/full perplexity."""
    groups: dict[tuple, list[float]] = {}
    for r in result["rows"]:
        groups.setdefault((r["criterion"], r["strategy"], r["calib"], r["keep"]), []).append(r["ratio"])
    return {k: _geomean(v) for k, v in groups.items()}


def markdown(result: dict) -> str:
    cfg = result["config"]
    keeps = cfg["keeps"]
    largest = max(cfg["calib_sizes"])
    s = summary(result)
    n = result["n_experts"]
    head = "| criterion | strategy | " + " | ".join(f"keep {round(k * n)}/{n}" for k in keeps) + " |"
    lines = [f"Pruned / full perplexity, geometric mean over {len(cfg['domains'])} domains "
             f"({largest} calibration prompts, {cfg['eval_tokens']} eval tokens per domain):", "", head,
             "|---|---|" + "---|" * len(keeps)]
    order = [(c, st) for c in cfg["criteria"] for st in cfg["strategies"]]
    order += [("random", "uniform"), ("cross-domain", "uniform")]
    for c, st in order:
        vals = [s.get((c, st, largest, k)) for k in keeps]
        if all(v is None for v in vals):
            continue
        label = {"random": f"random ({len(cfg['random_seeds'])} seeds)",
                 "cross-domain": f"another domain's {cfg['cross_criterion']}"}.get(c, c)
        lines.append(f"| {label} | {st} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + " |")
    if len(cfg["calib_sizes"]) > 1:
        lines += ["", "How few demonstrations are enough (uniform):", "",
                  "| criterion | prompts | " + " | ".join(f"keep {round(k * n)}/{n}" for k in keeps) + " |",
                  "|---|---|" + "---|" * len(keeps)]
        for c in cfg["small_calib_criteria"]:
            for m in sorted(cfg["calib_sizes"]):
                vals = [s.get((c, "uniform", m, k)) for k in keeps]
                lines.append(f"| {c} | {m} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + " |")
    lines += ["", "Per domain (full perplexity, and pruned/full for each criterion, uniform):", "",
              "| domain | full | " + " | ".join(f"{c} @{round(k * n)}" for k in keeps for c in cfg["criteria"]) + " |",
              "|---|---|" + "---|" * (len(keeps) * len(cfg["criteria"]))]
    by = {(r["domain"], r["criterion"], r["keep"]): r["ratio"] for r in result["rows"]
          if r["strategy"] == "uniform" and r["calib"] == largest and r["seed"] is None}
    for d in cfg["domains"]:
        cells = [f"{by[d, c, k]:.3f}" for k in keeps for c in cfg["criteria"]]
        lines.append(f"| {d} | {result['full'][d]:.2f} | " + " | ".join(cells) + " |")
    if result.get("fold_rows"):
        lines += ["", *_fold_markdown(result)]
    return "\n".join(lines)


def _fold_markdown(result: dict) -> list[str]:
    cfg, rows, n = result["config"], result["fold_rows"], result["n_experts"]
    keeps, s = cfg["keeps"], fold_summary(rows)
    cols = " | ".join(f"keep {round(k * n)}/{n}" for k in keeps)
    sims = cfg["fold_similarities"]
    lines = ["Folding (each pruned expert merged into its most similar kept expert, weighted by routing mass) "
             f"against plain pruning: pruned / full perplexity, geometric mean over {len(cfg['domains'])} domains; "
             f"eval texts, and calibration texts ({cfg['fold_calib_tokens']} tokens, which choose the similarity "
             "per domain):", "",
             f"| criterion | strategy | measured on | method | {cols} |", "|---|---|---|---|" + "---|" * len(keeps)]
    for c in cfg["fold_criteria"]:
        for st in cfg["strategies"]:
            for split, methods in (("eval", ("plain", "folded")), ("calib", ("plain", *sims))):
                for m in methods:
                    vals = [s.get((c, st, k, m, split)) for k in keeps]
                    label = m if m in ("plain", "folded") else f"folded by {m}"
                    lines.append(f"| {c} | {st} | {split} | {label} | "
                                 + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + " |")
    by = {(r["domain"], r["criterion"], r["strategy"], r["keep"], r["similarity"] is None): r
          for r in rows if r["split"] == "eval"}
    for c in cfg["fold_criteria"]:
        for st in cfg["strategies"]:
            lines += ["", f"Per domain, {c} {st}: eval texts, pruned / full (folded: with the similarity chosen on "
                      "the domain's calibration texts, r = router rows, w = weights; * where folding is better):", "",
                      "| domain | " + " | ".join(f"plain @{round(k * n)} | folded @{round(k * n)}" for k in keeps)
                      + " |", "|---|" + "---|---|" * len(keeps)]
            wins = dict.fromkeys(keeps, 0)
            for d in cfg["domains"]:
                cells = []
                for k in keeps:
                    plain, folded = by[d, c, st, k, True]["ratio"], by[d, c, st, k, False]
                    better = folded["ratio"] < plain
                    wins[k] += better
                    cells += [f"{plain:.3f}", f"{folded['ratio']:.3f} ({folded['similarity'][0]})" + "*" * better]
                lines.append(f"| {d} | " + " | ".join(cells) + " |")
            lines.append("| folding better on | " + " | ".join(f" | {wins[k]}/{len(cfg['domains'])}" for k in keeps)
                         + " |")
    return lines


def plots(result: dict, out_dir: str | os.PathLike) -> list[Path]:
    """ratio-vs-kept-fraction per criterion, and a domain x domain Jaccard heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = result["config"]
    s = summary(result)
    largest = max(cfg["calib_sizes"])
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for c in [*cfg["criteria"], "random", "cross-domain"]:
        for st in cfg["strategies"]:
            pts = [(k, s[c, st, largest, k]) for k in cfg["keeps"] if (c, st, largest, k) in s]
            if not pts:
                continue
            xs, ys = zip(*sorted([(1.0, 1.0), *pts]), strict=True)
            ax.plot(xs, ys, marker="o", linestyle="-" if st == "uniform" else "--", label=f"{c} ({st})")
    ax.set_xlabel("fraction of experts kept")
    ax.set_ylabel("pruned / full perplexity (geo. mean)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Perplexity cost of pruning, by criterion")
    fig.tight_layout()
    p1 = out / "criteria_ratio.png"
    fig.savefig(p1, dpi=120)
    plt.close(fig)

    keep = str(cfg["keeps"][0])
    m = torch.tensor(result["overlap"][keep])
    fig, ax = plt.subplots(figsize=(5.5, 4.6))
    im = ax.imshow(m, cmap="magma", vmin=0, vmax=1)
    names = cfg["domains"]
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if m[i, j] > 0.6 else "white")
    ax.set_title(f"Pattern overlap (Jaccard), {cfg['cross_criterion']}, keep {float(keep):.0%}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    p2 = out / "pattern_overlap.png"
    fig.savefig(p2, dpi=120)
    plt.close(fig)
    return [p1, p2]


def write_report(result: dict, out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    atomic_write_bytes(out / "criteria.json", json.dumps(result, indent=1).encode())
    atomic_write_bytes(out / "criteria.md", (markdown(result) + "\n").encode())
    plots(result, out)
    return out
