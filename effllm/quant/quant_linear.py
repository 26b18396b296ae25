"""``QuantLinear``: a linear layer whose weight is stored packed (2..8-bit codes, per-group scale and zero).

Buffers (what a quantized Hugging Face folder stores for each layer):
``qweight`` uint8 [ceil(out * in * bits / 8)] (codes of the row-major [out, in] weight, see kernels/packing),
``scales`` [out, groups] in the model dtype, ``zeros`` uint8 [out, groups], and ``bias``.
The forward pass is ``effllm.kernels.qmatmul``: the weight is dequantized on the fly inside the kernel (Triton on
GPU, C on CPU), never stored in full precision. Activations are fake-quantized per token when ``act_bits`` is set.
The kernel's per-layer plan (e.g. fp32 scales on CPU) is cached on the layer, never saved, and rebuilt when the
buffers, their device or the kernel backend change.
"""

from __future__ import annotations

import torch
from torch import nn

from effllm.kernels import requested_backend
from effllm.kernels.packing import pack_bits_ref, packed_numel, unpack_bits_ref
from effllm.kernels.qmatmul import prepare_qmatmul

from .weight_quant import WeightQuantSpec, fake_quant_activation


def _version(tensor: torch.Tensor) -> int:
    """How many in-place writes ``tensor`` has seen; inference-mode tensors keep no count."""
    return 0 if tensor.is_inference() else tensor._version


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
        self._drop_matmul_plan()

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
        return self._matmul_plan()(x, self.bias)

    def _plan_key(self) -> tuple:
        """What the cached plan depends on: the backend asked for, which tensors the buffers are (the plan keeps
        them alive, so their ids stay unique) and where their data is, and their in-place writes
        (``load_state_dict``, ``copy_`` bump ``_version``; tensors made under ``torch.inference_mode`` have no
        version counter)."""
        buffers = self._buffers  # not self.qweight: nn.Module's attribute fallback costs microseconds per call
        qweight, scales, zeros = buffers["qweight"], buffers["scales"], buffers["zeros"]
        return (requested_backend(), id(qweight), id(scales), id(zeros),
                qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
                _version(qweight), _version(scales), _version(zeros))

    def _matmul_plan(self):
        key = self._plan_key()
        if key != self._cached_plan_key:
            self._cached_plan = prepare_qmatmul(self.qweight, self.scales, self.zeros, self.spec.bits,
                                                self.spec.group_size, self.out_features, self.in_features)
            self._cached_plan_key = key
        return self._cached_plan

    def _drop_matmul_plan(self) -> None:
        self._cached_plan, self._cached_plan_key = None, None

    def _apply(self, *args, **kwargs):
        self._drop_matmul_plan()  # .to()/.cuda()/.half() replace the buffers: let the old ones go now
        return super()._apply(*args, **kwargs)

    def __getstate__(self):
        state = dict(self.__dict__)  # deepcopy and pickle: the plan holds C entry points, rebuilt on use
        state.update(_cached_plan=None, _cached_plan_key=None)
        return state

    def extra_repr(self) -> str:
        group = self.spec.group_size or "channel"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.spec.bits}, "
                f"group={group}, symmetric={self.spec.symmetric}, act_bits={self.act_bits}")
