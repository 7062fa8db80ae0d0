"""Sampling settings and the flow-matching UniPC schedule (docs/method.md#sampling).

Defaults follow the StoryMem reference (docs/method.md#sampling): 40 steps, shift 4.0,
guidance 3.5 for both experts, expert boundary 0.9 for M2V/MI2V/MM2V. The T2V first shot
(Wan2.2 T2V-A14B) uses shift 12.0 and boundary 0.875 and - as the reference story pipeline
passes its guidance to the T2V shot too - guidance 3.5 for both experts (not the T2V
config's own 4.0/3.0).
`reference_sigmas=True` uses the reference grid linspace(0.999, 0, steps+1)[:-1] before the
shift; False uses diffusers' grid linspace(1, 1/1000, steps+1)[:-1].
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from storymem_model.spec_json import check_choice, check_number, is_int

CFG_MODES = ("batched", "sequential")
SOLVERS = ("unipc", "euler")
NUM_TRAIN_TIMESTEPS = 1000


def uses_cfg(guidance_scale: float) -> bool:
    """Whether a step at this guidance scale runs classifier-free guidance (scale > 1)."""
    return float(guidance_scale) > 1.0


def evaluations_per_step(guidance_scale: float) -> int:
    """Transformer evaluations (times batch) of one step: 2 with CFG, 1 without."""
    return 2 if uses_cfg(guidance_scale) else 1


def with_implied_steps(overrides: dict) -> dict:
    """Sampling overrides (None values dropped) with the step count they imply: a step list
    names its steps, unless num_inference_steps is given too."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("step_list") is not None and "num_inference_steps" not in given:
        given["num_inference_steps"] = len(given["step_list"])
    return given


@dataclass(frozen=True)
class SamplingConfig:
    """How one shot is denoised. `step_list`: explicit timesteps on the 0..1000 grid before
    the shift (the distilled samplers' "denoising step list"); None = an evenly spaced grid
    of `num_inference_steps` (the reference's or diffusers', `reference_sigmas`)."""

    num_inference_steps: int = 40
    guidance_scale: float = 3.5  # high-noise expert (diffusers `transformer`)
    guidance_scale_2: float = 3.5  # low-noise expert (diffusers `transformer_2`)
    shift: float = 4.0
    boundary_ratio: float = 0.9
    reference_sigmas: bool = True
    cfg_mode: str = "batched"
    solver: str = "unipc"
    step_list: tuple | None = None

    def __post_init__(self):
        if self.step_list is not None:
            object.__setattr__(self, "step_list", tuple(self.step_list))

    def updated(self, **overrides) -> "SamplingConfig":
        unknown = sorted(set(overrides) - set(SAMPLING_KEYS))
        if unknown:
            raise TypeError(f"unknown sampling option(s) {unknown}; allowed: {sorted(SAMPLING_KEYS)}")
        config = replace(self, **with_implied_steps(overrides))
        config.check()
        return config

    def check(self) -> None:
        """Raise ValueError naming every value that makes no usable schedule."""
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self) -> list[str]:
        out: list[str] = []
        check_number(out, "num_inference_steps", self.num_inference_steps, minimum=1,
                     integer=True)
        for name in ("guidance_scale", "guidance_scale_2"):
            check_number(out, name, getattr(self, name), minimum=0)
        check_number(out, "shift", self.shift, above=0)
        check_number(out, "boundary_ratio", self.boundary_ratio, minimum=0, maximum=1)
        if not isinstance(self.reference_sigmas, bool):
            out.append(f"reference_sigmas must be true or false, got {self.reference_sigmas!r}")
        check_choice(out, "cfg_mode", self.cfg_mode, CFG_MODES)
        check_choice(out, "solver", self.solver, SOLVERS)
        if self.step_list is not None:
            steps = list(self.step_list)
            if not steps or not all(is_int(t) for t in steps):
                out.append(f"step_list must be a non-empty list of integers, got {steps!r}")
            elif any(not 0 < t <= NUM_TRAIN_TIMESTEPS for t in steps) or any(
                    a <= b for a, b in zip(steps, steps[1:])):
                out.append(f"step_list must be strictly decreasing timesteps in "
                           f"1..{NUM_TRAIN_TIMESTEPS}, got {steps}")
            elif len(steps) != self.num_inference_steps:
                out.append(f"step_list has {len(steps)} steps but num_inference_steps is "
                           f"{self.num_inference_steps}")
        return out

    def as_dict(self) -> dict:
        data = asdict(self)
        data["step_list"] = None if self.step_list is None else list(self.step_list)
        return data


