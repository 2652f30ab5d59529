"""Train moeprune's bundled demo MoE on the seven real domains of ../shared/corpora.

Recipe: byte-level BPE tokenizer (8k vocab) trained on an equal sample of every domain; a
Qwen3-MoE-layout model (4 layers, hidden 192, 32 routed experts of size 96, top-2,
`norm_topk_prob`, tied embeddings, router aux loss 0.01, which is what makes experts specialise);
sequences of 256 tokens, each from one domain, domains drawn with equal probability; AdamW with
warm-up and cosine decay; fixed seed. It logs the loss curve to `train_log.csv`.

Router aux loss 0.01, not the 0.03 that `recipe_sweep.py` preferred at 1,400 steps: trained to
the full 1,900 steps, the validation split preferred 0.01 (`recipe_confirm.py`; log
`results/recipe_confirm-20261128-085552.txt`).

    python benchmarks/train_demo_moe.py --out build/demo-train            # ~21 min on 2 cores
    python benchmarks/train_demo_moe.py --out build/demo-train --install moeprune/demo_model

An interrupted run restarted with the same `--out` resumes from its last checkpoint (model and
optimizer state in safetensors, no pickle); a folder holding a different run is refused. The
installed model is written in bf16 only with `--install`, and an existing one is replaced only
with `--force`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

DOMAINS = ["python", "c_headers", "legal", "bible", "german", "dictionary", "manpages"]
CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"
EOT, PAD = "<|endoftext|>", "<|pad|>"


def read_texts(path: Path, limit_chars: int | None = None) -> list[str]:
    out, total = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            out.append(text)
            total += len(text)
            if limit_chars and total >= limit_chars:
                break
    return out


def train_tokenizer(corpora: Path, vocab_size: int, sample_chars: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT, PAD], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    sample = [t for d in DOMAINS for t in read_texts(corpora / d / "train.jsonl", sample_chars)]
    tok.train_from_iterator(sample, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT, pad_token=PAD,
                                   unk_token=None, model_max_length=1024)


def encode_domain(tokenizer, corpora: Path, domain: str, limit_chars: int | None = None) -> torch.Tensor:
    texts = read_texts(corpora / domain / "train.jsonl", limit_chars)
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids += enc + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.int32)


def model_config(args, vocab_size: int, eos: int, pad: int):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "qwen3_moe", vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
        moe_intermediate_size=args.expert_size, num_hidden_layers=args.layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=args.hidden // 4, num_experts=args.experts, num_experts_per_tok=args.top_k,
        norm_topk_prob=True, decoder_sparse_step=1, router_aux_loss_coef=args.aux, output_router_logits=False,
        tie_word_embeddings=True, max_position_embeddings=1024, bos_token_id=eos, eos_token_id=eos,
        pad_token_id=pad, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def run_id(args) -> str:
    keys = ("seed", "steps", "batch", "seq", "lr", "hidden", "layers", "experts", "top_k", "expert_size", "aux",
            "vocab", "tok_sample_chars", "warmup", "max_train_chars")
    return hashlib.sha256(json.dumps({k: getattr(args, k) for k in keys}, sort_keys=True).encode()).hexdigest()[:16]


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(out: Path, model, opt, step: int, gen: torch.Generator, rid: str) -> None:
    tmp = out / "ckpt.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # named_parameters() lists a tied weight once (safetensors refuses shared memory)
    save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters()}, str(tmp / "model.safetensors"))
    names = {id(p): n for n, p in model.named_parameters()}
    opt_tensors, opt_steps = {}, {}
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    opt_tensors[f"{names[id(p)]}::{key}"] = state[key].cpu().contiguous()
            if "step" in state:
                opt_steps[names[id(p)]] = float(state["step"])
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    state = {"run_id": rid, "step": step, "opt_steps": opt_steps,
             "generator": gen.get_state().tolist()}
    (tmp / "state.json").write_text(json.dumps(state))
    final = out / "ckpt"
    old = out / "ckpt.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, model, opt, gen: torch.Generator) -> int:
    ck = out / "ckpt"
    state = json.loads((ck / "state.json").read_text())
    missing, unexpected = model.load_state_dict(load_file(str(ck / "model.safetensors")), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        sys.exit(f"train_demo_moe: checkpoint {ck} does not match the model ({missing[:3]}, {unexpected[:3]})")
    tensors = load_file(str(ck / "optimizer.safetensors"))
    params = dict(model.named_parameters())
    for name, p in params.items():
        if f"{name}::exp_avg" in tensors:
            opt.state[p] = {"step": torch.tensor(state["opt_steps"][name]),
                            "exp_avg": tensors[f"{name}::exp_avg"].to(p.device),
                            "exp_avg_sq": tensors[f"{name}::exp_avg_sq"].to(p.device)}
    gen.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
    return int(state["step"])


def batch(streams: list[torch.Tensor], args, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    domains = torch.randint(len(streams), (args.batch,), generator=gen)
    rows = []
    for d in domains.tolist():
        s = streams[d]
        start = int(torch.randint(len(s) - args.seq - 1, (1,), generator=gen))
        rows.append(s[start : start + args.seq].long())
    return torch.stack(rows), domains


def model_card(args, losses: list[float], elapsed: float, n_params: int, tokens: int) -> str:
    return f"""---
library_name: transformers
license: other
tags: [moe, demo, moeprune]
---
# moeprune demo MoE

A small Mixture-of-Experts language model (Qwen3-MoE layout) shipped with moeprune so that its
quickstart runs offline. It exists to show that expert pruning keeps quality when experts
specialise; it is not a useful language model.

