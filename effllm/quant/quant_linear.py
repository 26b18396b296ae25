"""``QuantLinear``: a linear layer whose weight is stored packed (2..8-bit codes, per-group scale and zero).

Buffers (what a quantized Hugging Face folder stores for each layer):
``qweight`` uint8 [ceil(out * in * bits / 8)] (codes of the row-major [out, in] weight, see kernels/packing),
``scales`` [out, groups] in the model dtype, ``zeros`` uint8 [out, groups], and ``bias``.
The forward pass dequantizes on the fly; activations are fake-quantized per token when ``act_bits`` is set.
"""

from __future__ import annotations

import torch
from torch import nn

from effllm.kernels.packing import pack_bits_ref, packed_numel, unpack_bits_ref

from .weight_quant import WeightQuantSpec, fake_quant_activation


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, spec: WeightQuantSpec, bias: bool = False,
                 act_bits: int | None = None, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.spec = spec
        self.act_bits = act_bits
        groups = spec.groups(in_features)
        numel = in_features * out_features
        self.register_buffer("qweight", torch.zeros(packed_numel(numel, spec.bits), dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None,
                   spec: WeightQuantSpec, act_bits: int | None = None, dtype: torch.dtype = torch.float32):
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, spec, bias is not None, act_bits, dtype, codes.device)
        layer.qweight.copy_(pack_bits_ref(codes, spec.bits))
        layer.scales.copy_(scale)
        layer.zeros.copy_(zero.to(torch.uint8))
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def codes(self) -> torch.Tensor:
        return unpack_bits_ref(self.qweight, self.spec.bits, self.in_features * self.out_features).view(
            self.out_features, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        groups = self.scales.shape[1]
        codes = self.codes().view(self.out_features, groups, -1).to(torch.float32)
        weight = (codes - self.zeros[..., None].float()) * self.scales[..., None].float()
        return weight.reshape(self.out_features, self.in_features).to(dtype or self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits:
            x = fake_quant_activation(x, self.act_bits)
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        group = self.spec.group_size or "channel"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.spec.bits}, "
                f"group={group}, symmetric={self.spec.symmetric}, act_bits={self.act_bits}")