SAMPLING_KEYS = tuple(SamplingConfig.__dataclass_fields__)
M2V_SAMPLING = SamplingConfig()
T2V_SAMPLING = SamplingConfig(guidance_scale=3.5, guidance_scale_2=3.5, shift=12.0, boundary_ratio=0.875)
# Few-step sampling for step-distilled Wan2.2 A14B LoRAs (the Lightning / LightX2V releases,
# docs/method.md#fast-sampling): 4 guidance-free Euler steps at the published timesteps
# 1000, 750, 500, 250 with shift 5.0; the first two run on the high-noise expert.
FAST_SAMPLING = SamplingConfig(num_inference_steps=4, guidance_scale=1.0, guidance_scale_2=1.0,
                               shift=5.0, boundary_ratio=0.9, reference_sigmas=False,
                               solver="euler", step_list=(1000, 750, 500, 250))
PRESET_SAMPLING = {"standard": M2V_SAMPLING, "fast": FAST_SAMPLING}
SAMPLING_PRESETS = tuple(PRESET_SAMPLING)  # the names RenderSettings.sampling_preset takes


def preset_sampling(name: str, default_steps: int) -> SamplingConfig:
    """The M2V sampling of a named preset; "standard" takes the model's default step count
    (40; the tiny preset 4), "fast" its own step list."""
    if name not in SAMPLING_PRESETS:
        raise ValueError(f"sampling preset must be one of {', '.join(SAMPLING_PRESETS)}, "
                         f"got {name!r}")
    preset = PRESET_SAMPLING[name]
    return preset if preset.step_list else preset.updated(num_inference_steps=default_steps)


# Flow-matching UniPC as shipped with the Wan2.2 diffusers checkpoints.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=NUM_TRAIN_TIMESTEPS, solver_order=2, prediction_type="flow_prediction",
    use_flow_sigmas=True, flow_shift=4.0, predict_x0=True, solver_type="bh2", lower_order_final=True,
    final_sigmas_type="zero", timestep_spacing="linspace", disable_corrector=[], thresholding=False,
)


def make_scheduler(config: SamplingConfig, base_config: dict | None = None):
    """A fresh diffusers scheduler for `config`, its timesteps set: flow-matching UniPC
    (the reference) or Euler (the distilled samplers), shifted by `config.shift`."""
    import numpy as np

    if config.step_list is not None:
        sigmas = np.asarray(config.step_list, dtype=np.float64) / NUM_TRAIN_TIMESTEPS
    elif config.reference_sigmas:
        sigmas = np.linspace(0.999, 0.0, config.num_inference_steps + 1)[:-1]
    else:
        sigmas = None
    if config.solver == "euler":
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=float(config.shift))
        if sigmas is None:
            sigmas = np.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, config.num_inference_steps + 1)[:-1]
        scheduler.set_timesteps(sigmas=sigmas.astype(np.float32).tolist())
        return scheduler
    from diffusers import UniPCMultistepScheduler

    settings = dict(base_config or SCHEDULER_CONFIG)
    settings.update(flow_shift=float(config.shift), use_flow_sigmas=True, prediction_type="flow_prediction")
    scheduler = UniPCMultistepScheduler.from_config(settings)
    if sigmas is not None:
        scheduler.set_timesteps(sigmas=sigmas)
    else:
        scheduler.set_timesteps(config.num_inference_steps)
    return scheduler


def expert_for_timestep(timestep, boundary_ratio: float) -> str:
    """'high' for t >= boundary * 1000 (high-noise expert), else 'low'."""
    return "high" if float(timestep) >= boundary_ratio * NUM_TRAIN_TIMESTEPS else "low"
