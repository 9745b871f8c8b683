"""Packed trunk weights for CPU decoding: fp16 or int8 linears, the experts' MLP left exact.

On a CPU a decode step of a small model streams every weight once, so its time is set by bytes
moved. ``pack_trunk`` swaps each ``nn.Linear`` of the frozen trunk (attention and MLP projections,
and the output head) for a packed one that runs on fbgemm, torch's x86 GEMM library:

- ``Fp16Linear`` (``--weights fp16`` on a CPU): weights held in fp16, half of fp32's bytes;
  activations stay fp32 and the GEMM accumulates in fp32 (``quantized.linear_dynamic_fp16``). The
  only change from fp32 is each weight's rounding to 11 significant bits.
- ``Int8Linear`` (``--weights int8``): per-output-channel symmetric int8 weights,
  ``W ≈ diag(s) · Q`` with ``s_o = max_i |W_oi| / 127``; fbgemm quantises the *activations* to 8
  bits on the fly, with one scale per call (``quantized.linear_dynamic``). A quarter of fp32's
  bytes, but SmolLM2's activations have outlier channels (a ``down_proj`` input channel reaches
  ~5,000x the median channel), and one 8-bit scale per call flattens the rest: on the dev slices
  int8 changes nearly every answer (results/dev/weights.md). The per-call scale also makes a row's
  output depend on the other rows of its batch.

What stays float in both: the MLPs of the last ``keep_last`` decoder layers, where experts sit (an
expert's delta is added beside exactly the weights it was trained against, in fp32), and the
embeddings and norms (not linears).

Experts are trained on float weights only: a packed linear refuses to run where autograd would
need its gradient, with a message that says so. This module knows nothing about experts or banks.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from dmoe.errors import UnsupportedModelError


class _PackedLinear(nn.Module):
    """An inference-only ``nn.Linear`` whose weight lives in an fbgemm-packed buffer."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias_ = None if linear.bias is None else linear.bias.detach().to("cpu", torch.float32)

    def _check(self, x: torch.Tensor) -> None:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("a packed (fp16/int8) linear cannot pass gradients: experts are "
                               "trained on float weights (load the model with --weights fp32 to "
                               "build)")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Fp16Linear(_PackedLinear):
    """``y = x @ W16.T + b``: fp16 weights, fp32 activations and accumulation."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        w = linear.weight.detach().to("cpu", torch.float32)
        self._packed = torch.ops.quantized.linear_prepack_fp16(w, self.bias_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return torch.ops.quantized.linear_dynamic_fp16(x.float(), self._packed).to(x.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer multiplies by, (out, in) fp32."""
        return torch.ops.quantized.linear_unpack_fp16(self._packed)[0].float()


class Int8Linear(_PackedLinear):
    """``y ≈ x @ (diag(s) Q).T + b``: per-channel int8 weights, dynamically int8 activations."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        w = linear.weight.detach().to("cpu", torch.float32)
        scales = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).double()  # (out,)
        zero = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # quantised tensors are deprecated; torch 2.13 has them
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_channel(w, scales, zero, axis=0, dtype=torch.qint8)
        self._packed = torch.ops.quantized.linear_prepack(q, self.bias_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        y = torch.ops.quantized.linear_dynamic(x.float(), self._packed, True)  # reduce_range: x86
        return y.to(x.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The int8 weight times its scales, (out, in) fp32: what this layer multiplies by."""
        return torch.ops.quantized.linear_unpack(self._packed)[0].dequantize()


PACKERS: dict[str, type[_PackedLinear]] = {"fp16": Fp16Linear, "int8": Int8Linear}  # by --weights


def pack_trunk(model: Any, mode: str, keep_last: int = 1) -> int:
    """Swap the trunk's ``nn.Linear`` modules for packed ``mode`` ones in place; return how many.

    The MLPs of the last ``keep_last`` decoder layers stay float (experts sit there). CPU only:
    the kernels are fbgemm's x86 ones.
    """
    if mode not in PACKERS:
        raise ValueError(f"mode must be one of {tuple(PACKERS)}, got {mode!r}")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise UnsupportedModelError(f"packed {mode} weights run on the CPU only (the model is on "
                                    f"{device})")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise UnsupportedModelError(f"packed {mode} weights need fbgemm (an x86-64 CPU build of "
                                    "torch); use --weights fp32")
    torch.backends.quantized.engine = "fbgemm"
    n_layers = model.config.num_hidden_layers
    keep = tuple(f"model.layers.{i}.mlp." for i in range(n_layers - keep_last, n_layers))
    swaps = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and not name.startswith(keep)]
    for name, module in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PACKERS[mode](module))
    return len(swaps)  # a tied head is now a packed copy; the float embedding stays as it was
