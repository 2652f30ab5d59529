"""`moeprune demo`: the main job end to end on the bundled demo MoE, offline, in about ten seconds.

Profiles three domains from their bundled demonstrations, selects half of the experts for one,
exports that pruned checkpoint, reloads it with vanilla transformers, and prints full-vs-pruned
perplexity and the memory saved.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from ._io import check_output_dir
from .errors import MoepruneError

HERE = Path(__file__).resolve().parent
DEMO_MODEL = HERE / "demo_model"
DEMO_DATA = HERE / "demo_data"
DEMO_DOMAINS = ("python", "legal", "bible")


def _dir_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in path.glob(pattern))


def run_demo(out: str | None = None, keep: float = 0.5, domain: str = "python", prompts: int = 16,
             print_fn=print, force: bool = False) -> dict:
    """Run the demo; `out` keeps the exported checkpoint (a non-empty folder is replaced only with `force`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluate import evaluate
    from .exporter import export
    from .prompts import read_documents, read_prompts

    if not (DEMO_MODEL / "config.json").is_file():
        raise MoepruneError(f"the bundled demo model is missing ({DEMO_MODEL}); reinstall moeprune")
    if domain not in DEMO_DOMAINS:
        raise MoepruneError(f"demo domain must be one of {', '.join(DEMO_DOMAINS)}")
    if out:  # before the model loads and profiling starts, not after a minute of work
        check_output_dir(out, force=force, protect=(DEMO_MODEL,), what="demo output folder")
    t0 = time.time()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    from . import profile

    print_fn(f"demo model: {DEMO_MODEL.name} ({model.config.model_type}, {model.config.num_hidden_layers} MoE layers "
             f"x {model.config.num_experts} experts, top-{model.config.num_experts_per_tok})")
    profiles = {}
    for d in DEMO_DOMAINS:
        profiles[d] = profile(model, read_prompts(DEMO_DATA / f"{d}.calib.jsonl")[:prompts], tokenizer=tok,
                              domain=d, max_length=256)
        print_fn(f"  profiled {d:<7} {profiles[d].n_prompts} prompts, {profiles[d].n_tokens} tokens")
    patterns = {d: p.select(keep=keep, criterion="easy_ep") for d, p in profiles.items()}
    print_fn(f"kept {next(iter(patterns[domain].counts.values()))} of {model.config.num_experts} experts per layer; "
             "overlap between the domains' patterns (Jaccard):")
    for a in DEMO_DOMAINS:
        print_fn("  " + a.ljust(7) + " " + " ".join(f"{patterns[a].jaccard(patterns[b]):.2f}" for b in DEMO_DOMAINS))

    with tempfile.TemporaryDirectory() as scratch:
        target = Path(out) if out else Path(scratch) / f"demo-{domain}"
        export(DEMO_MODEL, patterns[domain], target, force=force)
        pruned = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()  # vanilla transformers
        results = {}
        for d in DEMO_DOMAINS:
            texts = read_documents(DEMO_DATA / f"{d}.eval.jsonl")
            full = evaluate(model, texts, tokenizer=tok, max_tokens=8192).perplexity
            small = evaluate(pruned, texts, tokenizer=tok, max_tokens=8192).perplexity
            results[d] = (full, small)
        full_params = sum(p.numel() * p.element_size() for p in model.parameters())
        pruned_params = sum(p.numel() * p.element_size() for p in pruned.parameters())
        disk_full, disk_pruned = _dir_bytes(DEMO_MODEL), _dir_bytes(target)
        print_fn(f"exported the {domain} pattern -> {target if out else '(temporary folder)'}; "
                 "reloaded with plain AutoModelForCausalLM.from_pretrained")
        print_fn(f"{'eval text':<10} {'full ppl':>9} {'pruned ppl':>11} {'ratio':>7}")
        for d, (full, small) in results.items():
            mark = "  <- the pattern's domain" if d == domain else ""
            print_fn(f"{d:<10} {full:>9.2f} {small:>11.2f} {small / full:>7.3f}{mark}")
        print_fn(f"memory: parameters {full_params / 2**20:.1f} MiB -> {pruned_params / 2**20:.1f} MiB (float32, "
                 f"-{1 - pruned_params / full_params:.0%}); checkpoint on disk {disk_full / 2**20:.1f} MiB -> "
                 f"{disk_pruned / 2**20:.1f} MiB (bf16, -{1 - disk_pruned / disk_full:.0%})")
        print_fn(f"done in {time.time() - t0:.0f} s")
    return {"perplexity": results, "params_bytes": (full_params, pruned_params), "disk_bytes": (disk_full, disk_pruned)}
