"""The compressed layers that replace a model's own: linear (and a head tied to an embedding), embedding,
LayerNorm and RMSNorm.

Each stores its weight as a ``PackedTensor`` (the weight is never kept in floating point), quantizes its input and
output blockwise, and has a ``shell`` constructor (right shapes, empty buffers) that ``effllm.load`` fills from a
saved folder. A linear's matmul runs on the Triton backend as ``blockwise_matmul``, which decodes the packed weight
tile by tile inside the kernel; elsewhere the weight is decoded (by the C kernel on CPU) and handed to torch.
"""

from __future__ import annotations

import torch
from torch import nn

from effllm.kernels import backend_for
from effllm.kernels.blockwise_matmul import blockwise_matmul

from .activation_quant import ActivationQuantizer
from .config import ActivationSpec, StoredSpec
from .packed_tensor import PackedTensor


def _stored_or_float(tensor: torch.Tensor | None, spec: StoredSpec, shell: bool):
    """A PackedTensor of ``tensor`` (an empty one for a shell), or the tensor itself as a float parameter
    when ``spec.bits`` is null."""
    if tensor is None:
        return None
    if spec.bits is None:
        return nn.Parameter(tensor.detach().clone(), requires_grad=False)
    if shell:
        return PackedTensor(tensor.shape, spec, tensor.device)
    return PackedTensor.from_float(tensor.float(), spec)


def _decoded(stored, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    if stored is None:
        return None
    return stored.dequantize(dtype) if isinstance(stored, PackedTensor) else stored.to(dtype)


class BCTLinear(nn.Module):
    def __init__(self, linear: nn.Linear, weight_spec: StoredSpec, bias_spec: StoredSpec,
                 act_spec: ActivationSpec, shell: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_packed = _stored_or_float(linear.weight, weight_spec, shell)
        self.bias_packed = _stored_or_float(linear.bias, bias_spec, shell)
        self.input_quant = ActivationQuantizer(act_spec)
        self.output_quant = ActivationQuantizer(act_spec)

    def stored_weight(self) -> PackedTensor | torch.Tensor:
        """The weight as stored: a ``PackedTensor`` [out_features, in_features], or a float parameter."""
        return self.weight_packed

    def decoded_weight(self) -> torch.Tensor:
        return _decoded(self.stored_weight())

    def decoded_bias(self) -> torch.Tensor | None:
        return _decoded(self.bias_packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = self.input_quant(x).float()
        stored = self.stored_weight()
        if isinstance(stored, PackedTensor) and backend_for(stored.codes) == "triton":
            # the packed weight is decoded tile by tile inside the matmul kernel, never as a whole
            y = blockwise_matmul(xq, stored.codes, stored.decoded_scales(), stored.qmap, stored.spec.bits,
                                 stored.spec.blocksize, self.out_features, self.in_features, stored.column_major,
                                 self.decoded_bias())
        else:
            y = nn.functional.linear(xq, self.decoded_weight(), self.decoded_bias())
        return self.output_quant(y).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class BCTTiedLinear(BCTLinear):
    """An output head whose weight is an input embedding's table (tied word embeddings, MLM decoders).

    It reads the embedding's packed table instead of holding a copy: the model keeps one packed tensor, and the
    saved folder one set of codes. The embedding is referenced, not registered as a child, so the state dict
    (and the compression report) holds it once, under the embedding. The bias is stored here, unless another
    module's parameter *is* it (``bias_alias``: BERT's ``predictions.bias``): then that parameter is read.
    """

    def __init__(self, linear: nn.Linear, embedding: BCTEmbedding, bias_spec: StoredSpec,
                 act_spec: ActivationSpec, shell: bool = False, bias_alias: tuple[nn.Module, str] | None = None):
        nn.Module.__init__(self)
        if (embedding.num_embeddings, embedding.embedding_dim) != (linear.out_features, linear.in_features):
            raise ValueError(f"a tied head of shape {(linear.out_features, linear.in_features)} cannot read an "
                             f"embedding table of shape {(embedding.num_embeddings, embedding.embedding_dim)}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # tuples: nn.Module registers modules, not tuples of them (no second copy in the state dict)
        self._embedding = (embedding,)
        self._bias_alias = bias_alias
        self.bias_packed = None if bias_alias else _stored_or_float(linear.bias, bias_spec, shell)
        self.input_quant = ActivationQuantizer(act_spec)
        self.output_quant = ActivationQuantizer(act_spec)

    @property
    def embedding(self) -> BCTEmbedding:
        return self._embedding[0]

    def aliased_bias(self) -> torch.Tensor | None:
        """The other module's parameter this head reads as its bias, if any (read at call time: loading may
        replace the parameter object)."""
        if self._bias_alias is None:
            return None
        owner, attribute = self._bias_alias
        return getattr(owner, attribute)

    def stored_weight(self) -> PackedTensor | torch.Tensor:
        return self.embedding.weight_packed

    def decoded_bias(self) -> torch.Tensor | None:
        alias = self.aliased_bias()
        return alias.float() if alias is not None else super().decoded_bias()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tied to the input embedding"


class BCTEmbedding(nn.Module):
    """Only the looked-up rows are decoded; the output is exactly representable by the stored codes."""

    def __init__(self, embedding: nn.Embedding, spec: StoredSpec, shell: bool = False):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.weight_packed = _stored_or_float(embedding.weight, spec, shell)

    @property
    def weight(self) -> torch.Tensor:
        """The decoded table (models that tie or resize embeddings read ``.weight``)."""
        return _decoded(self.weight_packed)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight_packed, PackedTensor):
            return self.weight_packed.gather_rows(ids)
        return nn.functional.embedding(ids, self.weight_packed, self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class BCTLayerNorm(nn.Module):
    """LayerNorm on a blockwise-quantized input (the residual stream) with a blockwise-quantized output.

    Mean and variance are exact sums over the decoded input (an integer pipeline accumulates them in wide
    integers); the affine parameters are stored like biases.
    """

    def __init__(self, norm: nn.LayerNorm, param_spec: StoredSpec, residual_spec: ActivationSpec,
                 output_spec: ActivationSpec, shell: bool = False):
        super().__init__()
        self.normalized_shape, self.eps = tuple(norm.normalized_shape), norm.eps
        self.weight_packed = _stored_or_float(norm.weight, param_spec, shell)
        self.bias_packed = _stored_or_float(norm.bias, param_spec, shell)
        self.input_quant = ActivationQuantizer(residual_spec)
        self.output_quant = ActivationQuantizer(output_spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.layer_norm(self.input_quant(x).float(), self.normalized_shape,
                                     _decoded(self.weight_packed), _decoded(self.bias_packed), self.eps)
        return self.output_quant(y).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class BCTRMSNorm(nn.Module):
    """Llama-style RMSNorm (``weight * x / sqrt(mean(x^2) + eps)``) on a blockwise-quantized input with a
    blockwise-quantized output; the mean square is exact over the decoded input, as in ``BCTLayerNorm``."""

    def __init__(self, norm: nn.Module, param_spec: StoredSpec, residual_spec: ActivationSpec,
                 output_spec: ActivationSpec, shell: bool = False):
        super().__init__()
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        self.hidden_size = norm.weight.shape[-1]
        self.weight_packed = _stored_or_float(norm.weight, param_spec, shell)
        self.input_quant = ActivationQuantizer(residual_spec)
        self.output_quant = ActivationQuantizer(output_spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = self.input_quant(x).float()
        y = xq * torch.rsqrt(xq.square().mean(-1, keepdim=True) + self.eps) * _decoded(self.weight_packed)
        return self.output_quant(y).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
