"""How much can be pruned: the smallest expert budget that meets a quality target.

`select_for_target(profile, model, prompts, max_loss=0.02)` predicts, from the profile's own
demonstrations, the perplexity loss of keeping each of a few candidate budgets, and returns the
pattern of the smallest budget whose predicted loss stays within `max_loss`, with a `BudgetReport`.

The prediction is k-fold cross-validation over the demonstrations: the prompts are shuffled
(seeded) into `folds` parts and each part is profiled once. For fold i, the other parts' profiles
are merged, a pattern is selected from that merge at each candidate budget, and the pruned
model's perplexity on fold i's (held-out) demonstrations, each cut to the profile's max_length
tokens as profiling cut it, is compared with the full model's:
loss = pruned / full - 1. Each fold's loss curve is made monotone (a smaller budget never loses
less: cumulative max from large to small budgets), anchored at "all experts" (loss 0, exactly),
and interpolated in the budget (geometrically between positive losses, see `_interp`); the predicted loss is the mean of the fold curves, its
spread their min and max. The chosen budget is the smallest legal one (at or above the smallest
candidate) whose predicted loss is within the target. The pattern itself is selected from the
whole profile.

`min_mass=0.98` needs no model: the smallest legal budget whose pattern keeps at least that share
of the routing mass the profile saw (`diagnose(...).mean_mass_kept`, the mean over MoE layers).

Budgets are experts per layer under strategy "uniform" and the total over all MoE layers under
"global"; every candidate is a legal budget (at least `min_count` per layer, and a multiple of the
group count for group-limited routers).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .errors import MoepruneError
from .pattern import (
    Pattern,
    _check_choice,
    _check_profile,
    _criterion_scores,
    _layer_choice,
    _pattern_meta,
    _source,
    _unit,
    diagnose,
    layer_shares,
    min_count,
    resolve_keep,
    select_counts_global,
)

# kept fractions tried by default (legalised: raised to the router's minimum, rounded to its groups)
DEFAULT_FRACTIONS = (1 / 32, 2 / 32, 4 / 32, 8 / 32, 16 / 32, 24 / 32)


# ---------------------------------------------------------------------- targets
def parse_fraction(text, flag: str = "--max-loss") -> float:
    """'2%' or '0.02' as 0.02; a one-line error for anything that is not a number."""
    s = str(text).strip()
    scale = 1.0
    if s.endswith("%"):
        s, scale = s[:-1].strip(), 0.01
    try:
        value = float(s) * scale
    except ValueError:
        raise MoepruneError(f"{flag} must be a fraction (0.02) or a percentage (2%), got {text!r}") from None
    if math.isnan(value) or math.isinf(value):
        raise MoepruneError(f"{flag} must be a finite number, got {text!r}")
    return value


def check_target(max_loss=None, min_mass=None) -> tuple[str, float]:
    """('max_loss', x) or ('min_mass', x), checked; exactly one of the two must be given."""
    if (max_loss is None) == (min_mass is None):
        raise MoepruneError("give exactly one target: max_loss (a perplexity loss, e.g. 0.02) or min_mass "
                            "(a share of routing mass to keep, e.g. 0.98)")
    kind, value = ("max_loss", max_loss) if max_loss is not None else ("min_mass", min_mass)
    if isinstance(value, str):
        value = parse_fraction(value, kind)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(float(value)) \
            or math.isinf(float(value)):
        raise MoepruneError(f"{kind} must be a number, got {value!r}")
    value = float(value)
    if kind == "max_loss" and not 0.0 <= value < 1.0:
        raise MoepruneError(f"max_loss {value:g} ({value:.0%}) is out of range: give a perplexity loss in [0, 1) "
                            f"(0.02 or '2%' allows 2% higher perplexity)")
    if kind == "min_mass" and not 0.0 < value <= 1.0:
        raise MoepruneError(f"min_mass {value:g} ({value:.0%}) is out of range: give a share of routing mass in (0, 1] "
                            f"(0.98 or '98%')")
    return kind, value


# ---------------------------------------------------------------------- budgets
def legal_budgets(profile, strategy: str) -> list[int]:
    """Every legal budget, ascending: experts per layer (uniform) or in total (global)."""
    n, top_k, groups = profile.num_experts, profile.top_k, profile.meta.get("groups")
    lowest, unit = min_count(top_k, groups), _unit(groups)
    per_layer = list(range(lowest, n + 1, unit))
    if strategy == "uniform":
        return per_layer
    n_layers = len(profile.moe_layers)
    return list(range(lowest * n_layers, n * n_layers + 1, unit))


def candidate_budgets(profile, strategy: str, candidates: Sequence | None = None) -> list[int]:
    """Legal budgets below "all experts" to measure, ascending.

    `candidates`: kept fractions or counts per layer (each must be legal, see `resolve_keep`);
    default: DEFAULT_FRACTIONS, each raised to the smallest legal count at or above it."""
    n, top_k, groups = profile.num_experts, profile.top_k, profile.meta.get("groups")
    lowest, unit = min_count(top_k, groups), _unit(groups)
    if candidates is None:
        counts = set()
        for f in DEFAULT_FRACTIONS:
            c = max(lowest, math.ceil(f * n - 1e-9))
            c = min(n, -(-c // unit) * unit)
            counts.add(c)
    else:
        if isinstance(candidates, (str, bytes)) or not hasattr(candidates, "__iter__"):
            raise MoepruneError(f"candidates must be a list of kept fractions or counts, got {candidates!r}")
        counts = {resolve_keep(c, n, top_k, groups) for c in candidates}
    counts = sorted(c for c in counts if c < n)
    if not counts:
        raise MoepruneError(f"no candidate budget below all {n} experts per layer; give smaller candidates")
    n_layers = len(profile.moe_layers)
    return counts if strategy == "uniform" else [c * n_layers for c in counts]


def pattern_at(profile, budget: int, criterion: str = "easy_ep", strategy: str = "uniform",
               seed: int = 0) -> Pattern:
    """The pattern `profile` selects at a legal budget (per layer under uniform, total under global)."""
    _check_profile(profile)
    crit = _check_choice(criterion, strategy, seed)
    if budget not in legal_budgets(profile, strategy):
        raise MoepruneError(f"{budget} is not a legal {strategy} budget for this model (see legal_budgets)")
    n_layers, n = len(profile.moe_layers), profile.num_experts
    groups = profile.meta.get("groups")
    shares = layer_shares(_criterion_scores(profile, crit, seed))
    if strategy == "uniform":
        counts = [budget] * n_layers
    else:
        counts = select_counts_global(shares, budget, profile.top_k, groups)
    kept = {layer: _layer_choice(shares[i], counts[i], groups) for i, layer in enumerate(profile.moe_layers)}
    per_layer = budget if strategy == "uniform" else budget / n_layers
    keep = budget if strategy == "uniform" and budget >= 2 else per_layer / n
    meta = _pattern_meta(profile, crit, keep, strategy, seed, [profile.domain] if profile.domain else [],
                         [_source(profile)])
    meta["budget"] = sum(counts)
    return Pattern(kept, meta)


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    """Interpolation over ascending xs (x within their range): geometric between two positive
    losses (a loss falls about exponentially as experts are added, so a straight chord would
    overstate it), linear otherwise (towards the exact 0 of keeping every expert)."""
    for i in range(len(xs) - 1):
        if xs[i] <= x <= xs[i + 1]:
            t = (x - xs[i]) / (xs[i + 1] - xs[i]) if xs[i + 1] > xs[i] else 0.0
            a, b = ys[i], ys[i + 1]
            if a > 0 and b > 0:
                return a * (b / a) ** t
            return a + t * (b - a)
    raise ValueError(f"{x} outside [{xs[0]}, {xs[-1]}]")


def predict(xs: Sequence[int], curves: Sequence[Sequence[float]], budget: float) -> tuple[float, float, float]:
    """(mean, min, max) over folds of each fold's interpolated loss at `budget`."""
    at = [_interp(list(xs), list(c), budget) for c in curves]
    return sum(at) / len(at), min(at), max(at)


