"""``CBQConfig``: every knob of CBQ, as data (round-trips through dicts, JSON and YAML).

Defaults are sized for a CPU (SmolLM2-135M with 32 x 512 calibration tokens on 2 cores); ``CBQConfig.paper()``
is the GPU preset closer to the paper. Every component can be switched off for the ablation of the paper:
``window=1`` (no cross-block dependency), ``cfp_weights``/``cfp_activations`` (coarse-to-fine pre-processing),
``lora_rounding`` (plain nearest rounding with learnable step sizes instead), ``kl_weight=0`` (MSE only);
``gptq_init`` (on by default) and ``keep_best`` are effllm's additions; ``CBQConfig.paper()`` is the paper's
method (nearest start, learned step sizes, overlapping windows) with a GPU-sized budget.
See docs/cbq.md for the choices made where the paper is silent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..gptq import RANGES

LORA_INITS = ("nearest", "zero")


@dataclass
class CBQConfig:
    # Cross-block dependency: windows of `window` consecutive blocks, consecutive windows sharing `overlap`.
    # One block per window by default: from a GPTQ start, overlapping windows made SmolLM2 and the test models
    # worse (a shared block re-decides what the previous window settled; docs/cbq.md). The paper preset overlaps.
    window: int = 1
    overlap: int = 0
    # Optimisation: `epochs` passes over the calibration samples, in shuffled batches of `batch_size` samples.
    epochs: int = 2  # a CPU budget: 32 x 512 tokens, two passes (SmolLM2 W3: one pass 30.98, two 30.00)
    batch_size: int = 1
    lr_rounding: float = 5e-2  # Adam, LoRA-Rounding factors A and B
    # Adam, log of a multiplicative gain on every step size (a relative learning rate). 0 by default: from a GPTQ
    # start, learned step sizes made SmolLM2 and the test models worse (docs/cbq.md); the paper preset learns them.
    lr_scale: float = 0.0
    # LoRA-Rounding: V = base + A @ B (rank `lora_rank`) per linear; False = nearest rounding (STE).
    lora_rounding: bool = True
    lora_rank: int = 8
    lora_init: str = "nearest"  # "nearest": codes start at round-to-nearest; "zero": V = A @ B, h starts at 0.5
    # Sharpness of the rounding sigmoid's fractional term, ramped geometrically over each window's steps.
    sharpness_start: float = 2.0
    sharpness_end: float = 20.0
    # Rounding regulariser sum(1 - |2h - 1|^beta), beta annealed from beta_start to beta_end after a warm-up.
    round_reg_weight: float = 1e-2
    beta_start: float = 20.0
    beta_end: float = 2.0
    reg_warmup: float = 0.2  # fraction of the steps before the regulariser starts
    # Loss: relative MSE + kl_weight * KL(softmax(target / T) || softmax(output / T)) over the hidden dimension,
    # T = kl_temperature * RMS of the target token.
    kl_weight: float = 1.0
    kl_temperature: float = 1.0
    # Coarse-to-fine pre-processing: outliers beyond Q3 + lambda * IQR, then the fine split search.
    cfp_weights: bool = True
    cfp_activations: bool = True
    cfp_weight_lambda: float = 1.5
    cfp_weight_guard: bool = True  # keep a group's min-max range where truncation raises its rounding error
    cfp_act_lambda: float = 1.5
    cfp_act_alpha: float = 0.5  # outlier channels are divided by (magnitude / threshold) ** alpha
    # Range search after CFP: each group keeps whichever is lower-error, its CFP range or a shrunk min-max range
    # ("mse": plain error; "hessian": each column's error weighted by its input's mean square). "minmax": off.
    # SmolLM2 W3 g64, CFP + GPTQ start without training: 32.77 with CFP's ranges, 26.70 with "hessian".
    ranges: str = "hessian"
    # Starting point of the learned rounding (the paper's is round-to-nearest): with gptq_init, each new block's
    # weights are first moved by GPTQ's error feedback (on CFP's ranges), so rounding to nearest starts at
    # GPTQ's codes and the window's optimisation refines them.
    gptq_init: bool = True
    # Keep the window's starting point (learned shift and step-size gains dropped) if, after training, its loss
    # on the calibration samples with hard rounding is not lower than the starting point's.
    keep_best: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.window < 1 or not 0 <= self.overlap < self.window:
            raise ValueError(f"need window >= 1 and 0 <= overlap < window, got {self.window}, {self.overlap}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0 (0: pre-processing and initial rounding only), got {self.epochs}")
        positive = {"batch_size": self.batch_size, "lora_rank": self.lora_rank,
                    "beta_end": self.beta_end, "kl_temperature": self.kl_temperature,
                    "sharpness_start": self.sharpness_start, "sharpness_end": self.sharpness_end}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        for name in ("lr_rounding", "lr_scale", "round_reg_weight", "kl_weight", "cfp_weight_lambda",
                     "cfp_act_lambda"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.beta_start < self.beta_end:
            raise ValueError(f"beta anneals downwards: need beta_start >= beta_end, got {self.beta_start} < "
                             f"{self.beta_end}")
        if not 0 <= self.reg_warmup < 1:
            raise ValueError(f"reg_warmup is a fraction of the steps in [0, 1), got {self.reg_warmup}")
        if not 0 < self.cfp_act_alpha <= 1:
            raise ValueError(f"cfp_act_alpha must be in (0, 1], got {self.cfp_act_alpha}")
        if self.ranges not in RANGES:
            raise ValueError(f"ranges must be one of {', '.join(RANGES)}, got {self.ranges!r}")
        if self.lora_init not in LORA_INITS:
            raise ValueError(f"lora_init must be one of {LORA_INITS}, got {self.lora_init!r}")

    @classmethod
    def paper(cls, **overrides) -> CBQConfig:
        """The paper's method (round-to-nearest start, learned step sizes, windows of 2 overlapping by 1) sized for
        paper-sized calibration on a GPU (128 x 2048 tokens): more steps per window, so a higher rank and a gentler
        rounding learning rate. Those sizes are our choice, not the paper's published numbers (docs/cbq.md)."""
        preset = {"epochs": 2, "batch_size": 1, "lora_rank": 16, "lr_rounding": 2e-2, "window": 2, "overlap": 1,
                  "gptq_init": False, "lr_scale": 5e-3, "ranges": "minmax"}
        return cls(**{**preset, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CBQConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown CBQ config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**data)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> CBQConfig:
        import yaml

        return cls.from_dict(yaml.safe_load(text) or {})
