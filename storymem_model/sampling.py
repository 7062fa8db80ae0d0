"""Sampling settings and the flow-matching UniPC schedule (facts §4).

Defaults follow the StoryMem reference: 40 steps, shift 4.0, guidance 3.5 for both experts,
expert boundary 0.9 for M2V/MI2V/MM2V; T2V (Wan2.2 T2V-A14B) uses shift 12.0 and boundary
0.875 with guidance 4.0 (high-noise expert) / 3.0 (low-noise expert) as Wan2.2's T2V config.
`reference_sigmas=True` uses the reference grid linspace(0.999, 0, steps+1)[:-1] before the
shift; False uses diffusers' grid linspace(1, 1/1000, steps+1)[:-1].
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

CFG_MODES = ("batched", "sequential")
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class SamplingConfig:
    num_inference_steps: int = 40
    guidance_scale: float = 3.5  # high-noise expert (diffusers `transformer`)
    guidance_scale_2: float = 3.5  # low-noise expert (diffusers `transformer_2`)
    shift: float = 4.0
    boundary_ratio: float = 0.9
    reference_sigmas: bool = True
    cfg_mode: str = "batched"

    def updated(self, **overrides) -> "SamplingConfig":
        unknown = sorted(set(overrides) - set(SAMPLING_KEYS))
        if unknown:
            raise TypeError(f"unknown sampling option(s) {unknown}; allowed: {sorted(SAMPLING_KEYS)}")
        config = replace(self, **{k: v for k, v in overrides.items() if v is not None})
        config.check()
        return config

    def check(self) -> None:
        if isinstance(self.num_inference_steps, bool) or not isinstance(self.num_inference_steps, int) \
                or self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {self.num_inference_steps!r}")
        for name in ("guidance_scale", "guidance_scale_2"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not float(self.shift) > 0:
            raise ValueError(f"shift must be > 0, got {self.shift!r}")
        if not 0.0 <= float(self.boundary_ratio) <= 1.0:
            raise ValueError(f"boundary_ratio must be in [0, 1], got {self.boundary_ratio!r}")
        if self.cfg_mode not in CFG_MODES:
            raise ValueError(f"cfg_mode must be one of {CFG_MODES}, got {self.cfg_mode!r}")

    def as_dict(self) -> dict:
        return asdict(self)


SAMPLING_KEYS = tuple(SamplingConfig.__dataclass_fields__)
M2V_SAMPLING = SamplingConfig()
T2V_SAMPLING = SamplingConfig(guidance_scale=4.0, guidance_scale_2=3.0, shift=12.0, boundary_ratio=0.875)

# Flow-matching UniPC as shipped with the Wan2.2 diffusers checkpoints.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=NUM_TRAIN_TIMESTEPS, solver_order=2, prediction_type="flow_prediction",
    use_flow_sigmas=True, flow_shift=4.0, predict_x0=True, solver_type="bh2", lower_order_final=True,
    final_sigmas_type="zero", timestep_spacing="linspace", disable_corrector=[], thresholding=False,
)


def make_scheduler(config: SamplingConfig, base_config: dict | None = None):
    """A fresh diffusers UniPCMultistepScheduler with `config.shift`, timesteps set."""
    import numpy as np
    from diffusers import UniPCMultistepScheduler

    settings = dict(base_config or SCHEDULER_CONFIG)
    settings.update(flow_shift=float(config.shift), use_flow_sigmas=True, prediction_type="flow_prediction")
    scheduler = UniPCMultistepScheduler.from_config(settings)
    if config.reference_sigmas:
        sigmas = np.linspace(0.999, 0.0, config.num_inference_steps + 1)[:-1]
        scheduler.set_timesteps(sigmas=sigmas)
    else:
        scheduler.set_timesteps(config.num_inference_steps)
    return scheduler


def expert_for_timestep(timestep, boundary_ratio: float) -> str:
    """'high' for t >= boundary * 1000 (high-noise expert), else 'low'."""
    return "high" if float(timestep) >= boundary_ratio * NUM_TRAIN_TIMESTEPS else "low"