def monotone(losses: list[float]) -> list[float]:
    """Loss per ascending budget, made non-increasing in the budget (cumulative max from the largest)."""
    out = list(losses)
    for i in range(len(out) - 2, -1, -1):
        out[i] = max(out[i], out[i + 1])
    return out


def choose_budget(legal: Sequence[int], xs: Sequence[int], curves: Sequence[Sequence[float]],
                  max_loss: float) -> int:
    """The smallest legal budget in [xs[0], xs[-1]] whose predicted loss is at most `max_loss`.

    `xs`: ascending measured budgets, the last one "all experts" (loss 0); `curves`: per fold, the
    monotone loss at each. Returns xs[-1] when only keeping everything meets the target. Every
    curve is non-increasing, so their mean is, and a looser target never gives a larger budget."""
    return next((b for b in legal if xs[0] <= b <= xs[-1] and predict(xs, curves, b)[0] <= max_loss + 1e-12),
                xs[-1])


# ---------------------------------------------------------------------- k-fold
class Folds:
    """The demonstrations split into `k` seeded folds, each profiled once; the full model's
    perplexity on each fold; and the held-out loss of any selection rule."""

    def __init__(self, model: nn.Module, tokenizer, prompts, k: int = 4, seed: int = 0,
                 max_length: int | None = None, window: int | None = None, max_tokens: int | None = None,
                 batch_size: int = 8, reference=None):
        from .evaluate import evaluate
        from .models import check_int
        from .profiler import profile
        from .prompts import read_prompts, render
        from .routers import get_adapter

        check_int(k, "folds", minimum=2)
        check_int(seed, "seed")
        items = read_prompts(prompts)
        if len(items) < k:
            raise MoepruneError(f"{len(items)} demonstration(s) are too few for {k} folds: give at least {k} "
                                f"prompts or fewer folds")
        if reference is not None and len(items) != reference.n_prompts:
            raise MoepruneError(f"the profile was made from {reference.n_prompts} prompts but {len(items)} were "
                                "given: pass the prompts the profile was made from")
        self.model, self.tokenizer, self.k, self.seed = model, tokenizer, k, seed
        self.window, self.max_tokens, self.batch_size = window, max_tokens, batch_size
        self.adapter = get_adapter(model)
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
        self.index = [sorted(order[i::k]) for i in range(k)]
        if max_length is None and reference is not None:
            max_length = reference.meta.get("max_length")
        self.profiles = [profile(model, [items[i] for i in idx], tokenizer=tokenizer, max_length=max_length,
                                 batch_size=batch_size, domain=reference.domain if reference else None,
                                 routing_tokens=0)
                         for idx in self.index]
        if reference is not None:
            if self.profiles[0].fingerprint != reference.fingerprint:
                raise MoepruneError("the profile was made with another model (fingerprints differ)")
            tokens = sum(p.n_tokens for p in self.profiles)
            if tokens != reference.n_tokens:
                raise MoepruneError(f"the prompts give {tokens} tokens but the profile saw {reference.n_tokens}: "
                                    "pass the prompts (and max_length) the profile was made from")
        # each held-out demonstration as profiled: cut to the profile's max_length tokens
        cut = self.profiles[0].meta["max_length"]
        texts = []
        for idx in self.index:
            fold_texts = []
            for i in idx:
                text = render(items[i], tokenizer)
                ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
                fold_texts.append(tokenizer.decode(ids[:cut]) if len(ids) > cut else text)
            texts.append(fold_texts)
        self.texts = texts
        self._evaluate = evaluate
        self.full = [self._nll(texts) for texts in self.texts]
        self.eval_tokens = sum(t for _, t in self.full)
        self._train: dict[int, object] = {}

    def _nll(self, texts, pattern: Pattern | None = None) -> tuple[float, int]:
        from .hooks import keep_mask

        kwargs = dict(tokenizer=self.tokenizer, window=self.window, max_tokens=self.max_tokens,
                      batch_size=self.batch_size)
        if pattern is None:
            r = self._evaluate(self.model, texts, **kwargs)
        else:
            with keep_mask(self.model, self.adapter, pattern.keep_masks()):
                r = self._evaluate(self.model, texts, **kwargs)
        return r.nll, r.tokens

    def train(self, i: int):
        """The merged profile of every fold but `i`."""
        if i not in self._train:
            merged = None
            for j, p in enumerate(self.profiles):
                if j != i:
                    merged = p if merged is None else merged.merge(p)
            self._train[i] = merged
        return self._train[i]

    def losses(self, budget: int, criterion: str, strategy: str, seed: int = 0) -> list[float]:
        """Per fold: perplexity of the pattern selected without the fold, on the fold, / full - 1."""
        out = []
        for i in range(self.k):
            pattern = pattern_at(self.train(i), budget, criterion, strategy, seed)
            nll, _ = self._nll(self.texts[i], pattern)
            out.append(math.exp(nll - self.full[i][0]) - 1.0)
        return out


