"""moeprune on a CUDA device: the CPU test suite's key equalities, run on the GPU.

For every supported family (tiny random models from tests/tiny.py) in float32 and bfloat16 on CUDA:
profiling leaves the logits unchanged, the keep-mask equals the slim model loaded with
`load_slim(..., device="cuda")`, and greedy generation agrees. Prints one line per case; the log goes
to benchmarks/results/ (`--no-record` to skip it). Without CUDA it refuses in one line (exit 2).

    python benchmarks/gpu_check.py [--results DIR] [--no-record]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny import FAMILIES, char_tokenizer, save_tiny  # noqa: E402

import moeprune  # noqa: E402
from moeprune.hooks import keep_mask  # noqa: E402
from moeprune.models import load_model  # noqa: E402

from _record import add_record_args, record  # noqa: E402

PROMPTS = ["def f(x):\n    return x * 2", "And God said, Let there be light", "#include <stdlib.h>"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_record_args(ap)
    args = ap.parse_args()
    if not torch.cuda.is_available():  # refused before recording: a log of nothing run is no record
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}); nothing run",
              file=sys.stderr)
        return 2
    with record("gpu_check", args.results, args.record):
        sys.exit(run())  # inside the recording, so that the log's footer shows a failing status


def run() -> int:
    dev = "cuda"
    tok = char_tokenizer()
    failures = 0
    for model_type in FAMILIES:
        with tempfile.TemporaryDirectory() as tmp:
            save_tiny(model_type, tmp)
            for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
                full = load_model(tmp, dtype=dtype, device=dev)[0]
                adapter = moeprune.get_adapter(full)
                ids = torch.randint(4, 100, (2, 20), generator=torch.Generator().manual_seed(0)).to(dev)
                with torch.no_grad():
                    plain = full(ids).logits.float()
                seen = []
                h = full.register_forward_hook(
                    lambda m, a, k, o, seen=seen: seen.append((k["input_ids"], k["attention_mask"], o.logits.float())),
                    with_kwargs=True)
                prof = moeprune.profile(full, PROMPTS, tokenizer=tok, batch_size=2)
                h.remove()
                with torch.no_grad():
                    d_prof = max((full(input_ids=i, attention_mask=m).logits.float() - lg).abs().max().item()
                                 for i, m, lg in seen)
                pattern = prof.select(keep=0.5)
                slim = moeprune.load_slim(tmp, pattern, dtype=dtype, device=dev)
                masks = {k: v.to(dev) for k, v in pattern.keep_masks().items()}
                with torch.no_grad(), keep_mask(full, adapter, masks):
                    masked = full(ids).logits.float()
                    g_full = full.generate(ids[:1], max_new_tokens=8, do_sample=False)
                with torch.no_grad():
                    d_slim = (slim(ids).logits.float() - masked).abs().max().item()
                    g_slim = slim.generate(ids[:1], max_new_tokens=8, do_sample=False)
                ok = d_prof <= tol and d_slim <= tol and (dtype != torch.float32 or torch.equal(g_full, g_slim))
                failures += not ok
                print(f"{model_type:<12} {str(dtype):<15} profile |diff| {d_prof:.2e}  slim vs mask |diff| {d_slim:.2e}"
                      f"  greedy equal {torch.equal(g_full, g_slim)}  plain {plain.abs().mean().item():.3f}"
                      f"  {'OK' if ok else 'FAIL'}", flush=True)
    failures += pool_check(tok)
    print("ALL OK" if not failures else f"{failures} FAILED")
    return int(failures > 0)


def pool_check(tok) -> int:
    """The serving ExpertPool on CUDA: switching patterns gives load_slim's logits."""
    from moeprune.serve import ExpertPool

    failures = 0
    for model_type in ("qwen3_moe", "deepseek_v3", "gpt_oss"):
        with tempfile.TemporaryDirectory() as tmp:
            full = save_tiny(model_type, tmp)
            prof = moeprune.profile(full, PROMPTS, tokenizer=tok)
            a, b = prof.select(keep=0.5, criterion="easy_ep"), prof.select(keep=0.5, criterion="random", seed=1)
            ids = torch.randint(4, 100, (2, 20), generator=torch.Generator().manual_seed(0)).to("cuda")
            with ExpertPool(tmp, 0.75, device="cuda") as pool:
                for pattern in (a, b, a):
                    with pool.serve(pattern) as lease, torch.no_grad():
                        got = pool.model(ids).logits.float()
                    slim = moeprune.load_slim(tmp, pattern, device="cuda")
                    with torch.no_grad():
                        want = slim(ids).logits.float()
                    d = (got - want).abs().max().item()
                    ok = d <= 1e-4
                    failures += not ok
                    print(f"pool {model_type:<12} cuda  |diff| vs load_slim {d:.2e}  read {lease.bytes_read} B  "
                          f"{'OK' if ok else 'FAIL'}", flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(main())
