"""Cost of profiling: a plain forward against a `moeprune.profile` call on the same batch.

Model: Qwen3-MoE layout, hidden 256, 4 layers, 16 experts, top-2, random weights (float32, CPU).
Batch: 4 prompts x 256 tokens. The two are timed interleaved, N runs each; the ratio of each
back-to-back pair is reported as median and range. The log goes to benchmarks/results/.
Run: python benchmarks/profile_overhead.py [--runs 31] [--clock cpu] [--no-record]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moeprune

from _record import add_record_args, record


class FixedTokenizer:
    """Maps each prompt 'p<i>' to a fixed random sequence of 256 ids (no tokenisation cost)."""

    pad_token_id, eos_token_id, chat_template = 0, 0, None

    def __init__(self, seqs):
        self.seqs = seqs

    def __call__(self, text, **kwargs):  # whatever options moeprune passes (truncation, verbose, ...)
        return {"input_ids": self.seqs[int(text[1:])]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=31)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or process CPU time (steadier on a shared VM: excludes stolen time)")
    add_record_args(ap)
    args = ap.parse_args()
    with record("profile_overhead", args.results, args.record):
        run(args)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=8192, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16,
        num_experts_per_tok=2, norm_topk_prob=True,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    ids = torch.randint(1, 8192, (4, 256))
    mask = torch.ones_like(ids)
    tok = FixedTokenizer([row.tolist() for row in ids])
    prompts = [f"p{i}" for i in range(4)]

    def plain():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)

    def profiling():
        moeprune.profile(model, prompts, tokenizer=tok, batch_size=4, max_length=256)

    clock = time.perf_counter if args.clock == "wall" else time.process_time
    for fn in (plain, profiling, plain, profiling):  # warm-up
        fn()
    times = {"plain": [], "profile": []}
    for _ in range(args.runs):
        for name, fn in (("plain", plain), ("profile", profiling)):
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    p, q = statistics.median(times["plain"]), statistics.median(times["profile"])
    # Each pair ran back to back, so its ratio cancels slow drifts of a shared machine.
    pairs = sorted(b / a for a, b in zip(times["plain"], times["profile"], strict=True))
    print(f"plain forward      median {p * 1e3:8.1f} ms  (runs={args.runs}, threads={args.threads}, {args.clock} clock)")
    print(f"profiling forward  median {q * 1e3:8.1f} ms")
    print("paired ratios profile/plain: " + ", ".join(f"{r:.3f}" for r in pairs))
    print(f"ratio of medians profile/plain: {q / p:.3f}x; paired ratios: median {statistics.median(pairs):.3f}x, "
          f"range {pairs[0]:.3f}-{pairs[-1]:.3f}x over {len(pairs)} pairs  (target <= 1.10x)")


if __name__ == "__main__":
    main()