# ---------------------------------------------------------------------- report
@dataclass
class Candidate:
    budget: int
    kept_fraction: float
    mass_kept: float  # on the whole profile, of the pattern selected from it
    fold_losses: list[float] | None = None  # measured, held out, per fold
    loss: float | None = None  # mean over folds of the monotone fold curves
    loss_min: float | None = None
    loss_max: float | None = None


@dataclass
class BudgetReport:
    """What `select_for_target` chose and why. Losses are perplexity ratios minus 1 (0.02 = 2%)."""

    target: dict  # {"max_loss": x} or {"min_mass": x}
    criterion: str
    strategy: str
    budget: int  # experts per layer (uniform) or in total (global)
    per_layer: float  # experts kept per layer (mean under global)
    num_experts: int
    n_layers: int
    kept_fraction: float  # of the routed experts' parameters (all experts of a model are one size)
    mass_kept: float
    predicted_loss: float | None = None
    loss_spread: tuple[float, float] | None = None  # min and max over folds
    folds: int | None = None
    seed: int = 0
    n_prompts: int = 0
    eval_tokens: int | None = None  # held-out tokens scored per candidate, all folds together
    expert_bytes: int | None = None  # all routed experts' parameters, in the loaded model's dtype
    saved_bytes: int | None = None  # of those, what the pattern drops
    model_bytes: int | None = None
    candidates: list[Candidate] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        unit = "per layer" if self.strategy == "uniform" else f"in total ({self.per_layer:.1f} per layer)"
        kind, value = next(iter(self.target.items()))
        goal = (f"perplexity loss <= {value:.2%}" if kind == "max_loss" else f"routing mass kept >= {value:.2%}")
        lines = [f"target    {goal} ({self.criterion}, {self.strategy})",
                 f"budget    {self.budget} experts {unit} of {self.num_experts}: "
                 f"{self.kept_fraction:.1%} of the routed experts kept"]
        if self.predicted_loss is not None:
            lo, hi = self.loss_spread
            lines.append(f"predicted perplexity loss {self.predicted_loss:+.2%} (folds {lo:+.2%} .. {hi:+.2%}; "
                         f"{self.folds}-fold over {self.n_prompts} demonstrations, {self.eval_tokens} held-out tokens)")
        lines.append(f"mass kept {self.mass_kept:.2%} of the routing mass the profile saw")
        if self.expert_bytes is not None:
            from ._io import format_bytes

            lines.append(f"memory    experts {format_bytes(self.expert_bytes)} -> "
                         f"{format_bytes(self.expert_bytes - self.saved_bytes)} (saves {format_bytes(self.saved_bytes)}"
                         f"; model {format_bytes(self.model_bytes)} -> "
                         f"{format_bytes(self.model_bytes - self.saved_bytes)})")
        else:
            lines.append(f"memory    saves {1 - self.kept_fraction:.1%} of the routed experts' parameters")
        if self.candidates:
            lines.append("candidates:")
            has_loss = any(c.loss is not None for c in self.candidates)
            head = f"  {'budget':>7} {'kept':>6} {'mass':>7}"
            lines.append(head + (f" {'loss':>8} {'min':>8} {'max':>8}" if has_loss else ""))
            for c in self.candidates:
                row = f"  {c.budget:>7} {c.kept_fraction:>6.1%} {c.mass_kept:>7.2%}"
                if c.loss is not None:
                    row += f" {c.loss:>+8.2%} {c.loss_min:>+8.2%} {c.loss_max:>+8.2%}"
                mark = "  <- chosen" if c.budget == self.budget else ""
                lines.append(row + mark)
        return "\n".join(lines)

    __str__ = format


