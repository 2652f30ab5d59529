"""Reading prompts: a list of strings, a text file (one per line) or JSONL (`text` or chat `messages`)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from .errors import PromptError

Prompt = str | list  # text, or a list of chat messages


def read_prompts(source: str | os.PathLike | Sequence) -> list[Prompt]:
    """Prompts from a list or a file; each is a string or a list of chat messages."""
    if isinstance(source, (str, os.PathLike)) and (isinstance(source, os.PathLike) or _looks_like_path(source)):
        prompts = _read_file(Path(source))
    elif isinstance(source, str):
        prompts = [source]
    else:
        prompts = list(source)
        for i, p in enumerate(prompts):
            if not isinstance(p, (str, list)):
                raise PromptError(f"prompt {i} is a {type(p).__name__}, expected a string or a list of chat messages")
    if not prompts:
        raise PromptError(f"no prompts in {source if isinstance(source, (str, os.PathLike)) else 'the list'}")
    return prompts


def _looks_like_path(s: str) -> bool:
    return "\n" not in s and (os.sep in s or s.endswith((".txt", ".jsonl", ".json")) or os.path.exists(s))


def _read_file(path: Path) -> list[Prompt]:
    text = _read_text(path, "prompt file")
    if path.suffix in (".jsonl", ".json"):
        prompts: list[Prompt] = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            prompts.append(_jsonl_prompt(line, path, n))
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptError(f"prompt file {path} holds no prompts")
    return prompts


def _jsonl_prompt(line: str, path: Path, n: int) -> Prompt:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise PromptError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
        if not obj["text"].strip():
            raise PromptError(f"{path}, line {n}: empty 'text'")
        return obj["text"]
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
        msgs = obj["messages"]
        if not msgs or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise PromptError(f"{path}, line {n}: 'messages' must be a non-empty list of {{role, content}}")
        return msgs
    raise PromptError(f"{path}, line {n}: expected an object with a 'text' string or a 'messages' list")


def render(prompt: Prompt, tokenizer) -> str:
    """A prompt as text: chat messages go through the tokenizer's chat template when it has one."""
    if isinstance(prompt, str):
        return prompt
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt, tokenize=False)
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def read_documents(source) -> list[str]:
    """Evaluation texts: a list of strings, a .jsonl file of {"text": ...} lines, or a text file (one document)."""
    if isinstance(source, (list, tuple)):
        docs = [d for d in source if isinstance(d, str) and d.strip()]
        if not docs:
            raise PromptError("no evaluation texts in the list")
        return docs
    path = Path(source)
    text = _read_text(path, "data file")
    if path.suffix in (".jsonl", ".json"):
        docs = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            doc = _jsonl_prompt(line, path, n)
            if not isinstance(doc, str):
                doc = "\n".join(str(m["content"]) for m in doc)
            docs.append(doc)
    else:
        docs = [text] if text.strip() else []
    if not docs:
        raise PromptError(f"data file {path} is empty")
    return docs


def encode(prompts: list[Prompt], tokenizer, max_length: int, what: str = "prompt") -> tuple[list[list[int]], int]:
    """Token ids of each prompt (rendered, truncated to `max_length`) and the id to pad with."""
    encoded = []
    for i, p in enumerate(prompts):
        ids = tokenizer(render(p, tokenizer), truncation=True, max_length=max_length)["input_ids"]
        if not ids:
            raise PromptError(f"{what} {i} is empty after tokenisation")
        encoded.append(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return encoded, pad


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise PromptError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(f"{what} {path} is not UTF-8 text: {e}") from None