- Architecture: {args.layers} layers, hidden {args.hidden}, {args.experts} routed experts per layer of size
  {args.expert_size}, top-{args.top_k}, `norm_topk_prob`, tied embeddings, {n_params:,} parameters, bf16.
- Tokenizer: byte-level BPE, {args.vocab} tokens, trained on an equal sample of the seven domains.
- Training: {args.steps} steps x {args.batch} sequences x {args.seq} tokens ({tokens:,} tokens), AdamW lr {args.lr}
  (warm-up {args.warmup}, cosine to 10%), router aux loss {args.aux}, seed {args.seed}, {elapsed / 60:.1f} minutes on
  {torch.get_num_threads()} CPU threads. Final training loss {sum(losses[-20:]) / max(1, len(losses[-20:])):.3f}.
- Data: `train.jsonl` of seven domains (each sequence from one domain, domains equally likely):
  Python standard library sources (PSF-2.0); C headers of a Debian system (LGPL-2.1+, GPL-2.0 with syscall
  note, Apache-2.0 and others); Debian licence texts and copyright files (verbatim copying permitted);
  King James Bible (public domain); German quotations from fortunes-de (GPL-2+); GCIDE dictionary
  (GPL); rendered Debian manual pages (GPL-2+ and verbatim man-pages licences). The weights are a
  derivative of this text; treat them under the most restrictive of these licences (GPL).
- Made by `benchmarks/train_demo_moe.py` in the moeprune repository.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="working folder (checkpoints, log); resumable")
    ap.add_argument("--install", help="write the final bf16 model + tokenizer here (e.g. moeprune/demo_model)")
    ap.add_argument("--force", action="store_true", help="replace an existing --install folder")
    ap.add_argument("--corpora", default=str(CORPORA))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1900)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--expert-size", type=int, default=96)
    ap.add_argument("--aux", type=float, default=0.01)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--tok-sample-chars", type=int, default=1_500_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--max-train-chars", type=int, default=None, help="use only this much text per domain (tests)")
    ap.add_argument("--stop-after", type=int, default=None, help="stop after this many steps of this run (tests)")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    corpora = Path(args.corpora)
    if not all((corpora / d / "train.jsonl").is_file() for d in DOMAINS):
        sys.exit(f"train_demo_moe: corpora not found under {corpora} (need {', '.join(DOMAINS)})")
    install = Path(args.install) if args.install else None
    if install and install.exists() and any(install.iterdir()) and not args.force:
        sys.exit(f"train_demo_moe: {install} already holds a model; pass --force to replace it")
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rid = run_id(args)
    meta_file = out / "run.json"
    if meta_file.exists() and json.loads(meta_file.read_text())["run_id"] != rid:
        sys.exit(f"train_demo_moe: {out} holds a run with other settings; use another --out or delete it")
    meta_file.write_text(json.dumps({"run_id": rid, "args": {k: v for k, v in vars(args).items()
                                                               if k not in ("stop_after", "force", "install")}},
                                    indent=2))

    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        t0 = time.time()
        tokenizer = train_tokenizer(corpora, args.vocab, args.tok_sample_chars)
        tokenizer.save_pretrained(tok_dir)
        print(f"tokenizer: {len(tokenizer)} tokens in {time.time() - t0:.0f}s", flush=True)
    streams = [encode_domain(tokenizer, corpora, d, args.max_train_chars) for d in DOMAINS]
    print("tokens per domain:", {d: len(s) for d, s in zip(DOMAINS, streams, strict=True)}, flush=True)

    config = model_config(args, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    start = 0
    if (out / "ckpt" / "state.json").exists():
        start = load_checkpoint(out, model, opt, gen)
        print(f"resuming at step {start}", flush=True)
    log_path = out / "train_log.csv"
    if start == 0:
        log_path.write_text("step,tokens,loss,aux_loss,lr,elapsed_s\n")
    losses: list[float] = []
    model.train()
    t0 = time.time()
    for step in range(start, args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        ids, _ = batch(streams, args, gen)
        ids = ids.to(args.device)
        outputs = model(input_ids=ids, labels=ids, output_router_logits=True)
        opt.zero_grad(set_to_none=True)
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(outputs.loss))
        if step % 25 == 0 or step == args.steps - 1:
            aux = float(outputs.aux_loss) if outputs.aux_loss is not None else float("nan")
            elapsed = time.time() - t0
            with open(log_path, "a", newline="") as f:
                csv.writer(f).writerow([step, (step + 1) * args.batch * args.seq, f"{losses[-1]:.4f}", f"{aux:.4f}",
                                        f"{lr_at(step, args):.2e}", f"{elapsed:.0f}"])
            print(f"step {step:5d}  loss {losses[-1]:.3f}  aux {aux:.3f}  {elapsed / 60:5.1f} min", flush=True)
        if (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
            save_checkpoint(out, model, opt, step + 1, gen, rid)
        if args.stop_after and step + 1 - start >= args.stop_after:
            print(f"stopping after {args.stop_after} steps (resume with the same command)", flush=True)
            return
    elapsed = time.time() - t0
    save_checkpoint(out, model, opt, args.steps, gen, rid)
    print(f"trained {args.steps - start} steps in {elapsed / 60:.1f} min", flush=True)
    if install:
        model = model.to("cpu", torch.bfloat16).eval()
        tmp = install.with_name(f".{install.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tokens = args.steps * args.batch * args.seq
        (tmp / "README.md").write_text(model_card(args, losses, elapsed, n_params, tokens))
        shutil.copy(log_path, tmp / "train_log.csv")
        if install.exists():
            shutil.rmtree(install)
        os.replace(tmp, install)
        print(f"installed {install} ({sum(f.stat().st_size for f in install.iterdir()) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
