"""``BCTConfig``: how each component of a transformer is blockwise-compressed.

Three kinds of component, each with its own small spec:

* stored tensors (``embeddings``, ``linear_weights``, ``biases``: biases and LayerNorm affine parameters) are kept
  packed on disk and in memory: ``bits``-bit codes, one scale per block of ``blocksize`` elements, a map;
* activations (``activations``: linear inputs and outputs; ``attention_scores``; ``attention_probs``; ``layernorm``
  outputs; ``residual``: the residual stream entering each LayerNorm) are re-quantized blockwise along the last
  dimension at run time;
* lookup tables (``gelu``, ``softmax``: its exp) read the function off a table over ``bits``-bit input codes of a
  fixed-point grid spanning ``input_range``.

``bits: null`` leaves a component in floating point. Configs round-trip through dicts, YAML and JSON; unknown keys
are errors. Defaults and the reasons for them are in docs/bct.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from effllm.kernels.quant_maps import MAP_KINDS

# "fitted": a per-tensor map fitted to the tensor's block-normalised values (Lloyd-Max), stored with the tensor.
STORED_MAP_KINDS = ("linear", "dynamic", "fitted")
ACTIVATION_MAP_KINDS = tuple(kind for kind in MAP_KINDS if kind != "linear_nozero")
SCALE_FORMATS = ("float32", "float16", "uint8")
# "gptq": a linear's codes chosen column by column with error feedback through the Hessian of its calibration
# inputs (calibrated_rounding.py); scales and map are fixed first, as for "nearest"
ROUNDINGS = ("nearest", "gptq")
# how gptq weighs its calibration tokens: "uniform" minimises the summed squared output error (GPTQ's own
# objective, dominated by the few tokens with massive activations); "relative" weighs each token by
# 1 / ||its output||^2, minimising the summed per-token relative error that the next LayerNorm sees
TOKEN_WEIGHTINGS = ("uniform", "relative")
# how a 2-D tensor is cut into blocks: along its rows (flattened row-major, blocks span the last dimension) or
# down its columns (flattened column-major: a column with outliers, e.g. one hidden dimension of an embedding,
# gets scales of its own instead of stretching the grid of every row it crosses)
BLOCK_LAYOUTS = ("row_major", "column_major")


def _check_bits(where: str, bits: int | None, low: int = 2) -> None:
    if bits is not None and (not isinstance(bits, int) or not low <= bits <= 8):
        raise ValueError(f"{where}.bits must be an integer in {low}..8 (or null for floating point), got {bits!r}")


def _check_blocksize(where: str, blocksize: int) -> None:
    if not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"{where}.blocksize must be a positive integer, got {blocksize!r}")


def _check_choice(where: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{where} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class StoredSpec:
    """A tensor stored packed: codes of ``bits`` bits, a scale per block stored as ``scale_format``."""

    bits: int | None = 8
    blocksize: int = 64
    map: str = "linear"
    scale_format: str = "float16"
    clip_search: bool = False  # choose each block's scale by least squared error instead of its absmax
    rounding: str = "nearest"  # "gptq": calibrated error-feedback rounding of linear weights (needs calib data)
    damp: float = 0.01  # gptq dampening, a fraction of the mean Hessian diagonal added to its diagonal
    token_weighting: str = "relative"  # gptq: see TOKEN_WEIGHTINGS
    block_layout: str = "row_major"
    # a tensor of fewer elements is stored at 8 bits whatever ``bits`` says: its few blocks fit a low-bit grid
    # poorly and its bytes do not matter (MiniLM's token-type embeddings: 768 elements, added to every token)
    min_low_bit_elements: int = 1024

    def validate(self, where: str) -> None:
        _check_bits(where, self.bits)
        _check_blocksize(where, self.blocksize)
        _check_choice(f"{where}.map", self.map, STORED_MAP_KINDS)
        _check_choice(f"{where}.scale_format", self.scale_format, SCALE_FORMATS)
        _check_choice(f"{where}.rounding", self.rounding, ROUNDINGS)
        _check_choice(f"{where}.block_layout", self.block_layout, BLOCK_LAYOUTS)
        _check_choice(f"{where}.token_weighting", self.token_weighting, TOKEN_WEIGHTINGS)
        if not isinstance(self.min_low_bit_elements, int) or self.min_low_bit_elements < 0:
            raise ValueError(f"{where}.min_low_bit_elements must be an integer >= 0, got {self.min_low_bit_elements!r}")
        if not isinstance(self.damp, (int, float)) or self.damp < 0:
            raise ValueError(f"{where}.damp must be a number >= 0, got {self.damp!r}")
        if self.map == "dynamic" and self.bits is not None and self.bits < 2:
            raise ValueError(f"{where}: the dynamic map needs at least 2 bits")


@dataclass(frozen=True)
class ActivationSpec:
    """Run-time blockwise re-quantization along the last dimension (fake-quant: quantize, then decode)."""

    bits: int | None = 8
    blocksize: int = 64
    map: str = "linear"

    def validate(self, where: str) -> None:
        _check_bits(where, self.bits)
        _check_blocksize(where, self.blocksize)
        _check_choice(f"{where}.map", self.map, ACTIVATION_MAP_KINDS)


@dataclass(frozen=True)
class TableSpec:
    """A lookup table over ``2**bits`` input codes of a fixed-point grid on ``input_range``."""

    bits: int | None = 8
    input_range: float = 8.0

    def validate(self, where: str) -> None:
        _check_bits(where, self.bits, low=4)
        if not isinstance(self.input_range, (int, float)) or not self.input_range > 0:
            raise ValueError(f"{where}.input_range must be a positive number, got {self.input_range!r}")


_SPEC_CLASSES = {
    "embeddings": StoredSpec,
    "linear_weights": StoredSpec,
    "biases": StoredSpec,
    "activations": ActivationSpec,
    "attention_scores": ActivationSpec,
    "attention_probs": ActivationSpec,
    "layernorm": ActivationSpec,
    "residual": ActivationSpec,
    "gelu": TableSpec,
    "softmax": TableSpec,
}


@dataclass(frozen=True)
class BCTConfig:
    """Bits, block size and map for every component; see the module docstring."""

    embeddings: StoredSpec = field(default_factory=StoredSpec)
    linear_weights: StoredSpec = field(default_factory=StoredSpec)
    biases: StoredSpec = field(default_factory=StoredSpec)
    activations: ActivationSpec = field(default_factory=ActivationSpec)
    attention_scores: ActivationSpec = field(default_factory=ActivationSpec)
    # probabilities lie in [0, 1]: the signed linear map wastes one bit on them, so they get their own blocks
    attention_probs: ActivationSpec = field(default_factory=ActivationSpec)
    layernorm: ActivationSpec = field(default_factory=ActivationSpec)
    residual: ActivationSpec = field(default_factory=ActivationSpec)
    gelu: TableSpec = field(default_factory=lambda: TableSpec(8, 8.0))
    # exp(x - max) below -input_range is taken as 0: exp(-12) ~ 6e-6, under an 8-bit probability step
    softmax: TableSpec = field(default_factory=lambda: TableSpec(8, 12.0))

    def __post_init__(self):
        for name, cls in _SPEC_CLASSES.items():
            spec = getattr(self, name)
            if not isinstance(spec, cls):
                raise ValueError(f"{name} must be a {cls.__name__}, got {type(spec).__name__}")
            spec.validate(name)
        for name in ("embeddings", "biases"):  # only a linear has the input Hessian that gptq rounding needs
            if getattr(self, name).rounding != "nearest":
                raise ValueError(f"{name}.rounding must be 'nearest' (calibrated rounding applies to "
                                 f"linear_weights only), got {getattr(self, name).rounding!r}")

    # --- data round trip -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: asdict(getattr(self, name)) for name in _SPEC_CLASSES}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BCTConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a BCT config is a mapping of components, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_SPEC_CLASSES))
        if unknown:
            raise ValueError(f"unknown BCT components {unknown}; known: {', '.join(_SPEC_CLASSES)}")
        specs = {}
        for name, value in data.items():
            spec_cls = _SPEC_CLASSES[name]
            if not isinstance(value, dict):
                raise ValueError(f"{name}: expected a mapping of {spec_cls.__name__} fields, got {value!r}")
            known = {f.name for f in fields(spec_cls)}
            bad = sorted(set(value) - known)
            if bad:
                raise ValueError(f"{name}: unknown keys {bad}; known keys: {', '.join(sorted(known))}")
            specs[name] = spec_cls(**value)
        return cls(**specs)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> BCTConfig:
        import yaml

        return cls.from_dict(yaml.safe_load(text) or {})

    @classmethod
    def from_file(cls, path) -> BCTConfig:
        from effllm.recipes import load_config_file

        return cls.from_dict(load_config_file(path))

    # --- convenience -----------------------------------------------------------------------------------------
    @classmethod
    def uniform(cls, weight_bits: int | None = 8, act_bits: int | None = 8, **overrides: Any) -> BCTConfig:
        """Every stored tensor at ``weight_bits``, every activation and table at ``act_bits``.

        At 4 bits or fewer, stored tensors use the fitted map, least-squares block scales and 8-bit scales in
        blocks of 256 (0.03 bits of scale per element): rounding to the nearest linear level in blocks of 64
        loses too much (docs/bct.md). Biases and LayerNorm parameters (0.1% of a model) stay at 8 bits.
        """
        embeddings = None
        if weight_bits is not None and weight_bits <= 4:
            stored = StoredSpec(weight_bits, 256, "fitted", "uint8", clip_search=True)
            # blocks down the columns: an embedding's outlier hidden dimensions get scales of their own
            embeddings = StoredSpec(weight_bits, 256, "fitted", "uint8", clip_search=True,
                                    block_layout="column_major")
        else:
            stored = StoredSpec(weight_bits)
        act = ActivationSpec(act_bits)
        specs = dict(embeddings=embeddings or stored, linear_weights=stored, activations=act, attention_scores=act,
                     attention_probs=act, layernorm=act, residual=act,
                     gelu=TableSpec(act_bits, 8.0), softmax=TableSpec(act_bits, 12.0))
        specs.update(overrides)
        return cls(**specs)
