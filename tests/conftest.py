"""Shared fixtures: tiny random decoders built in-process (no network, no GPU)."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import httpx
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
    elif arch == "gemma3":
        # Gemma 3's block (pre/post feed-forward norms, q/k norms, scaled embeddings), its
        # alternating layer types, and a sliding window short enough that the tests' sequences
        # cross it. Both tied embeddings and two rope bases as in the real model.
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        kinds = ["sliding_attention", "full_attention"] * layers
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            **common, head_dim=16, sliding_window=6, layer_types=kinds[:layers],
            query_pre_attn_scalar=16, final_logit_softcapping=None))
    else:
        raise ValueError(arch)
    return model.eval().requires_grad_(False)


def reference_logits(model, adapter, bank, prompt, gen):
    """Full no-cache forward for every generated position under the experts active there."""
    out = []
    for t, rec in enumerate(gen.records):
        adapter.activate([bank[i] for i in rec.active])
        seq = torch.cat([prompt, torch.tensor([gen.token_ids[:t]], dtype=torch.long)], dim=1)
        with torch.no_grad():
            out.append(model(seq).logits[0, -1])
    return torch.stack(out)


def random_bank(adapter, n: int, std: float = 0.02):
    """``n`` seeded random experts ``e0 .. e{n-1}`` for a real model, a router that picks two of
    them by query length, and the loader an ``Engine`` takes: ``(bank, router, load)``."""
    from dmoe.experts.lora import LoraSpec, random_expert
    from dmoe.routing.base import FunctionRouter

    g = torch.Generator().manual_seed(0)
    bank = {f"e{i}": random_expert(f"e{i}", adapter.mlp_shapes, LoraSpec(), g, std=std)
            for i in range(n)}
    router = FunctionRouter(lambda q, k: [f"e{len(q) % n}", f"e{(len(q) + 1) % n}"][:k])
    return bank, router, lambda ids: [bank[i] for i in ids]


def tiny_lm():
    """``tiny_model()`` as a ``LoadedModel`` with the byte tokenizer: the same model on every call
    (a picklable factory, so a server's build worker process can load its own copy)."""
    from dmoe.base_model import LoadedModel, ModelSource, model_fingerprint

    model = tiny_model("llama", layers=2)
    return LoadedModel(model=model, tokenizer=CharTokenizer(),
                       source=ModelSource("tiny-llama", Path("tiny"), False),
                       device=torch.device("cpu"), fingerprint=model_fingerprint(model))


def tiny_model_dir(path: Path, layers: int = 2) -> Path:
    """A tiny random Llama + a byte-level tokenizer, saved as a Hugging Face model directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {"</s>": 256}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(path)
    tiny_model("llama", layers=layers).save_pretrained(path)
    return path


def dmoe_cli(*args: str, **kwargs) -> subprocess.Popen:
    """``python -m dmoe.cli ARGS`` with text pipes, one thread and no keys from this shell."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DMOE_API_KEY": "", "DMOE_ADMIN_KEY": ""}
    env.update(kwargs.pop("env", {}))
    return subprocess.Popen([sys.executable, "-m", "dmoe.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


class DmoeServe:
    """A real ``dmoe serve`` process on a free loopback port, up once ``/health`` answers."""

    def __init__(self, bank: Path, model: Path | None, key: str | None = None,
                 env: dict[str, str] | None = None, timeout: float = 120) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        model_args = ["--model", str(model)] if model is not None else []
        self.proc = dmoe_cli("serve", "--bank", str(bank), *model_args, "--port", str(port),
                             "--log-level", "warning", env=env or {})
        headers = {"X-API-Key": key} if key else {}
        deadline = time.time() + timeout
        while True:
            assert self.proc.poll() is None, self.proc.communicate()[1]
            try:
                if httpx.get(self.url + "/health", headers=headers).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                self.stop()
                raise AssertionError("dmoe serve did not come up")
            time.sleep(0.2)

    def stop(self) -> str:
        """Interrupt it as Ctrl-C does; its stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.proc.communicate(timeout=30)[1]


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


def load_script(name: str) -> types.ModuleType:
    """Import ``scripts/<name>.py`` (scripts are not a package) as a module."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
