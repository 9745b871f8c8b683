"""The ``self`` backend: the frozen base model itself, batched greedy generation with left padding.

Messages go through the tokenizer's chat template (plain text + newline when it has none); the
batch is sorted by length so that padding stays small, left-padded by hand (so any tokenizer with
``__call__`` and ``decode`` works, including the tests' byte tokenizer), and generated greedily
until EOS, ``max_new_tokens`` or, per row, a match of ``stop_regex`` in its newest tokens (the QA
list's closing ``}]`` — small models otherwise keep adding items until the budget runs out). This module knows nothing about prompts or parsing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch


class _RegexStop:
    """Stopping criterion: a row is done once its generated text (the last ``tail`` tokens)
    matches ``pattern``. Decodes a few tokens per row per step: negligible next to the model."""

    def __init__(self, tokenizer: Any, pattern: str, prompt_width: int, tail: int = 8) -> None:
        self.tokenizer = tokenizer
        self.pattern = re.compile(pattern)
        self.prompt_width = prompt_width
        self.tail = tail

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, self.prompt_width:]  # (B, generated so far)
        done = [bool(self.pattern.search(self.tokenizer.decode(row[-self.tail:].tolist())))
                for row in new]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class HFChatBackend:
    """Greedy batched generation with a transformers causal LM."""

    name = "self"
    can_prefill = True

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 8,
                 model_id: str = "") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size  # sequences per generate() call
        self.model_id = model_id  # model fingerprint (cache key); computed when empty

    @classmethod
    def from_loaded(cls, loaded: Any, *, batch_size: int = 8) -> HFChatBackend:
        """From a ``base_model.LoadedModel``."""
        return cls(loaded.model, loaded.tokenizer, batch_size=batch_size,
                   model_id=f"{loaded.source.name}:{loaded.fingerprint}")

    @property
    def settings(self) -> dict[str, Any]:
        if not self.model_id:
            from dmoe.base_model import model_fingerprint

            self.model_id = model_fingerprint(self.model)
        # batch_size is left out on purpose: left padding does not change greedy outputs in
        # exact arithmetic, and a cache must survive a change of batch size.
        return {"backend": "self", "model": self.model_id, "decoding": "greedy"}

    def _render(self, message: str) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return str(tok.apply_chat_template([{"role": "user", "content": message}],
                                               tokenize=False, add_generation_prompt=True))
        return message + "\n"

    def _pad_id(self) -> int:
        tok = self.tokenizer
        pad = getattr(tok, "pad_token_id", None)
        return int(pad if pad is not None else tok.eos_token_id)

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], max_new_tokens: int,
                        stop_regex: str) -> list[str]:
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        pad = self._pad_id()
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                            device=device)  # (B, T)
        kwargs: dict[str, Any] = {}
        if stop_regex:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList(
                [_RegexStop(self.tokenizer, stop_regex, width)])  # type: ignore[list-item]
        out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                  max_new_tokens=max_new_tokens, pad_token_id=pad,
                                  eos_token_id=self.tokenizer.eos_token_id,
                                  **kwargs)  # (B, T + new)
        return [self.tokenizer.decode(row[width:].tolist(), skip_special_tokens=True)
                for row in out]

    def generate(self, messages: Sequence[str], *, max_new_tokens: int, prefill: str = "",
                 stop_regex: str = "") -> list[str]:
        prompts = [list(self.tokenizer(self._render(m) + prefill,
                                       add_special_tokens=False)["input_ids"]) for m in messages]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        replies: list[str] = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            texts = self._generate_batch([prompts[i] for i in chunk], max_new_tokens, stop_regex)
            for i, text in zip(chunk, texts, strict=True):
                replies[i] = prefill + text
        return replies
