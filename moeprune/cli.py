"""The `moeprune` command line. Errors print one line and return a non-zero status."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from ._io import BATCH_KERNEL_CACHE, SERVE_KERNEL_CACHE, bound_kernel_caches
from .budget import parse_budget
from .errors import MoepruneError


def _cmd_profile(args) -> int:
    from ._io import check_output_dir
    from .profiler import profile

    out = check_output_dir(args.output, force=args.force, protect=_local(args.model), what="profile folder")
    prof = profile(
        args.model, Path(args.prompts), domain=args.domain, batch_size=args.batch_size, max_length=args.max_length,
        tcess_threshold=args.tcess_threshold, dtype=args.dtype, progress=not args.quiet, **_stream_args(args),
    )
    prof.save(out, overwrite=args.force)
    cut = prof.meta.get("n_cut") or 0
    if cut:
        print(f"note: {cut} of {prof.n_prompts} prompts were longer than {prof.meta['max_length']} tokens "
              "and were cut (--max-length)")
    print(f"profiled {prof.n_prompts} prompts ({prof.n_tokens} tokens) over {len(prof.moe_layers)} MoE layers "
          f"x {prof.num_experts} experts -> {out}")
    return 0


def _local(model: str) -> list[str]:
    """The model folder to protect from an output path (a hub id names no local folder)."""
    return [model] if Path(model).exists() else []


def _load_artefact(path: str):
    from .pattern import Pattern
    from .profiles import Profile

    p = Path(path)
    if p.is_dir() and (p / "profile.json").exists():
        return Profile.load(p)
    if p.is_file() and p.suffix == ".json":
        return Pattern.load(p)
    if p.is_dir() and (p / "pattern.json").exists():
        return Pattern.load(p / "pattern.json")
    if not p.exists():
        raise MoepruneError(f"not found: {p}")
    raise MoepruneError(f"{p} is neither a moeprune profile folder nor a pattern file")


def _cmd_inspect(args) -> int:
    from .profiles import Profile
    from .report import summarize_pattern, summarize_profile

    art = _load_artefact(args.path)
    if isinstance(art, Profile):
        print(summarize_profile(art, top=args.top))
    else:
        profile = Profile.load(args.profile) if args.profile else None
        print(summarize_pattern(art, profile))
    return 0


def _cmd_select(args) -> int:
    from ._io import check_output_file
    from .pattern import diagnose, select_union
    from .profiles import Profile
    from .report import summarize_pattern

    out = check_output_file(args.output, force=args.force, what="pattern file")
    given = [f for f, v in (("--keep", args.keep), ("--max-loss", args.max_loss), ("--min-mass", args.min_mass))
             if v is not None]
    if len(given) != 1:
        raise MoepruneError("give exactly one of --keep (a budget), --max-loss (e.g. 2%) or --min-mass (e.g. 98%)"
                            + (f"; got {', '.join(given)}" if given else ""))
    if args.keep is None:
        return _select_target(args, out)
    keep = parse_budget(args.keep, "--keep")
    profiles = [Profile.load(p) for p in args.profile]
    if len(profiles) == 1:
        pattern = profiles[0].select(keep=keep, criterion=args.criterion, strategy=args.strategy, seed=args.seed)
    else:
        pattern = select_union(profiles, keep=keep, criterion=args.criterion, strategy=args.strategy, seed=args.seed)
    pattern.save(out)
    merged = profiles[0]
    for p in profiles[1:]:
        merged = merged.merge(p)
    print(summarize_pattern(pattern, merged, diagnostics=diagnose(merged, pattern)))
    print(f"wrote {out}")
    return 0


def _select_target(args, out) -> int:
    from .profiles import Profile
    from .target import parse_fraction, select_for_target

    if len(args.profile) != 1:
        raise MoepruneError("--max-loss and --min-mass select from one profile; merge the profiles first")
    max_loss = parse_fraction(args.max_loss, "--max-loss") if args.max_loss is not None else None
    min_mass = parse_fraction(args.min_mass, "--min-mass") if args.min_mass is not None else None
    if max_loss is not None and (not args.model or not args.prompts):
        raise MoepruneError("--max-loss needs --model and --prompts (the prompts the profile was made from; "
                            "a profile does not store them); --min-mass needs neither")
    candidates = [parse_budget(c, "--candidates") for c in args.candidates.split(",")] if args.candidates else None
    prof = Profile.load(args.profile[0])
    pattern, report = select_for_target(
        prof, args.model, Path(args.prompts) if args.prompts else None, max_loss=max_loss, min_mass=min_mass,
        criterion=args.criterion, strategy=args.strategy, folds=args.folds, seed=args.seed, candidates=candidates,
        max_tokens=args.max_tokens, window=args.window, dtype=args.dtype)
    pattern.save(out)
    print(report.format())
    print(f"wrote {out}")
    return 0


def _cmd_curve(args) -> int:
    from ._io import check_output_file
    from .curve import DEFAULT_CRITERIA, DEFAULT_STRATEGIES, curve, format_curve, write_curve
    from .profiles import Profile

    out = check_output_file(args.output, force=args.force, what="curve file")
    if out.suffix.lower() != ".png":
        raise MoepruneError(f"-o {out}: the curve is written as a PNG (its table goes beside it as .json)")
    check_output_file(out.with_suffix(".json"), force=args.force, what="curve table")
    if not args.prompts and not args.data:
        raise MoepruneError("give --prompts (the profile's demonstrations, for the held-out curve), --data, or both")
    names = lambda text, default: tuple(x.strip() for x in text.split(",") if x.strip()) if text else default  # noqa: E731
    fractions = [parse_budget(f, "--fractions") for f in args.fractions.split(",")] if args.fractions else None
    prof = Profile.load(args.profile)
    result = curve(args.model, prof, Path(args.prompts) if args.prompts else None,
                   Path(args.data) if args.data else None, criteria=names(args.criteria, DEFAULT_CRITERIA),
                   strategies=names(args.strategies, DEFAULT_STRATEGIES), fractions=fractions, folds=args.folds,
                   seed=args.seed, max_tokens=args.max_tokens, data_tokens=args.data_tokens, window=args.window,
                   dtype=args.dtype)
    png, table = write_curve(result, out)
    print(format_curve(result))
    print(f"wrote {png} and {table} in {result['seconds']:.0f} s")
    return 0


def _cmd_export(args) -> int:
    from ._io import check_output_dir
    from .exporter import export
    from .pattern import Pattern
    from .profiles import Profile

    if bool(args.pattern) == bool(args.profile):
        raise MoepruneError("give exactly one of --pattern FILE or --profile DIR (with --keep)")
    check_output_dir(args.output, force=args.force, protect=_local(args.model), what="export folder")
    if args.pattern:
        pattern = Pattern.load(args.pattern)
    else:
        pattern = Profile.load(args.profile).select(keep=parse_budget(args.keep, "--keep"), criterion=args.criterion,
                                                    strategy="uniform")
    out = export(args.model, pattern, args.output, force=args.force, max_shard_size=args.max_shard_size,
                 progress=not args.quiet, mtp=args.mtp)
    k = next(iter(pattern.counts.values()))
    print(f"exported {k} of {pattern.num_experts} experts per layer ({len(pattern.kept)} MoE layers) -> {out}")
    return 0


def _cmd_plot(args) -> int:
    from ._io import check_output_file
    from .profiles import Profile
    from .report import plot_profile

    check_output_file(args.output, force=args.force, what="plot file")
    art = _load_artefact(args.path)
    if not isinstance(art, Profile):
        raise MoepruneError(f"{args.path} is not a profile")
    plot_profile(art, args.output, criterion=args.criterion)
    print(f"wrote {args.output}")
    return 0


def _stream_args(args) -> dict:
    return {"stream": not args.no_stream, "memory_budget": args.memory_budget, "device": args.device}


def _add_stream_options(p) -> None:
    p.add_argument("--memory-budget", default=None,
                   help="bytes the layers in flight and the activations may take (e.g. 8GB); the activations "
                        "spill to a temporary file beyond it")
    p.add_argument("--no-stream", action="store_true",
                   help="load the whole model first instead of running it one decoder layer at a time")
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda[:N]: where each layer runs; several (cuda:0,cuda:1) split the batches among them")


def _cmd_estimate(args) -> int:
    from .estimate import estimate, format_estimate

    est = estimate(args.model, pattern=args.pattern, prompts=args.prompts, tokens=args.tokens, dtype=args.dtype,
                   memory_budget=args.memory_budget)
    print(format_estimate(est, args.pattern))
    return 0


def _cmd_eval(args) -> int:
    from .evaluate import evaluate

    result = evaluate(args.model, Path(args.data), pattern=args.pattern, window=args.window, stride=args.stride,
                      batch_size=args.batch_size, max_tokens=args.max_tokens, dtype=args.dtype,
                      progress=not args.quiet, **_stream_args(args))
    what = f"{args.model} with pattern {args.pattern}" if args.pattern else args.model
    print(f"{what}: {result}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    keep = parse_budget(args.keep, "--keep")
    run_demo(out=args.output, keep=keep, domain=args.domain, force=args.force)
    return 0


def _cmd_bench_criteria(args) -> int:
    from ._io import check_output_dir
    from .bench import REPORT_FILES, BenchConfig, markdown, run_benchmark, write_report
    from .demo import DEMO_MODEL

    out = check_output_dir(args.output, force=True, what="benchmark output folder")  # other files may stay
    earlier = [f for f in REPORT_FILES if (out / f).exists()]
    if earlier and not args.force:
        raise MoepruneError(f"{out} already holds a criteria report ({', '.join(earlier)}); choose another "
                            "folder or pass --force to replace those files")
    cfg = BenchConfig()
    if args.quick:
        cfg = BenchConfig(domains=tuple(args.domains or ("python", "bible")), calib_sizes=(16,), keeps=(0.5,),
                          strategies=("uniform",), random_seeds=(0,), eval_tokens=4096)
    elif args.domains:
        cfg.domains = tuple(args.domains)
    cfg.stream = args.stream
    result = run_benchmark(args.model or DEMO_MODEL, args.corpora, cfg, progress=not args.quiet)
    write_report(result, args.output)
    print(markdown(result))
    print(f"\nwrote {args.output}/criteria.md, criteria.json and plots in {result['seconds']:.0f} s")
    return 0


def _cmd_store(args) -> int:
    from .store import PatternStore

    store = PatternStore(args.store, **({"signature": args.signature} if getattr(args, "signature", None) else {}))
    action = args.store_command
    if action == "add":
        from .profiles import Profile

        keep = parse_budget(args.keep, "--keep")
        bad_tags = [t for t in args.tag or [] if "=" not in t or not t.split("=", 1)[0]]
        if bad_tags:
            raise MoepruneError(f"--tag must be KEY=VALUE, got {bad_tags[0]!r}")
        prof = Profile.load(args.profile)
        pattern = prof.select(keep=keep, criterion=args.criterion, strategy=args.strategy)
        name = args.name or prof.domain
        if not name:
            raise MoepruneError("the profile has no domain name: pass --name")
        tags = dict(t.split("=", 1) for t in args.tag or [])
        entry = store.add(name, prof, pattern, tags=tags, replace=args.replace, model=args.model)
        print(f"added {entry.name!r}: {pattern.n_kept} experts kept over {len(pattern.kept)} layers, "
              f"{entry.meta['n_demonstrations']} demonstrations indexed -> {store.path}")
    elif action == "list":
        entries = store.list()
        if not entries:
            print(f"{store.path}: no patterns")
        for e in entries:
            counts = sorted(set(e.pattern.counts.values()))
            print(f"{e.name:<24} domain {e.domain or '-':<14} kept/layer {'-'.join(map(str, counts)):<6} "
                  f"{e.pattern.meta.get('criterion')}, {e.meta.get('n_demonstrations')} demos, {e.meta.get('created')}")
    elif action == "show":
        from .report import summarize_pattern

        e = store.get(args.name)
        print(f"{e.name}: domain {e.domain or '-'}, created {e.meta.get('created')}, tags {e.meta.get('tags') or {}}")
        print(summarize_pattern(e.pattern, store.profile(args.name)))
    elif action == "remove":
        store.remove(args.name)
        print(f"removed {args.name!r} from {store.path}")
    elif action == "info":
        for k, v in store.info().items():
            print(f"{k:<16} {v}")
    elif action == "rebuild":
        meta = store.rebuild_index()
        print(f"rebuilt the {meta['kind']} index: {meta['n_vectors']} vectors of {len(meta['names'])} patterns")
    elif action == "search":
        from .models import load_model

        threshold = _parse_threshold(args.threshold)
        if args.k < 1:
            raise MoepruneError(f"--k must be at least 1, got {args.k}")
        model_path = args.model or store.manifest.get("model")
        if not model_path:
            raise MoepruneError("give --model (the store does not record one)")
        store.info()  # a broken store fails before the model loads
        model, tok = load_model(model_path)
        match = store.search(args.query, model, tok, k=args.k, threshold=threshold)
        print(f"match      {match.name or 'all experts'}")
        print(f"fell back  {'yes: ' + match.reason if match.fell_back else 'no'}")
        print(f"score      {match.score:.3f} (threshold {match.threshold:.3f}); confidence {match.confidence:.2f}")
        if match.runner_up:
            print(f"runner-up  {match.runner_up} ({match.runner_up_score:.3f})")
        print(f"experts    {match.pattern.n_kept} kept ({match.pattern.kept_fraction:.0%})")
    return 0


def _parse_threshold(text: str | None) -> float | str | None:
    if text is None or text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise MoepruneError(f"--threshold must be 'auto' or a cosine similarity in [-1, 1], got {text!r}") from None
    if not -1.0 <= value <= 1.0:
        raise MoepruneError(f"--threshold must be 'auto' or a cosine similarity in [-1, 1], got {text!r}")
    return value


def _cmd_serve(args) -> int:
    from .serve.server import serve

    budget = parse_budget(args.expert_budget, "--expert-budget") if args.expert_budget else 1.0
    serve(args.model, args.store, host=args.host, port=args.port, api_key=args.api_key, expert_budget=budget,
          max_batch=args.max_batch, max_queue=args.max_queue, dtype=args.dtype)
    return 0


def _cmd_route(args) -> int:
    from .serve.route import parse_upstreams, route

    route(args.model, args.store, parse_upstreams(args.upstream or []), args.fallback, host=args.host,
          port=args.port, api_key=args.api_key, upstream_api_key=args.upstream_api_key, dtype=args.dtype,
          device=args.device, threads=args.threads, engines=args.engine, max_queue=args.max_queue,
          queue_timeout=args.queue_timeout, swap_timeout=args.swap_timeout)
    return 0


def _cmd_deploy(args) -> int:
    from .serve.deploy import deploy

    patterns = [n.strip() for n in args.patterns.split(",") if n.strip()] if args.patterns else None
    deploy(args.store, args.model, args.exports, engine=args.engine, engine_args=args.engine_args,
           base_port=args.base_port, patterns=patterns, fallback=not args.no_fallback, host=args.host,
           port=args.port, api_key=args.api_key, dtype=args.dtype, progress=not args.quiet, engines=args.engines)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and the usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = _Parser(prog="moeprune", description="Keep only the experts a task needs.")
    parser.add_argument("--version", action="version", version=f"moeprune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show transformers' own progress bars and messages (e.g. 'Loading weights')")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("profile", help="profile a domain from a handful of prompts")
    p.add_argument("model", help="checkpoint folder (or hub id)")
    p.add_argument("--prompts", required=True, help=".txt (one prompt per line) or .jsonl (text or messages)")
    p.add_argument("--domain", required=True, help="name of the domain these prompts stand for")
    p.add_argument("-o", "--output", required=True, help="profile folder to write")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per prompt (default 512, or the model's context if shorter); longer prompts are cut")
    p.add_argument("--tcess-threshold", type=float, default=0.0,
                   help="PreMoe confidence filter: count router probabilities only above this")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the checkpoint's)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    _add_stream_options(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser("inspect", help="print a readable summary of a profile or a pattern")
    p.add_argument("path", help="profile folder, pattern .json, or exported checkpoint folder")
    p.add_argument("--top", type=int, default=5, help="experts to list per layer and criterion")
    p.add_argument("--profile", help="for a pattern: a profile to compute its diagnostics on")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("select", help="choose the experts to keep from one or more profiles")
    p.add_argument("profile", nargs="+", help="profile folder(s); several are combined (per-layer normalised)")
    p.add_argument("--keep", help="fraction of experts per layer (0.5) or a count per layer (16)")
    p.add_argument("--max-loss", help="instead of --keep: the smallest budget whose perplexity loss, predicted by "
                                      "k-fold over the profile's prompts, is at most this (2%% or 0.02); needs "
                                      "--model and --prompts")
    p.add_argument("--min-mass", help="instead of --keep: the smallest budget keeping at least this share of the "
                                      "routing mass the profile saw (98%% or 0.98); profile only")
    p.add_argument("--model", help="with --max-loss: the checkpoint folder the profile was made with")
    p.add_argument("--prompts", help="with --max-loss: the prompts the profile was made from")
    p.add_argument("--folds", type=int, default=4, help="with --max-loss: cross-validation folds (default 4)")
    p.add_argument("--candidates", help="budgets to measure: comma-separated fractions or counts per layer "
                                        "(default 1/32,2/32,4/32,8/32,16/32,24/32 of the experts)")
    p.add_argument("--max-tokens", type=int, default=None, help="with --max-loss: held-out tokens scored per fold")
    p.add_argument("--window", type=int, default=None, help="with --max-loss: evaluation window")
    p.add_argument("--dtype", default="auto", help="with --max-loss: float32, bfloat16, float16 or auto (the checkpoint's)")
    p.add_argument("--criterion", default="easy_ep",
                   help="frequency, mass, tcess, easy_ep, reap, gate_norm or random")
    p.add_argument("--strategy", default="uniform", choices=["uniform", "global"])
    p.add_argument("--seed", type=int, default=0, help="seed of the random criterion and of the folds")
    p.add_argument("-o", "--output", required=True, help="pattern .json to write")
    p.add_argument("--force", action="store_true", help="replace an existing pattern file")
    p.set_defaults(func=_cmd_select)

    p = sub.add_parser("curve", help="perplexity and memory against the share of experts kept, per criterion")
    p.add_argument("model", help="checkpoint folder the profile was made with")
    p.add_argument("--profile", required=True, help="profile folder")
    p.add_argument("--prompts", help="the prompts the profile was made from: held-out (k-fold) perplexity")
    p.add_argument("--data", help="evaluation text (.jsonl or .txt): perplexity on it")
    p.add_argument("--criteria", help="comma-separated (default easy_ep,reap,frequency)")
    p.add_argument("--strategies", help="comma-separated (default uniform,global)")
    p.add_argument("--fractions", help="kept fractions or counts per layer, comma-separated "
                                       "(default 1/32,2/32,4/32,8/32,16/32,24/32 of the experts)")
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=None, help="held-out tokens scored per fold")
    p.add_argument("--data-tokens", type=int, default=16384, help="tokens of --data scored")
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the checkpoint's)")
    p.add_argument("-o", "--output", required=True, help="PNG to write (the table goes beside it as .json)")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p.set_defaults(func=_cmd_curve)

    p = sub.add_parser("export", help="write a pruned checkpoint that vanilla transformers and vLLM load")
    p.add_argument("model", help="source checkpoint folder")
    p.add_argument("--pattern", help="pattern .json")
    p.add_argument("--profile", help="profile folder to select from (with --keep)")
    p.add_argument("--keep", default="0.5", help="with --profile: fraction or count per layer")
    p.add_argument("--criterion", default="easy_ep", help="with --profile: the selection criterion")
    p.add_argument("-o", "--output", required=True, help="checkpoint folder to write")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--mtp", choices=("drop", "prune"), default="drop",
                   help="multi-token-prediction layers (DeepSeek-V3/R1): drop them, or keep the last MoE layer's "
                        "experts in them")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("plot", help="draw a layer x expert heatmap of a profile")
    p.add_argument("path")
    p.add_argument("-o", "--output", required=True, help="PNG file to write")
    p.add_argument("--criterion", default="easy_ep", help="frequency, mass, tcess, easy_ep, reap or gate_norm")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("eval", help="token-weighted perplexity of a model, a slim model or an export")
    p.add_argument("model", help="checkpoint folder (full model or an export)")
    p.add_argument("--pattern", help="load the model slim with only this pattern's experts")
    p.add_argument("--data", required=True, help=".jsonl with a 'text' per line, or a text file")
    p.add_argument("--window", type=int, default=None,
                   help="tokens per window (default 256, or the model's context if shorter)")
    p.add_argument("--stride", type=int, default=None, help="window step (default: the window)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    p.add_argument("--dtype", default="auto")
    _add_stream_options(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("estimate", help="memory and disk a model's profiling, slim model and export will need "
                                        "(reads headers only)")
    p.add_argument("model", help="checkpoint folder (or a cached hub id)")
    p.add_argument("--pattern", help="pattern .json: also size its slim model and export")
    p.add_argument("--prompts", type=int, default=64, help="prompts to profile (default 64)")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per prompt (default 512, or the model's context if shorter)")
    p.add_argument("--dtype", default="auto", help="compute dtype: float32, bfloat16, float16 or auto (the checkpoint's)")
    p.add_argument("--memory-budget", default=None,
                   help="bytes the layers in flight and the activations may take (e.g. 8GB): say what fits")
    p.set_defaults(func=_cmd_estimate)

    p = sub.add_parser("demo", help="run the main job end to end on the bundled demo MoE (offline, ~10 s)")
    p.add_argument("-o", "--output", help="keep the exported checkpoint here (default: a temporary folder)")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --output folder")
    p.add_argument("--keep", default="0.5", help="fraction of experts per layer (0.5) or a count (16)")
    p.add_argument("--domain", default="python", help="python, legal or bible")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench-criteria", help="compare expert-selection criteria by perplexity on real domains")
    p.add_argument("--model", help="checkpoint folder (default: the bundled demo model)")
    p.add_argument("--corpora", default="../shared/corpora", help="folder with <domain>/{calib,eval}.jsonl")
    p.add_argument("--domains", nargs="*", help="domains to run (default: all seven)")
    p.add_argument("--quick", action="store_true", help="2 domains, one keep level (what CI runs)")
    p.add_argument("--stream", action="store_true",
                   help="profile and evaluate layer by layer from the checkpoint (a model that does not fit)")
    p.add_argument("-o", "--output", default="bench-criteria", help="folder for the table, JSON and plots")
    p.add_argument("--force", action="store_true", help="replace an earlier report's files in the output folder")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_bench_criteria)

    p = sub.add_parser("store", help="the pattern store: add, list, show, remove, info, rebuild, search")
    ss = p.add_subparsers(dest="store_command", required=True, parser_class=_Parser)
    q = ss.add_parser("add", help="select a pattern from a profile and store it")
    q.add_argument("store")
    q.add_argument("--profile", required=True)
    q.add_argument("--keep", required=True, help="fraction (0.5) or count per layer")
    q.add_argument("--name", help="pattern name (default: the profile's domain)")
    q.add_argument("--model", help="the model checkpoint, recorded for `store search`")
    q.add_argument("--criterion", default="easy_ep")
    q.add_argument("--strategy", default="uniform", choices=["uniform", "global"])
    q.add_argument("--signature", choices=["router", "hidden"], help="signature kind of a new store (default hidden: measured better on the demo model)")
    q.add_argument("--tag", action="append", help="free-form key=value tag (repeatable)")
    q.add_argument("--replace", action="store_true", help="overwrite a pattern of the same name")
    for verb, helptext in (("list", "list stored patterns"), ("info", "store facts and index state"),
                           ("rebuild", "rebuild the FAISS index from the entries")):
        q = ss.add_parser(verb, help=helptext)
        q.add_argument("store")
    for verb, helptext in (("show", "show one pattern"), ("remove", "remove one pattern")):
        q = ss.add_parser(verb, help=helptext)
        q.add_argument("store")
        q.add_argument("name")
    q = ss.add_parser("search", help="find the pattern for a query")
    q.add_argument("store")
    q.add_argument("query")
    q.add_argument("--model", help="checkpoint folder (default: the one the store records)")
    q.add_argument("--k", type=int, default=16, help="neighbouring demonstrations that vote")
    q.add_argument("--threshold", help="'auto' (per-pattern, calibrated) or a cosine similarity")
    p.set_defaults(func=_cmd_store)

    p = sub.add_parser("serve", help="OpenAI-compatible server that swaps experts per request")
    p.add_argument("model", help="checkpoint folder")
    p.add_argument("--store", required=True, help="pattern store of this model")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless told otherwise)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require Authorization: Bearer KEY (or set MOEPRUNE_API_KEY)")
    p.add_argument("--expert-budget", help="experts held per layer: a count, or a fraction (default: all)")
    p.add_argument("--max-batch", type=int, default=8, help="same-pattern requests generated together")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    p.add_argument("--dtype", default=None)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("route", help="OpenAI-compatible front that routes each request to its pattern's server")
    p.add_argument("model", help="checkpoint folder (only the layers up to the first MoE router are loaded)")
    p.add_argument("--store", required=True, help="pattern store of this model")
    p.add_argument("--upstream", action="append", metavar="NAME=URL",
                   help="a stored pattern and the OpenAI base URL (ending in /v1) of the server of its export; repeat")
    p.add_argument("--fallback", metavar="URL", help="server for queries that match no served pattern (the full model)")
    p.add_argument("--engine", action="append", metavar="URL",
                   help="a swappable engine's OpenAI base URL (vLLM with moeprune's worker extension); repeat: "
                        "every stored pattern is then served on this pool, swapped in as needed")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a pool engine before 429")
    p.add_argument("--queue-timeout", type=float, default=300.0,
                   help="seconds a request may wait for a pool engine before 503")
    p.add_argument("--swap-timeout", type=float, default=600.0, help="seconds one engine swap may take")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless told otherwise)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require Authorization: Bearer KEY (or set MOEPRUNE_API_KEY)")
    p.add_argument("--upstream-api-key", help="bearer token sent to the upstreams")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default="cpu", help="where the signature model runs (cpu, cuda[:N])")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for retrieval (default: torch's; 1 kept retrieval at 1.3 ms p50 under load)")
    p.set_defaults(func=_cmd_route)

    p = sub.add_parser("deploy", help="serve every stored pattern's export on its own engine, behind the front",
                       usage="moeprune deploy STORE MODEL --exports DIR [options] [-- ENGINE ARGS...]")
    p.add_argument("store", help="pattern store")
    p.add_argument("model", help="source checkpoint folder (also served whole as the fallback)")
    p.add_argument("--exports", required=True, help="folder for the exports (reused while the patterns are unchanged)")
    p.add_argument("--engine", default="vllm",
                   help="'vllm' (vllm serve), or a command template with {model} and {port} (and {name}, {python})")
    p.add_argument("--patterns", help="comma-separated stored patterns to serve (default: all)")
    p.add_argument("--no-fallback", action="store_true", help="no full-model server for unmatched queries")
    p.add_argument("--engines", type=int, metavar="N",
                   help="N swappable engines (started on the first N patterns) serving every stored pattern")
    p.add_argument("--base-port", type=int, default=8100, help="first loopback port of the engines")
    p.add_argument("--host", default="127.0.0.1", help="the front's bind address")
    p.add_argument("--port", type=int, default=8000, help="the front's port")
    p.add_argument("--api-key", help="the front requires Authorization: Bearer KEY (or set MOEPRUNE_API_KEY)")
    p.add_argument("--dtype", default=None, help="of the front's signature model")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_deploy, engine_args=[])
    _verbose_everywhere(sub)
    return parser


def _verbose_everywhere(sub) -> None:
    """`-v` works after the command too (`moeprune profile ... -v`)."""
    for command in sub.choices.values():
        nested = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        for target in [command, *(c for a in nested for c in a.choices.values())]:
            target.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                help="show transformers' own progress bars and messages")


def _quiet_libraries(verbose: bool) -> None:
    """transformers' per-load bars ("Loading weights") are noise in a CLI with its own progress bars."""
    from transformers.utils import logging as hf_logging

    if verbose:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()