def expert_bytes(model: nn.Module) -> tuple[int, int, dict[int, int]]:
    """(all routed experts' parameter bytes, all parameter bytes, MoE layer -> bytes of one expert)."""
    from .routers import get_adapter

    adapter = get_adapter(model)
    n = adapter.num_experts(model.config)
    per_expert, total = {}, 0
    for layer, block in adapter.blocks(model):
        b = sum(p.numel() * p.element_size() for p in adapter.experts(block).parameters())
        per_expert[layer] = b // n
        total += b
    seen, model_total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            model_total += p.numel() * p.element_size()
    return total, model_total, per_expert


def _load(model, tokenizer, dtype, device):
    from .models import load_model

    if isinstance(model, (str, os.PathLike)):
        loaded, tok = load_model(model, dtype=dtype, device=str(device))
        return loaded.eval(), tokenizer or tok
    if not isinstance(model, nn.Module):
        raise MoepruneError(f"model must be a loaded transformers model or a checkpoint folder, "
                            f"got {type(model).__name__}")
    if tokenizer is None:
        raise MoepruneError("a loaded model needs its tokenizer: pass tokenizer=...")
    return model, tokenizer


class BudgetSearch:
    """The budget search for one profile, criterion and strategy: measures the k-fold losses once
    (on the first `max_loss` target) and answers any number of targets from them.

        search = BudgetSearch(profile, model, prompts, tokenizer=tok, folds=4)
        pattern, report = search.select(max_loss=0.02)
        pattern5, report5 = search.select(max_loss="5%")   # no new measurement

    `model`: a loaded model (with `tokenizer`) or a checkpoint folder, loaded once, whole; `prompts`:
    the demonstrations the profile was made from (a profile does not store them; their count and
    token count are checked against it). Neither is needed for `min_mass`. `candidates`: kept
    fractions or counts per layer to measure (default 1/32 .. 24/32 of the experts, legal budgets
    only). `max_tokens` caps the held-out tokens scored per fold; `window` is the evaluation window;
    `max_length` the prompts' cut for the fold profiles (default: the profile's).
    """

    def __init__(self, profile, model: nn.Module | str | os.PathLike | None = None, prompts=None, *,
                 criterion: str = "easy_ep", strategy: str = "uniform", folds: int = 4, seed: int = 0,
                 candidates: Sequence | None = None, tokenizer=None, max_length: int | None = None,
                 window: int | None = None, max_tokens: int | None = None, batch_size: int = 8, dtype=None,
                 device: str | torch.device = "cpu"):
        from .models import check_int

        self.profile = _check_profile(profile)
        self.criterion = _check_choice(criterion, strategy, seed)
        self.strategy, self.seed = strategy, seed
        self.folds = check_int(folds, "folds", minimum=2)
        self.budgets = candidate_budgets(profile, strategy, candidates)
        self._model, self._prompts, self._tokenizer = model, prompts, tokenizer
        self._eval = dict(max_length=max_length, window=window, max_tokens=max_tokens, batch_size=batch_size)
        self._load_args = (dtype, device)
        self._loaded = self._measured = None
        self._mass: dict[int, float] = {}
        n, n_layers = profile.num_experts, len(profile.moe_layers)
        self.n, self.n_layers = n, n_layers
        self.full_budget = n if strategy == "uniform" else n * n_layers

    # ------------------------------------------------------------ pieces
    def mass(self, budget: int) -> float:
        """Mean over MoE layers of the routing mass the profile saw that the pattern keeps."""
        if budget not in self._mass:
            pattern = pattern_at(self.profile, budget, self.criterion, self.strategy, self.seed)
            self._mass[budget] = diagnose(self.profile, pattern).mean_mass_kept
        return self._mass[budget]

    def _model_loaded(self, need_tokenizer: bool):
        if not need_tokenizer and isinstance(self._model, nn.Module):
            return self._model, self._tokenizer
        if self._loaded is None:
            self._loaded = _load(self._model, self._tokenizer, *self._load_args)
        return self._loaded

    def measure(self) -> list[list[float]]:
        """Per candidate budget, the held-out loss of each fold (measured once)."""
        if self._measured is None:
            if self._model is None or self._prompts is None:
                raise MoepruneError("max_loss needs the model and the prompts the profile was made from "
                                    "(use min_mass for a target from the profile alone)")
            model, tok = self._model_loaded(need_tokenizer=True)
            fold = Folds(model, tok, self._prompts, k=self.folds, seed=self.seed, reference=self.profile,
                         **self._eval)
            self.eval_tokens = fold.eval_tokens
            self._measured = [fold.losses(b, self.criterion, self.strategy, self.seed) for b in self.budgets]
        return self._measured

    def curves(self) -> tuple[list[int], list[list[float]]]:
        """(budgets with "all experts" last, per fold the monotone loss at each)."""
        measured = self.measure()
        xs = [*self.budgets, self.full_budget]
        return xs, [monotone([m[i] for m in measured] + [0.0]) for i in range(self.folds)]

    # ------------------------------------------------------------ the answer
    def select(self, max_loss: float | str | None = None, min_mass: float | str | None = None
               ) -> tuple[Pattern, BudgetReport]:
        """The pattern of the smallest budget that meets the one target given, and its report."""
        kind, value = check_target(max_loss, min_mass)
        prof, strategy, n, n_layers = self.profile, self.strategy, self.n, self.n_layers
        common = dict(target={kind: value}, criterion=self.criterion, strategy=strategy, num_experts=n,
                      n_layers=n_layers, seed=self.seed, n_prompts=prof.n_prompts)
        if kind == "min_mass":
            chosen = next(b for b in legal_budgets(prof, strategy) if self.mass(b) >= value - 1e-12)
            cands = [Candidate(b, _kept(b, strategy, n, n_layers), self.mass(b))
                     for b in sorted({*self.budgets, chosen})]
            report = BudgetReport(budget=chosen, per_layer=_per_layer(chosen, strategy, n_layers),
                                  kept_fraction=_kept(chosen, strategy, n, n_layers), mass_kept=self.mass(chosen),
                                  candidates=cands, **common)
        else:
            xs, curves = self.curves()
            measured = self.measure()
            chosen = choose_budget(legal_budgets(prof, strategy), xs, curves, value)
            if chosen == xs[-1]:
                mean, lo, _ = predict(xs, curves, xs[-2])
                raise MoepruneError(
                    f"no pruning meets max_loss {value:.2%}: even the largest candidate "
                    f"({xs[-2]} {'per layer' if strategy == 'uniform' else 'in total'}) loses {mean:+.2%} "
                    f"(folds from {lo:+.2%}); raise max_loss or keep all experts")
            cands = [Candidate(b, _kept(b, strategy, n, n_layers), self.mass(b), measured[j], *predict(xs, curves, b))
                     for j, b in enumerate(self.budgets)]
            at = predict(xs, curves, chosen)
            if chosen not in self.budgets:
                cands.append(Candidate(chosen, _kept(chosen, strategy, n, n_layers), self.mass(chosen), None, *at))
                cands.sort(key=lambda c: c.budget)
            report = BudgetReport(budget=chosen, per_layer=_per_layer(chosen, strategy, n_layers),
                                  kept_fraction=_kept(chosen, strategy, n, n_layers), mass_kept=self.mass(chosen),
                                  predicted_loss=at[0], loss_spread=(at[1], at[2]), folds=self.folds,
                                  eval_tokens=self.eval_tokens, candidates=cands, **common)
        pattern = pattern_at(prof, chosen, self.criterion, strategy, self.seed)
        if self._model is not None:  # the bytes saved
            total, model_total, per_expert = expert_bytes(self._model_loaded(need_tokenizer=False)[0])
            kept_bytes = sum(len(ids) * per_expert.get(layer, 0) for layer, ids in pattern.kept.items())
            report.expert_bytes, report.saved_bytes, report.model_bytes = total, total - kept_bytes, model_total
        pattern.meta["target"] = {kind: value, "folds": report.folds, "predicted_loss": report.predicted_loss,
                                  "loss_spread": list(report.loss_spread) if report.loss_spread else None}
        return pattern, report


