"""The subspaces of FRUGAL: which low-dimensional part of a weight's gradient gets a state-full update.

A projected weight is viewed as a matrix (``shape[0]`` rows, everything else flattened into columns) and
always projected on its *shorter* side ``d`` (GaLore's choice: the state is then ``rank x long`` with
``rank = density * d``, i.e. ``density * numel`` elements). ``short_side_first`` turns a gradient so that
this side comes first: ``a`` is ``(d, long)``.

Kinds:

* ``"svd"``: the top-``rank`` left singular vectors of ``a`` (GaLore). Stored as a basis ``(rank, d)``
  with orthonormal rows; coordinates are ``basis @ a``.
* ``"random"``: a random semi-orthogonal basis ``(rank, d)`` (QR of a Gaussian matrix).
* ``"columns"``: ``rank`` random rows of ``a`` (columns or rows of the weight, whichever side is
  shorter), stored as sorted int64 indices.
* ``"blocks"``: BAdam-style: whole weights are state-full, a rotating window of them holding about
  ``density`` of the projected elements (``rotating_blocks``).

Everything here is a pure function of its inputs: the optimizer keeps only the resulting tensors, and
random choices come from generators seeded by (seed, parameter, refresh), so they replay identically.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

PROJECTIONS = ("svd", "random", "columns", "blocks")
# A 63-bit mask: torch.Generator seeds must be non-negative.
_SEED_MASK = (1 << 63) - 1


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as ``(shape[0], rest)`` (a view for contiguous tensors)."""
    return tensor.reshape(tensor.shape[0], -1)


def short_side_first(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` or its transpose, whichever has no more rows than columns: ``(d, long)``."""
    return matrix if matrix.shape[0] <= matrix.shape[1] else matrix.T


def from_short_side_first(oriented: torch.Tensor, matrix_shape: torch.Size) -> torch.Tensor:
    """Inverse of ``short_side_first`` for a tensor shaped like its result."""
    return oriented if matrix_shape[0] <= matrix_shape[1] else oriented.T


def subspace_rank(matrix_shape: torch.Size, density: float) -> int:
    """Rows of the state-full subspace: ``density`` of the shorter side, rounded, within ``[0, d]``."""
    short = min(matrix_shape)
    return max(0, min(short, round(density * short)))


def seeded_generator(seed: int, param_index: int, refresh_index: int) -> torch.Generator:
    """A CPU generator that depends only on its arguments (Python hashes of int tuples are stable)."""
    generator = torch.Generator()
    generator.manual_seed(hash((seed, param_index, refresh_index)) & _SEED_MASK)
    return generator


def matrix_shape(shape: torch.Size) -> tuple[int, int]:
    """The ``(rows, columns)`` of ``as_matrix`` for a tensor of ``shape`` (a DTensor's global shape too)."""
    rows = shape[0]
    return rows, (math.prod(shape) // rows if rows else math.prod(shape[1:]))


def rounding_tolerance(a: torch.Tensor, shape: tuple[int, ...] | None = None) -> float:
    """Relative size below which a part of ``a`` is indistinguishable from float32 rounding: numpy's
    ``matrix_rank`` tolerance, ``max(shape) * eps`` (``shape``: the whole matrix's, when ``a`` is a shard)."""
    return max(shape or a.shape) * torch.finfo(torch.float32).eps


def svd_basis(a: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` left singular vectors of ``a`` (d, long) as rows: ``(rank, d)``, in its own storage
    (a slice would keep the whole SVD factor alive).

    Rows whose singular value is at rounding level are zero: when ``a`` has fewer than ``rank`` independent
    directions, the remaining singular vectors are arbitrary (they differ between a DDP all-reduced gradient
    and the same gradient summed in one process), and Adam would turn their noise coordinates into full steps.
    """
    left, singular_values, _ = torch.linalg.svd(a.float(), full_matrices=False)
    basis = left[:, :rank].T.clone(memory_format=torch.contiguous_format)
    significant = singular_values[:rank] > singular_values[0] * rounding_tolerance(a)
    return basis.mul_(significant[:, None])  # a mask, not a Python branch: no device synchronisation


def residual(a: torch.Tensor, basis: torch.Tensor, coordinates: torch.Tensor,
             sum_over_shards: Callable[[torch.Tensor], torch.Tensor] | None = None,
             full_shape: tuple[int, int] | None = None) -> torch.Tensor:
    """``a - basis^T @ coordinates``: the part of ``a`` outside the subspace; exactly zero when it is at
    rounding level (``a`` lies in the subspace), since its signs would be noise that signSGD makes full steps.

    When ``a`` is one shard of a matrix of ``full_shape``, ``sum_over_shards`` (an all-reduce) makes the
    norms those of the whole matrix, so every rank decides alike and as one process would.
    """
    rest = a - basis.T @ coordinates
    if sum_over_shards is None:
        significant = torch.linalg.vector_norm(rest) > torch.linalg.vector_norm(a) * rounding_tolerance(a)
    else:
        squares = sum_over_shards(torch.stack([rest.square().sum(), a.square().sum()]))
        significant = squares[0].sqrt() > squares[1].sqrt() * rounding_tolerance(a, full_shape)
    return rest.mul_(significant)  # a mask, not a Python branch: no device synchronisation


def random_basis(d: int, rank: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """A random ``(rank, d)`` matrix with orthonormal rows."""
    gaussian = torch.randn(d, rank, generator=generator)
    orthonormal, _ = torch.linalg.qr(gaussian)  # (d, rank)
    return orthonormal.T.clone(memory_format=torch.contiguous_format).to(device)


def random_indices(d: int, rank: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``rank`` distinct indices in ``[0, d)``, sorted, as int64."""
    chosen, _ = torch.randperm(d, generator=generator)[:rank].sort()  # sort() gives a fresh tensor
    return chosen.to(device)


def rotating_blocks(sizes: list[int], density: float, refresh_index: int) -> list[int]:
    """Positions of the weights that are state-full during refresh period ``refresh_index``.

    Windows of consecutive weights (cyclically) follow each other; each takes weights while their total
    stays within ``density`` of all elements, and at least one weight whenever ``density > 0``.
    """
    count = len(sizes)
    if count == 0 or density <= 0:
        return []
    if density >= 1:
        return list(range(count))
    budget = density * sum(sizes)
    start = 0
    window: list[int] = []
    for _ in range(refresh_index + 1):
        window, total, position = [], 0, start
        while len(window) < count:
            size = sizes[position % count]
            if window and total + size > budget:
                break
            window.append(position % count)
            total += size
            position += 1
        start = position % count
    return window
