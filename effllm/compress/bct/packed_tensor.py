"""``PackedTensor``: a weight stored as packed blockwise codes, per-block scales and its map, as module buffers.

Built on the blockwise core: the flattened tensor is cut into blocks (``kernels.blockwise``), each value becomes
the index of the nearest map entry (``nearest_code_ref``), codes are bit-packed (``kernels.packing``) and decoding
is ``dequantize_blockwise`` (C kernel on CPU, Triton on GPU). Two additions, both optional (``StoredSpec``):

* ``map: fitted``: the map is fitted to this tensor's block-normalised values by Lloyd-Max iterations (the
  levels that minimise squared error), and stored with it (``2**bits`` floats, negligible);
* ``clip_search``: each block's scale is the fraction of its absmax (from ``CLIP_FRACTIONS``) with the least
  squared error, so one outlier does not stretch the grid of a whole block;
* ``scale_format: uint8``: scales are themselves blockwise-quantized (8-bit unsigned dynamic map, blocks of
  ``SCALE_BLOCKSIZE``) as QLoRA's double quantization does; codes are chosen against the *decoded* scales;
* ``block_layout: column_major``: a 2-D tensor is stored transposed (flattened column by column), so blocks run
  down its columns; ``dequantize`` and ``gather_rows`` give the tensor back in its own shape.

Buffers: ``codes`` uint8 [ceil(numel * bits / 8)], ``scales`` [nblocks] (fp32, fp16, or uint8 codes with
``scale_absmax`` fp32 [ceil(nblocks / SCALE_BLOCKSIZE)]), and for a fitted map ``fitted_map`` fp32 [2**bits].
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from effllm.kernels.blockwise import (
    _blocks,
    absmax_to_scale,
    dequantize_blockwise,
    nearest_code_ref,
    num_blocks,
    quantize_blockwise,
)
from effllm.kernels.packing import pack_bits_ref, packed_numel, unpack_bits_ref
from effllm.kernels.quant_maps import make_map, map_midpoints

from .config import StoredSpec

SCALE_BLOCKSIZE = 256
CLIP_FRACTIONS = tuple(1.0 - 0.025 * k for k in range(13))  # 1.0 down to 0.7
LLOYD_ITERATIONS = 12
LLOYD_SAMPLE = 1 << 20  # values used to fit a map: enough for 16 or 256 levels, cheap for a 12M embedding
_SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8}


def fit_map(normalized: torch.Tensor, levels: int, iterations: int = LLOYD_ITERATIONS) -> torch.Tensor:
    """Lloyd-Max levels (sorted, fp32 [levels]) for values in [-1, 1], started from the linear map."""
    values = normalized.reshape(-1).float()
    if values.numel() > LLOYD_SAMPLE:
        generator = torch.Generator().manual_seed(0)  # a fixed sample: the same tensor always gets the same map
        values = values[torch.randint(values.numel(), (LLOYD_SAMPLE,), generator=generator)]
    qmap = torch.linspace(-1.0, 1.0, levels)
    for _ in range(iterations):
        assignment = torch.bucketize(values, map_midpoints(qmap))
        sums = torch.zeros(levels).index_add_(0, assignment, values)
        counts = torch.zeros(levels).index_add_(0, assignment, torch.ones_like(values))
        # an empty level keeps its place rather than collapsing onto a neighbour
        qmap = torch.where(counts > 0, sums / counts.clamp(min=1), qmap).sort().values
    return qmap


def _least_error_scales(blocks: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """For each block [nb, B], the scale among ``CLIP_FRACTIONS`` of its absmax with least squared error."""
    absmax = absmax_to_scale(blocks.abs().amax(dim=1))
    best_scale, best_error = absmax.clone(), torch.full_like(absmax, float("inf"))
    for fraction in CLIP_FRACTIONS:
        scale = absmax * fraction
        decoded = qmap[nearest_code_ref(blocks / scale[:, None], qmap).long()] * scale[:, None]
        error = (decoded - blocks).square().sum(dim=1)
        better = error < best_error
        best_scale, best_error = torch.where(better, scale, best_scale), torch.where(better, error, best_error)
    return best_scale


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class PackedTensor(nn.Module):
    """A tensor of ``shape`` stored as described in the module docstring; ``spec.bits`` must be set."""

    def __init__(self, shape: torch.Size | tuple[int, ...], spec: StoredSpec, device=None):
        super().__init__()
        if spec.bits is None:
            raise ValueError("a PackedTensor needs a bit width (spec.bits is null)")
        self.shape = torch.Size(shape)
        if spec.bits < 8 and self.shape.numel() < spec.min_low_bit_elements:
            spec = replace(spec, bits=8)  # a tiny tensor: 8 bits cost nothing (StoredSpec.min_low_bit_elements)
        self.spec = spec
        self.column_major = spec.block_layout == "column_major" and len(self.shape) == 2
        numel, blocks = self.shape.numel(), num_blocks(self.shape.numel(), spec.blocksize)
        self.register_buffer("codes", torch.zeros(packed_numel(numel, spec.bits), dtype=torch.uint8, device=device))
        # The floating-point scales are (frozen) parameters: transformers reads a model's dtype and device from
        # its parameters, and a fully compressed model has no others.
        scales = torch.ones(blocks, dtype=_SCALE_DTYPES[spec.scale_format], device=device)
        if spec.scale_format == "uint8":
            self.register_buffer("scales", scales)
            self.scale_absmax = _frozen(torch.ones(num_blocks(blocks, SCALE_BLOCKSIZE), device=device))
        else:
            self.scales = _frozen(scales)
        # a fitted map belongs to its tensor and is saved; a named map is a constant of the spec, made on use
        if spec.map == "fitted":
            self.register_buffer("fitted_map", torch.zeros(2**spec.bits, device=device))

    @property
    def qmap(self) -> torch.Tensor:
        if self.spec.map == "fitted":
            return self.fitted_map
        return make_map(self.spec.map, True, self.spec.bits, self.codes.device)

    # --- encoding --------------------------------------------------------------------------------------------
    @classmethod
    def from_float(cls, tensor: torch.Tensor, spec: StoredSpec) -> PackedTensor:
        packed = cls(tensor.shape, spec, tensor.device)
        packed.encode_(tensor.detach())
        return packed

    def _stored_order(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (in this tensor's shape) in the order its elements are stored."""
        return tensor.T.contiguous() if self.column_major else tensor

    def _own_order(self, flat: torch.Tensor) -> torch.Tensor:
        """Stored-order values ``flat`` [numel] back in this tensor's shape."""
        if self.column_major:
            return flat.view(self.shape[1], self.shape[0]).T.contiguous()
        return flat.view(self.shape)

    @torch.no_grad()
    def encode_(self, tensor: torch.Tensor) -> None:
        spec = self.spec
        tensor = self._stored_order(tensor)
        if spec.map == "fitted":
            blocks = _blocks(tensor, spec.blocksize)
            self.fitted_map.copy_(fit_map(blocks / absmax_to_scale(blocks.abs().amax(dim=1))[:, None], 2**spec.bits))
            if spec.clip_search:  # one more round: the map for the clipped scales, as Lloyd alternates
                scale = absmax_to_scale(_least_error_scales(blocks, self.fitted_map))
                self.fitted_map.copy_(fit_map((blocks / scale[:, None]).clamp(-1, 1), 2**spec.bits))
        plain = spec.scale_format == "float32" and not spec.clip_search
        if plain:  # exactly the core's blockwise quantizer
            codes, absmax = quantize_blockwise(tensor, self.qmap, spec.blocksize)
            self.scales.data.copy_(absmax)
        else:
            blocks = _blocks(tensor, spec.blocksize)  # [nb, B]
            scale = _least_error_scales(blocks, self.qmap) if spec.clip_search else blocks.abs().amax(dim=1)
            self._store_scales(scale)
            decoded_scale = absmax_to_scale(self.decoded_scales())
            codes = nearest_code_ref((blocks / decoded_scale[:, None]).reshape(-1)[: tensor.numel()], self.qmap)
        self.codes.copy_(pack_bits_ref(codes, spec.bits))

    @torch.no_grad()
    def set_codes_(self, codes: torch.Tensor) -> None:
        """Store ``codes`` (indices into the map, in this tensor's shape), e.g. from calibrated rounding."""
        self.codes.copy_(pack_bits_ref(self._stored_order(codes).reshape(-1), self.spec.bits))

    def element_scales(self) -> torch.Tensor:
        """The decoded scale of every element (its block's), in this tensor's shape."""
        scales = self.decoded_scales()
        block = torch.arange(self.shape.numel(), device=scales.device) // self.spec.blocksize
        return self._own_order(scales[block])

    def _store_scales(self, scale: torch.Tensor) -> None:
        if self.spec.scale_format != "uint8":
            self.scales.data.copy_(scale)
            return
        unsigned = make_map("dynamic", False, 8, scale.device)
        codes, absmax = quantize_blockwise(scale, unsigned, SCALE_BLOCKSIZE)
        self.scales.copy_(codes)
        self.scale_absmax.data.copy_(absmax)

    # --- decoding --------------------------------------------------------------------------------------------
    def decoded_scales(self) -> torch.Tensor:
        """fp32 scale of every block."""
        if self.spec.scale_format != "uint8":
            return self.scales.float()
        unsigned = make_map("dynamic", False, 8, self.scales.device)
        return dequantize_blockwise(self.scales, self.scale_absmax, unsigned, SCALE_BLOCKSIZE)

    def unpacked_codes(self) -> torch.Tensor:
        return unpack_bits_ref(self.codes, self.spec.bits, self.shape.numel())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        flat = dequantize_blockwise(self.unpacked_codes(), self.decoded_scales(), self.qmap, self.spec.blocksize,
                                    dtype)
        return self._own_order(flat)

    def gather_rows(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decode only the rows ``rows`` (any shape of indices) of a 2-D tensor: an embedding lookup."""
        height, width, bits = self.shape[0], self.shape[1], self.spec.bits
        columns = torch.arange(width, device=rows.device)
        if self.column_major:
            element = columns * height + rows.reshape(-1, 1).long()  # [n, width] positions in the stream
        else:
            element = rows.reshape(-1, 1).long() * width + columns
        bit = element * bits
        # a code of <= 8 bits lies within two consecutive bytes of the stream
        padded = torch.nn.functional.pad(self.codes, (0, 1)).long()
        word = padded[bit // 8] | (padded[bit // 8 + 1] << 8)
        codes = (word >> (bit % 8)) & ((1 << bits) - 1)
        scales = self.decoded_scales()[element // self.spec.blocksize]
        values = self.qmap.float()[codes] * scales
        return values.view(*rows.shape, width).to(dtype)

    def nbytes(self) -> int:
        """Bytes really saved: codes, scales and (for a fitted map) the map."""
        return sum(tensor.numel() * tensor.element_size() for tensor in self.state_dict().values())

    def extra_repr(self) -> str:
        spec = self.spec
        return (f"shape={tuple(self.shape)}, bits={spec.bits}, blocksize={spec.blocksize}, map={spec.map}, "
                f"scales={spec.scale_format}, layout={spec.block_layout}")