def _show_notes() -> None:
    """moeprune's own warnings (e.g. a stale temporary folder removed) go to stderr as one line each."""
    log = logging.getLogger("moeprune")
    if not any(getattr(h, "_moeprune_cli", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("moeprune: note: %(message)s"))
        handler._moeprune_cli = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def _debug() -> bool:
    return os.environ.get("MOEPRUNE_DEBUG", "").strip() not in ("", "0")


def _print_debug(e: BaseException) -> None:
    """The whole chain: errors raised `from None` still carry their cause, which is what a bug report needs."""
    cur: BaseException | None = e
    while cur is not None:
        cur.__suppress_context__ = False
        cur = cur.__cause__ or cur.__context__
    traceback.print_exception(e, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    passed: list[str] = []
    if argv[:1] == ["deploy"] and "--" in argv:  # the engine's own arguments, passed through untouched
        cut = argv.index("--")
        argv, passed = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if passed:
        args.engine_args = passed
    try:
        serving = args.func in (_cmd_serve, _cmd_route, _cmd_deploy)
        bound_kernel_caches(SERVE_KERNEL_CACHE if serving else BATCH_KERNEL_CACHE)
        _quiet_libraries(args.verbose)
        _show_notes()
        return args.func(args)
    except (MoepruneError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        if _debug():
            _print_debug(e)
        print(f"moeprune: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moeprune: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure: one line, the traceback on request
        if _debug():
            _print_debug(e)
            return 1
        print(f"moeprune: error: {type(e).__name__}: {_one_line(e)} (set MOEPRUNE_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return " ".join(text.split()) if text else type(e).__name__


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
