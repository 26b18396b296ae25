"""``PTQConfig``: one post-training quantization run as data (round-trips through YAML/JSON)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from effllm.quant.weight_quant import ACT_BITS, WeightQuantSpec

METHODS = ("rtn", "gptq", "cbq")


@dataclass
class PTQConfig:
    method: str = "rtn"
    bits: int = 4
    group_size: int | None = 64  # None: per output channel
    symmetric: bool = False
    act_bits: int | None = None  # per-token dynamic activation quantization when set
    calib: str | None = None  # text file, corpus folder, or a datasets name (wikitext2, c4)
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8
    device: str | None = None  # calibration device; default: where the model is
    method_options: dict = field(default_factory=dict)  # fields of GPTQ / CBQConfig

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        WeightQuantSpec(self.bits, self.group_size, self.symmetric)  # validates bits and group size
        if self.act_bits is not None and self.act_bits not in ACT_BITS:
            raise ValueError(f"activation bits must be in {ACT_BITS.start}..{ACT_BITS.stop - 1}, got {self.act_bits}")
        if self.nsamples < 1 or self.seqlen < 2:
            raise ValueError(f"need nsamples >= 1 and seqlen >= 2, got {self.nsamples} and {self.seqlen}")
        if self.method != "rtn" and not self.calib:
            raise ValueError(f"method {self.method} needs calibration text: set calib (--calib FILE|FOLDER|wikitext2)")

    @property
    def spec(self) -> WeightQuantSpec:
        return WeightQuantSpec(self.bits, self.group_size, self.symmetric)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PTQConfig:
        return _construct(cls, data, "PTQ config keys")


def make_algorithm(config: PTQConfig):
    """The runner plug-in for ``config.method`` with its ``method_options``."""
    options = dict(config.method_options)
    if config.method == "rtn":
        from .rtn import RTN

        if options:
            raise ValueError(f"rtn takes no method options, got {sorted(options)}")
        return RTN()
    if config.method == "gptq":
        from .gptq import GPTQ

        return _construct(GPTQ, options, "gptq options")
    from .cbq import CBQ, CBQConfig

    return CBQ(_construct(CBQConfig, options, "cbq options"))


def _construct(cls, options: dict, what: str):
    """``cls(**options)`` for a dataclass, with unknown keys named in one error line."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {', '.join(sorted(known))}")
    return cls(**options)
