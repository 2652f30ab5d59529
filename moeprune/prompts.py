"""Reading prompts: a list of strings, a text file (one per line) or JSONL (`text` or chat `messages`)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from .errors import PromptError

Prompt = str | list  # text, or a list of chat messages


def read_prompts(source: str | os.PathLike | Sequence) -> list[Prompt]:
    """Prompts from a list or a file; each is a string or a list of chat messages.

    A `Path` is always a file. A string is a file when it names one that exists, or looks like a
    prompt file name (no whitespace, ending in .txt, .jsonl or .json); otherwise it is one prompt,
    so "what is 1/2?" is a question, not a path.
    """
    if isinstance(source, os.PathLike) or (isinstance(source, str) and _looks_like_path(source)):
        prompts = _read_file(Path(source))
    elif isinstance(source, str):
        if not source.strip():
            raise PromptError("the prompt is empty")
        prompts = [source]
    elif isinstance(source, (list, tuple)):
        prompts = list(source)
        for i, p in enumerate(prompts):
            if not isinstance(p, (str, list)):
                raise PromptError(f"prompt {i} is a {type(p).__name__}, expected a string or a list of chat messages")
            if isinstance(p, str) and not p.strip():
                raise PromptError(f"prompt {i} is empty")
            if isinstance(p, list):
                _check_messages(p, f"prompt {i}")
    else:
        raise PromptError(f"prompts must be a list of strings or chat-message lists, or a file path; "
                          f"got {type(source).__name__}")
    if not prompts:
        raise PromptError(f"no prompts in {source if isinstance(source, (str, os.PathLike)) else 'the list'}")
    return prompts


def _looks_like_path(s: str) -> bool:
    if os.path.exists(s):
        return True
    return not any(c.isspace() for c in s) and s.endswith((".txt", ".jsonl", ".json"))


def _check_messages(msgs: list, where: str) -> None:
    if not msgs or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                           for m in msgs):
        raise PromptError(f"{where}: chat messages must be a non-empty list of {{role, content}} with string values")


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
        _check_messages(msgs, f"{path}, line {n}")
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
        bad = [i for i, d in enumerate(source) if not isinstance(d, str)]
        if bad:
            raise PromptError(f"evaluation text {bad[0]} is a {type(source[bad[0]]).__name__}, expected a string")
        docs = [d for d in source if d.strip()]
        if not docs:
            raise PromptError("no evaluation texts in the list")
        return docs
    if not isinstance(source, (str, os.PathLike)):
        raise PromptError(f"evaluation data must be a file path or a list of texts, got {type(source).__name__}")
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


def encode(prompts: list[Prompt], tokenizer, max_length: int,
           what: str = "prompt") -> tuple[list[list[int]], int, int]:
    """Token ids of each prompt (rendered, cut to `max_length`), the id to pad with, and how many
    prompts were longer than `max_length`."""
    encoded: list[list[int]] = []
    cut = 0
    for i, p in enumerate(prompts):
        ids = tokenizer(render(p, tokenizer), verbose=False)["input_ids"]
        if not ids:
            raise PromptError(f"{what} {i} is empty after tokenisation")
        if len(ids) > max_length:
            ids = ids[:max_length]
            cut += 1
        encoded.append(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return encoded, pad, cut


def _read_text(path: Path, what: str) -> str:
    if path.is_dir():
        raise PromptError(f"{what} {path} is a folder; give a .txt or .jsonl file")
    if not path.is_file():
        raise PromptError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8-sig")  # editors on Windows start UTF-8 files with a BOM
    except UnicodeDecodeError as e:
        raise PromptError(f"{what} {path} is not UTF-8 text: {e}") from None
