"""Retrieval accuracy of a pattern store on real domains, and how often an unseen domain falls back."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..profiler import profile
from ..prompts import read_prompts
from .store import PatternStore


def eval_queries(corpora: Path, domain: str, n: int, chars: int = 512) -> list[str]:
    """`n` queries: the first `chars` characters of each eval document; where a domain has fewer
    than `n` documents, the next `chars` of each document in turn, and so on."""
    with open(corpora / domain / "eval.jsonl", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f if line.strip()]
    out: list[str] = []
    for start in range(0, max((len(d) for d in docs), default=0), chars):
        for d in docs:
            piece = d[start : start + chars]
            if piece.strip() and len(piece) >= chars // 4:
                out.append(piece)
                if len(out) == n:
                    return out
    return out


def retrieval_benchmark(model, tokenizer, corpora: str | os.PathLike, domains: list[str], kind: str = "hidden",
                        n_calib: int = 64, n_queries: int = 50, max_length: int = 256,
                        profiles: dict | None = None) -> dict:
    """Top-1 accuracy with every domain stored, and the fallback rate of each domain left out."""
    corpora = Path(corpora)
    if profiles is None:
        profiles = {d: profile(model, read_prompts(corpora / d / "calib.jsonl")[:n_calib], tokenizer=tokenizer,
                               domain=d, max_length=max_length) for d in domains}
    queries = {d: eval_queries(corpora, d, n_queries) for d in domains}
    with tempfile.TemporaryDirectory() as tmp:
        store = PatternStore(Path(tmp) / "all", signature=kind)
        for d in domains:
            store.add(d, profiles[d], profiles[d].select(keep=0.5), rebuild=False)
        store.rebuild_index()
        confusion = {d: {} for d in domains}
        for d in domains:
            for m in store.search_many(queries[d], model, tokenizer):
                label = "fallback" if m.fell_back else m.name
                confusion[d][label] = confusion[d].get(label, 0) + 1
        held_out = {}
        for left in domains:
            s = PatternStore(Path(tmp) / f"without-{left}", signature=kind)
            for d in domains:
                if d != left:
                    s.add(d, profiles[d], profiles[d].select(keep=0.5), rebuild=False)
            s.rebuild_index()
            matches = s.search_many(queries[left], model, tokenizer)
            held_out[left] = sum(m.fell_back for m in matches) / len(matches)
    per_domain = {d: confusion[d].get(d, 0) / len(queries[d]) for d in domains}
    total = sum(len(q) for q in queries.values())
    return {"kind": kind, "accuracy": sum(confusion[d].get(d, 0) for d in domains) / total,
            "per_domain": per_domain, "confusion": confusion, "held_out_fallback": held_out,
            "mean_held_out_fallback": sum(held_out.values()) / len(held_out), "n_queries": n_queries,
            "profiles": profiles}


def confusion_table(result: dict, domains: list[str]) -> str:
    cols = [*domains, "fallback"]
    lines = ["| true \\ retrieved | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for d in domains:
        lines.append(f"| {d} | " + " | ".join(str(result["confusion"][d].get(c, 0)) for c in cols) + " |")
    return "\n".join(lines)