def select_for_target(
    profile,
    model: nn.Module | str | os.PathLike | None = None,
    prompts=None,
    *,
    max_loss: float | str | None = None,
    min_mass: float | str | None = None,
    criterion: str = "easy_ep",
    strategy: str = "uniform",
    folds: int = 4,
    seed: int = 0,
    candidates: Sequence | None = None,
    tokenizer=None,
    max_length: int | None = None,
    window: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    dtype=None,
    device: str | torch.device = "cpu",
) -> tuple[Pattern, BudgetReport]:
    """The pattern of the smallest budget that meets the target, and a `BudgetReport`.

    Exactly one target: `max_loss` (a fraction, 0.02 or "2%": the most the perplexity may rise,
    predicted by `folds`-fold cross-validation over `prompts`, the demonstrations the profile was
    made from, with `model`, a loaded model with `tokenizer` or a checkpoint folder) or `min_mass`
    (a share of routing mass to keep, from the profile alone). The other arguments are
    `BudgetSearch`'s; use a `BudgetSearch` to answer several targets from one measurement.
    """
    check_target(max_loss, min_mass)  # a bad target fails before any work
    search = BudgetSearch(profile, model, prompts, criterion=criterion, strategy=strategy, folds=folds, seed=seed,
                          candidates=candidates, tokenizer=tokenizer, max_length=max_length, window=window,
                          max_tokens=max_tokens, batch_size=batch_size, dtype=dtype, device=device)
    return search.select(max_loss=max_loss, min_mass=min_mass)


def _per_layer(budget: int, strategy: str, n_layers: int) -> float:
    return float(budget) if strategy == "uniform" else budget / n_layers


def _kept(budget: int, strategy: str, n: int, n_layers: int) -> float:
    return budget / n if strategy == "uniform" else budget / (n * n_layers)
