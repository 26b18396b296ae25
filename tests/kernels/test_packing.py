"""Packing codes of 1..8 bits into bytes as a little-endian bit stream, and back."""

from __future__ import annotations

import pytest
import torch
from effllm.kernels.packing import PACKABLE_BITS, pack_bits_ref, packed_numel, unpack_bits_ref

SIZES = [0, 1, 2, 3, 7, 255, 4097]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _codes(numel: int, bits: int, device: str, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, (numel,), generator=generator, dtype=torch.uint8).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("bits", PACKABLE_BITS)
def test_round_trip(bits, numel, device):
    codes = _codes(numel, bits, device)
    packed = pack_bits_ref(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (packed_numel(numel, bits),)
    assert packed.device == codes.device
    assert torch.equal(unpack_bits_ref(packed, bits, numel), codes)


@pytest.mark.parametrize("bits", PACKABLE_BITS)
def test_layout_is_a_little_endian_bit_stream(bits):
    """Code i occupies stream bits [i * bits, (i + 1) * bits); byte k holds stream bits [8k, 8k + 8).

    The oracle builds the stream as one Python integer."""
    codes = _codes(3 * 8 + 5, bits, "cpu", seed=bits)
    stream = sum(code << (index * bits) for index, code in enumerate(codes.tolist()))
    expected = [(stream >> (8 * k)) & 0xFF for k in range(packed_numel(codes.numel(), bits))]
    assert pack_bits_ref(codes, bits).tolist() == expected


def test_four_bit_example():
    # The layout the 4-bit optimizer states use: element 2j in the low nibble of byte j, 2j+1 in the high one.
    packed = pack_bits_ref(torch.tensor([0x1, 0x2, 0xF, 0x0, 0x7], dtype=torch.uint8), 4)
    assert packed.tolist() == [0x21, 0x0F, 0x07]  # the spare nibble of an odd count is 0


def test_shapes_are_flattened_and_eight_bits_copies():
    codes = _codes(12, 4, "cpu").view(3, 4)
    assert torch.equal(unpack_bits_ref(pack_bits_ref(codes, 4), 4, 12), codes.reshape(-1))
    eight = _codes(5, 8, "cpu")
    packed = pack_bits_ref(eight, 8)
    packed[0] ^= 0xFF
    assert not torch.equal(packed, eight), "8-bit packing must return a copy, not a view of the codes"


@pytest.mark.parametrize("bits", [0, 9, 16])
def test_unpackable_widths_raise(bits):
    with pytest.raises(ValueError, match="bits"):
        pack_bits_ref(torch.zeros(4, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="bits"):
        unpack_bits_ref(torch.zeros(4, dtype=torch.uint8), bits, 4)


@pytest.mark.parametrize("bits,numel,expected", [(4, 0, 0), (4, 1, 1), (4, 4097, 2049), (2, 5, 2), (1, 17, 3),
                                                 (8, 7, 7), (3, 3, 2), (3, 8, 3), (7, 9, 8)])
def test_packed_numel(bits, numel, expected):
    assert packed_numel(numel, bits) == expected
