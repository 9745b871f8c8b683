"""Probe: how each way of holding the trunk's weights trades decode speed for fidelity to fp32.

The experiment behind ``--weights`` (results/dev/weights.md). On the packaged model, for each arm:

- ``agree``: teacher-forced top-1 agreement with fp32 over fp32's own greedy continuations (32
  tokens) of the first ``--n`` HotpotQA dev questions (300+), and the mean KL(fp32 || arm) per token;
- ``same_answer``: the share of those questions whose free-running greedy answer equals fp32's;
- ``step_ms_b1`` / ``step_ms_b8``: median time of one decode step (64-token cache) at batch 1 and 8,
  arms interleaved over 3 rounds; ``speedup_*`` against fp32 in the same rounds;
- ``outliers``: per linear kind, max over channels / median over channels of |input activation|
  (max over layers), which is what a per-call int8 activation scale has to cover.

Arms: fp32, bf16 (whole model), fp16 and int8 (``dmoe.quant``'s packed trunks), and two that are
not shipped: ``int8_w`` (weight-only per-channel int8 via ``aten._weight_int8pack_mm``, whose CPU
kernel needs bf16 activations) and ``int8_keep_down`` (int8 with every ``down_proj`` left fp32).

    python scripts/probe_weights.py --n 16 --out /tmp/probe_weights.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dmoe.base_model import load_base_model
from dmoe.eval.datasets import load_task
from dmoe.prompts import encode_prompt
from dmoe.quant import Fp16Linear, Int8Linear


class WeightOnlyInt8(nn.Module):
    """Per-channel int8 weights, bf16 activations (the CPU kernel's only fast input dtype)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(1) / 127).clamp_min(1e-12)
        self.q = torch.round(w / scale[:, None]).to(torch.int8)
        self.scale = scale.bfloat16()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).bfloat16(), self.q,
                                               self.scale)
        return y.reshape(*shape[:-1], -1).to(x.dtype)


def swapped(model: Any, make: Any, skip: tuple[str, ...] = ()) -> Any:
    """A copy of ``model`` with every trunk linear (not the last MLP, not ``skip``) replaced."""
    m = copy.deepcopy(model)
    last = f"model.layers.{m.config.num_hidden_layers - 1}.mlp."
    for name, module in list(m.named_modules()):
        if isinstance(module, nn.Linear) and not name.startswith(last) \
                and not any(s in name for s in skip):
            parent, _, child = name.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, child, make(module))
    return m


def outliers(model: Any, ids: torch.Tensor) -> dict[str, float]:
    ratios: dict[str, float] = {}

    def hook(kind: str) -> Any:
        def f(module: Any, args: tuple[torch.Tensor, ...]) -> None:
            ch = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            ratios[kind] = max(ratios.get(kind, 0.0), float(ch.max() / ch.median()))
        return f

    hooks = [m.register_forward_pre_hook(hook(n.rsplit(".", 1)[-1]))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {k: round(v, 1) for k, v in ratios.items()}


def step_ms(model: Any, batch: int, n: int = 12) -> float:
    from transformers import DynamicCache

    ids = torch.randint(0, 1000, (batch, 64), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok, times = torch.full((batch, 1), 5), []
        for _ in range(n + 3):
            t = time.perf_counter()
            model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - t)
            cache.crop(-1)
    return statistics.median(times[3:]) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="HotpotQA dev questions (default 16)")
    ap.add_argument("--out", help="write the JSON here too")
    args = ap.parse_args()
    lm = load_base_model(None, "cpu", "fp32")
    ref, tok = lm.model, lm.tokenizer
    questions = [s.question for s in load_task("hotpotqa", offset=300, limit=args.n).samples]
    prompts = [torch.tensor([encode_prompt(tok, q)]) for q in questions]
    with torch.no_grad():
        seqs = [ref.generate(p, max_new_tokens=32, do_sample=False) for p in prompts]
    arms = {"fp32": ref, "bf16": copy.deepcopy(ref).to(torch.bfloat16),
            "fp16": swapped(ref, Fp16Linear), "int8": swapped(ref, Int8Linear),
            "int8_w": swapped(ref, WeightOnlyInt8),
            "int8_keep_down": swapped(ref, Int8Linear, skip=("down_proj",))}
    out: dict[str, Any] = {"n": len(prompts), "outliers": outliers(ref, seqs[0]), "arms": {}}
    for name, m in arms.items():
        agree = total = 0
        kl = 0.0
        same = 0
        with torch.no_grad():
            for p, s in zip(prompts, seqs, strict=True):
                start = p.shape[1] - 1
                a = ref(s).logits[0, start:-1].float().log_softmax(-1)
                b = m(s).logits[0, start:-1].float().log_softmax(-1)
                agree += int((a.argmax(-1) == b.argmax(-1)).sum())
                total += a.shape[0]
                kl += float(F.kl_div(b, a, log_target=True, reduction="sum"))
                same += int(torch.equal(m.generate(p, max_new_tokens=32, do_sample=False), s))
        out["arms"][name] = {"agree": round(agree / total, 4), "kl": round(kl / total, 5),
                             "same_answer": round(same / len(prompts), 4)}
        print(name, out["arms"][name], flush=True)
    for batch in (1, 8):
        times: dict[str, list[float]] = {k: [] for k in arms}
        for _ in range(3):
            for name, m in arms.items():
                times[name].append(step_ms(m, batch))
        base = statistics.median(times["fp32"])
        for name in arms:
            med = statistics.median(times[name])
            out["arms"][name][f"step_ms_b{batch}"] = round(med, 1)
            out["arms"][name][f"speedup_b{batch}"] = round(base / med, 2)
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
