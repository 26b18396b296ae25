"""Pack codes of 1..8 bits into bytes as a little-endian bit stream.

Code ``i`` occupies bits ``[i * bits, (i + 1) * bits)`` of the stream, byte ``k`` holding stream bits
``[8k, 8k + 8)``; for 4 bits that is "low nibble first". Eight codes always fill exactly ``bits`` bytes, so the
stream is built from groups of 8 codes packed into one 64-bit word.
"""

from __future__ import annotations

import torch

CODES_PER_GROUP = 8  # 8 codes of b bits = b whole bytes
PACKABLE_BITS = tuple(range(1, 9))


def packed_numel(numel: int, bits: int) -> int:
    """Bytes needed for ``numel`` codes of ``bits`` bits."""
    return (numel * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"codes must have 1 to 8 bits, got {bits}")


def pack_bits_ref(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes in [0, 2**bits) -> uint8 bytes [packed_numel(numel, bits)]."""
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    numel = flat.numel()
    pad = -numel % CODES_PER_GROUP
    groups = torch.nn.functional.pad(flat, (0, pad)).view(-1, CODES_PER_GROUP).to(torch.int64)  # [g, 8]
    shifts = torch.arange(CODES_PER_GROUP, device=codes.device, dtype=torch.int64) * bits
    words = (groups << shifts).sum(dim=1)  # [g], 8 * bits used bits each
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    packed = ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)  # [g * bits]
    return packed[: packed_numel(numel, bits)]


def unpack_bits_ref(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of ``pack_bits_ref``: the first ``numel`` codes."""
    _check_bits(bits)
    if bits == 8:
        return packed.reshape(-1)[:numel].clone()
    flat = packed.reshape(-1)
    pad = -flat.numel() % bits
    groups = torch.nn.functional.pad(flat, (0, pad)).view(-1, bits).to(torch.int64)  # [g, bits]
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    words = (groups << byte_shifts).sum(dim=1)  # [g]
    shifts = torch.arange(CODES_PER_GROUP, device=packed.device, dtype=torch.int64) * bits
    codes = (words[:, None] >> shifts) & ((1 << bits) - 1)  # [g, 8]
    return codes.reshape(-1)[:numel].to(torch.uint8)
