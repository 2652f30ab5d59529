"""Token-weighted perplexity of a full model, a slim model (checkpoint + pattern) or an export.

Documents are tokenised, joined with the end-of-text token into one stream, and scored in
windows of `window` tokens moved by `stride`: every token is predicted once, with up to
`window - stride` tokens of context carried over from the previous window.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import MoepruneError
from .models import check_int, model_device, resolve_length
from .prompts import read_documents


@dataclass
class EvalResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored
    documents: int

    def __str__(self) -> str:
        return f"perplexity {self.perplexity:.3f} over {self.tokens} tokens ({self.documents} documents)"


def token_stream(texts: list[str], tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if eos is not None:
            ids.append(eos)
        if max_tokens and len(ids) >= max_tokens + 1:
            break
    if max_tokens:
        ids = ids[: max_tokens + 1]
    return torch.tensor(ids, dtype=torch.long)


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position) of each window over a stream of n tokens."""
    out, scored_to, start = [], 1, 0
    while scored_to < n:
        end = min(start + window, n)
        out.append((start, end, scored_to))
        scored_to = end
        start = end - max(1, window - stride) if end < n else n  # >= 1 token of context
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module | str | os.PathLike,
    data,
    *,
    tokenizer=None,
    pattern=None,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    dtype=None,
    stream: bool = True,
    memory_budget: int | str | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> EvalResult:
    """Perplexity of `model` on `data` (a .jsonl/.txt file or a list of texts).

    `model` is a loaded model (pass `tokenizer`) or a checkpoint folder; with `pattern`, the
    folder is used slim (only the pattern's experts, as `load_slim` builds it). A folder is
    streamed one decoder layer at a time on `device` (`moeprune.stream`; `memory_budget` bounds
    the memory) unless `stream=False`, which loads it whole first. `window` (default 256, or the
    model's context if shorter) may not exceed the model's context; `stride` defaults to the window.
    """
    if window is not None:
        check_int(window, "window", minimum=2)
    if stride is not None:
        check_int(stride, "stride", minimum=1)
        if window is not None and stride > window:
            raise MoepruneError(f"stride ({stride}) must not exceed the window ({window})")
    check_int(batch_size, "batch_size", minimum=1)
    if max_tokens is not None:
        check_int(max_tokens, "max_tokens", minimum=1)
    if not isinstance(model, (nn.Module, str, os.PathLike)):
        raise MoepruneError(f"model must be a loaded transformers model or a checkpoint folder, "
                            f"got {type(model).__name__}")
    texts = read_documents(data)
    streamed = None
    if isinstance(model, (str, os.PathLike)):
        from .models import check_model_path, load_config, load_model, load_tokenizer
        from .pattern import as_pattern

        path = check_model_path(model)
        resolve_length(window, 256, load_config(path), "window")  # before loading a model that cannot take it
        pattern = as_pattern(pattern) if pattern is not None else None
        if stream:
            from .stream import LayerStream, parse_bytes

            parse_bytes(memory_budget)
            streamed = LayerStream(path, dtype=dtype, device=device, pattern=pattern, memory_budget=memory_budget)
            model = streamed.model
        else:
            from .stream import one_device

            device = one_device(device)
            if pattern is not None:
                from .slim import load_slim

                model = load_slim(path, pattern, dtype=dtype, device=device)
            else:
                model = load_model(path, dtype=dtype, device=str(device))[0]
        tokenizer = tokenizer or load_tokenizer(path)
    elif pattern is not None:
        raise MoepruneError("pattern= needs a checkpoint folder, not a loaded model (use load_slim first)")
    try:
        return _evaluate(model, streamed, texts, tokenizer, window, stride, batch_size, max_tokens, progress)
    finally:
        if streamed is not None:
            streamed.close()


def _evaluate(model, streamed, texts, tokenizer, window, stride, batch_size, max_tokens, progress) -> EvalResult:
    if tokenizer is None:
        raise MoepruneError("evaluate() needs a tokenizer when given a loaded model: pass tokenizer=...")
    window = resolve_length(window, 256, model.config, "window")
    stride = stride or window
    if stride > window:
        raise MoepruneError(f"stride ({stride}) must not exceed the window ({window})")
    stream = token_stream(texts, tokenizer, max_tokens)
    if len(stream) < 2:
        raise MoepruneError(f"the evaluation data has {len(stream)} token(s); at least 2 are needed")
    device = streamed.device if streamed is not None else model_device(model)
    spans = _windows(len(stream), window, stride)
    batches, labels = [], []
    for i in range(0, len(spans), batch_size):
        group = spans[i : i + batch_size]
        width = max(end - start for start, end, _ in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        label = torch.full((len(group), width), -100, dtype=torch.long)
        for row, (start, end, first) in enumerate(group):
            n = end - start
            ids[row, :n] = stream[start:end]
            mask[row, :n] = 1
            label[row, first - start : n] = stream[first:end]
        batches.append({"input_ids": ids, "attention_mask": mask})
        labels.append(label)
    total_nll, total = 0.0, 0

    def score(b: int, logits: torch.Tensor) -> None:
        nonlocal total_nll, total
        shifted = labels[b][:, 1:].to(logits.device)  # position p predicts token p + 1
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                              ignore_index=-100, reduction="sum")
        total_nll += float(nll)
        total += int((shifted != -100).sum())

    if streamed is not None:
        streamed.run(batches, head=score, progress=progress)
    else:
        model.eval()
        for b in tqdm(range(len(batches)), desc="evaluating", unit="batch", disable=not progress):
            out = model(**{k: v.to(device) for k, v in batches[b].items()}, use_cache=False)
            score(b, out.logits)
    mean = total_nll / total
    return EvalResult(math.exp(mean), mean, total, len(texts))
