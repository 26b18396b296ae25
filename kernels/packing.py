"""Pack codes of fewer than 8 bits into bytes, little end first (code i sits at bits (i % k) * bits)."""

from __future__ import annotations

import torch

PACKABLE_BITS = (1, 2, 4, 8)


def packed_numel(numel: int, bits: int) -> int:
    per_byte = 8 // bits
    return (numel + per_byte - 1) // per_byte


def pack_bits_ref(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes in [0, 2**bits) -> uint8 bytes holding ``8 // bits`` codes each."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"can pack 1, 2, 4 or 8-bit codes into bytes, got {bits} bits")
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    per_byte = 8 // bits
    pad = packed_numel(flat.numel(), bits) * per_byte - flat.numel()
    grouped = torch.nn.functional.pad(flat, (0, pad)).view(-1, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (grouped << shifts).sum(dim=1).to(torch.uint8)


def unpack_bits_ref(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of ``pack_bits_ref``: the first ``numel`` codes."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"can unpack 1, 2, 4 or 8-bit codes, got {bits} bits")
    if bits == 8:
        return packed.reshape(-1)[:numel].clone()
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.reshape(-1, 1).to(torch.int32) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)
