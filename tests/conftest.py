"""Shared fixtures: tiny random decoders built in-process (no network, no GPU)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class CharTokenizer:
    """A byte-level stand-in for a HF tokenizer: ids 0..255 are bytes, 256 is EOS."""

    eos_token_id = 256
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def tiny_model(arch: str = "llama", layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  eos_token_id=256, bos_token_id=None, pad_token_id=None,
                  initializer_range=0.1)  # large enough that attention over the cache matters
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(arch)
    return model.eval().requires_grad_(False)


def tiny_lm():
    """``tiny_model()`` as a ``LoadedModel`` with the byte tokenizer: the same model on every call
    (a picklable factory, so a server's build worker process can load its own copy)."""
    from pathlib import Path

    from dmoe.base_model import LoadedModel, ModelSource, model_fingerprint

    model = tiny_model("llama", layers=2)
    return LoadedModel(model=model, tokenizer=CharTokenizer(),
                       source=ModelSource("tiny-llama", Path("tiny"), False),
                       device=torch.device("cpu"), fingerprint=model_fingerprint(model))


@pytest.fixture
def tokenizer() -> CharTokenizer:
    return CharTokenizer()


def toy_jobs(n_units: int = 4, min_qa: int = 2) -> list[tuple[str, list]]:
    """Training units with examples of different lengths: the passage as an LM example plus
    ``min_qa + u % 3`` short QA pairs that share the passage as their prompt's prefix."""
    from dmoe.augment.types import TrainingExample

    jobs = []
    for u in range(n_units):
        passage = f"Unit {u}: the tower of town {u} is green since 19{u}7." * (1 + u % 2)
        examples = [TrainingExample("", passage)]
        for q in range(min_qa + u % 3):
            prompt = f"Context: {passage}\nQ{q}: what about town {u}? A:"  # shared passage prefix
            examples.append(TrainingExample(prompt, f" fact {u}-{q}"))
        jobs.append((f"unit/{u}", examples))
    return jobs
