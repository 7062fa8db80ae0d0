"""StoryMem LoRA files in the released format, loaded into the two Wan2.2 experts (docs/method.md#lora-format-and-scale).

A released StoryMem LoRA is a pair of peft state dicts saved from `get_peft_model` on the
original Wan code: `backbone_high_noise.{pth,safetensors}` for the high-noise expert and
`backbone_low_noise.*` for the low-noise one, with keys

    base_model.model.blocks.{i}.{self_attn|cross_attn}.{q|k|v|o}.lora_{A|B}.weight
    base_model.model.blocks.{i}.ffn.{0|2}.lora_{A|B}.weight

(every block, 10 modules, A and B), trained with r = alpha = 128 and rsLoRA, so the
effective scale is alpha / sqrt(r) (11.31 for the release), not diffusers' alpha / r.

Both files are read and checked completely (every module present, no extra key, one rank
equal to the expected one, shapes matching the expert) before either expert is touched; a
refused pair leaves the pipeline exactly as it was. Loading goes through diffusers' peft
integration with `use_rslora=True`; `strength` multiplies the scale; `fuse=True` merges the
update into the base weights (faster, cannot be unloaded).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

ADAPTER_NAME = "storymem"
DISTILL_ADAPTER_NAME = "distill"
PEFT_PREFIX = "base_model.model."
FILE_STEMS = ("backbone_high_noise", "backbone_low_noise")
FILE_SUFFIXES = (".safetensors", ".pth", ".pt")

# original Wan module name -> diffusers WanTransformer3DModel module name
MODULE_NAMES = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
_KEY = re.compile(r"^base_model\.model\.blocks\.(\d+)\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02])"
                  r"\.lora_([AB])\.weight$")


class LoraLoadError(ValueError):
    """A StoryMem LoRA file or pair that is refused; nothing was loaded."""


def resolve_lora_files(lora) -> tuple[Path, Path]:
    """(high-noise file, low-noise file) from a folder or a (high, low) pair of paths."""
    if isinstance(lora, (tuple, list)):
        if len(lora) != 2:
            raise LoraLoadError(f"lora: expected (high_noise_file, low_noise_file), got {len(lora)} item(s)")
        files = tuple(Path(p) for p in lora)
        for label, path in zip(("high-noise", "low-noise"), files):
            if not path.is_file():
                raise LoraLoadError(f"{path}: {label} LoRA file not found")
        if files[0].resolve() == files[1].resolve():
            raise LoraLoadError(f"{files[0]}: the same file was given for both experts")
        return files  # type: ignore[return-value]
    folder = Path(lora)
    if not folder.is_dir():
        raise LoraLoadError(f"{folder}: LoRA folder not found (or pass a (high, low) tuple of files)")
    found = {}
    for stem in FILE_STEMS:
        matches = [folder / f"{stem}{suffix}" for suffix in FILE_SUFFIXES if (folder / f"{stem}{suffix}").is_file()]
        if len(matches) > 1:
            raise LoraLoadError(f"{folder}: both {matches[0].name} and {matches[1].name}; keep one")
        found[stem] = matches[0] if matches else None
    missing = [stem for stem, path in found.items() if path is None]
    if missing:
        present = [p.name for p in found.values() if p is not None]
        raise LoraLoadError(
            f"{folder}: StoryMem LoRA needs both backbone_high_noise.* and backbone_low_noise.*; missing "
            f"{', '.join(missing)} (found {present or 'neither'}); a single expert is never loaded alone")
    return found[FILE_STEMS[0]], found[FILE_STEMS[1]]


def read_lora_file(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a .safetensors or .pth file (tensors only, on CPU)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any read failure is reported with the file name
        raise LoraLoadError(f"{path}: cannot read LoRA file ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or not state:
        raise LoraLoadError(f"{path}: expected a non-empty state dict of tensors, got {type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise LoraLoadError(f"{path}: entries that are not tensors: {bad[:5]}")
    return state


def _linear_shapes(transformer) -> dict[str, tuple[int, int]]:
    """diffusers module name -> (out_features, in_features) of every StoryMem target Linear."""
    modules = dict(transformer.named_modules())
    shapes = {}
    for block in range(transformer.config.num_layers):
        for target in MODULE_NAMES.values():
            name = f"blocks.{block}.{target}"
            layer = modules[name]
            layer = getattr(layer, "base_layer", layer)  # already wrapped by peft
            shapes[name] = (layer.out_features, layer.in_features)
    return shapes


def convert_lora_state_dict(state: dict[str, torch.Tensor], path: Path, transformer,
                            rank: int | None) -> tuple[dict[str, torch.Tensor], int]:
    """Check a released-format state dict against `transformer`; diffusers peft keys and the rank."""
    shapes = _linear_shapes(transformer)
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        match = _KEY.match(key)
        name = None if match is None else f"blocks.{int(match.group(1))}.{MODULE_NAMES[match.group(2)]}"
        if name is None or name not in shapes:
            unknown.append(key)
            continue
        converted[f"{name}.lora_{match.group(3)}.weight"] = tensor
    if unknown:
        hint = ""
        if not any(k.startswith(PEFT_PREFIX) for k in unknown):
            hint = f" (released StoryMem keys start with '{PEFT_PREFIX}blocks.N.')"
        raise LoraLoadError(f"{path}: {len(unknown)} extra or unknown key(s), e.g. {sorted(unknown)[:3]}{hint}")
    expected = {f"{name}.lora_{ab}.weight" for name in shapes for ab in "AB"}
    missing = sorted(expected - set(converted))
    if missing:
        raise LoraLoadError(f"{path}: {len(missing)} missing LoRA weight(s) for this model "
                            f"({transformer.config.num_layers} blocks x 10 modules x A/B), e.g. {missing[:3]}")
    ranks = {tensor.shape[0] for key, tensor in converted.items() if key.endswith("lora_A.weight")}
    if any(t.ndim != 2 for t in converted.values()) or len(ranks) != 1:
        raise LoraLoadError(f"{path}: LoRA matrices must be 2-D with one rank throughout; found ranks {sorted(ranks)}")
    file_rank = ranks.pop()
    if rank is not None and file_rank != rank:
        raise LoraLoadError(f"{path}: LoRA rank {file_rank}, but this model expects rank {rank}")
    for name, (out_features, in_features) in shapes.items():
        a, b = converted[f"{name}.lora_A.weight"], converted[f"{name}.lora_B.weight"]
        if tuple(a.shape) != (file_rank, in_features) or tuple(b.shape) != (out_features, file_rank):
            raise LoraLoadError(
                f"{path}: wrong shapes for {name}: A {tuple(a.shape)}, B {tuple(b.shape)}; expected A "
                f"({file_rank}, {in_features}) and B ({out_features}, {file_rank})")
    bad = [k for k, t in converted.items() if not torch.isfinite(t.float()).all()]
    if bad:
        raise LoraLoadError(f"{path}: NaN or inf in {bad[:3]}")
    return converted, file_rank


def _inject(transformer, converted: dict[str, torch.Tensor], rank: int, alpha: float, strength: float) -> None:
    targets = sorted({key.rsplit(".lora_", 1)[0] for key in converted})
    dtype = next(transformer.parameters()).dtype
    metadata = {"r": rank, "lora_alpha": alpha, "use_rslora": True, "target_modules": targets,
                "lora_dropout": 0.0, "bias": "none"}
    transformer.load_lora_adapter({k: v.to(dtype) for k, v in converted.items()}, prefix=None,
                                  adapter_name=ADAPTER_NAME, metadata=metadata)
    _activate_adapters(transformer, {ADAPTER_NAME: float(strength)})


def has_storymem_lora(transformer) -> bool:
    return ADAPTER_NAME in (getattr(transformer, "peft_config", None) or {})


def load_storymem_lora(pipeline, lora, strength: float = 1.0, fuse: bool = False, rank: int | None = None,
                       alpha: float | None = None) -> str:
    """Load a StoryMem LoRA pair into `pipeline.transformer` / `transformer_2`; returns its lora_id.

    rank: the rank the files must have (None: any, as long as it is one rank throughout).
    alpha: lora_alpha (None: equal to the rank, as in the release); scale = strength * alpha / sqrt(rank).
    """
    if not isinstance(strength, (int, float)) or isinstance(strength, bool):
        raise LoraLoadError(f"lora strength must be a number, got {strength!r}")
    high_path, low_path = resolve_lora_files(lora)
    experts = (pipeline.transformer, pipeline.transformer_2)
    for expert in experts:
        if has_storymem_lora(expert) or getattr(pipeline, "lora_fused", False):
            raise LoraLoadError("this pipeline already holds a StoryMem LoRA; unload it first "
                                "(a fused one cannot be unloaded: load the model again)")
    checked = []
    for path, expert in zip((high_path, low_path), experts):
        converted, file_rank = convert_lora_state_dict(read_lora_file(path), path, expert, rank)
        checked.append((converted, file_rank))
    if checked[0][1] != checked[1][1]:
        raise LoraLoadError(f"{high_path} has rank {checked[0][1]} but {low_path} has rank {checked[1][1]}")
    file_rank = checked[0][1]
    lora_alpha = float(file_rank if alpha is None else alpha)
    done = []
    try:
        for expert, (converted, _) in zip(experts, checked):
            _inject(expert, converted, file_rank, lora_alpha, strength)
            done.append(expert)
    except Exception as error:
        for expert in done + [e for e in experts if e not in done and has_storymem_lora(e)]:
            expert.delete_adapters(ADAPTER_NAME)
            _activate_adapters(expert, {ADAPTER_NAME: None})
        raise LoraLoadError(f"loading {high_path} / {low_path} failed and was rolled back: {error}") from error
    if fuse:
        if any(DISTILL_ADAPTER_NAME in (getattr(e, "peft_config", None) or {}) for e in experts):
            raise LoraLoadError("fuse the StoryMem LoRA before loading a distillation LoRA "
                                "(fusing unloads every adapter)")
        for expert in experts:
            expert.fuse_lora(adapter_names=[ADAPTER_NAME])
            expert.unload_lora()
            _activate_adapters(expert, {ADAPTER_NAME: None})
        pipeline.lora_fused = True
    lora_id = _lora_id(high_path, low_path, strength)
    pipeline.lora_id = lora_id
    return lora_id


# ---------------------------------------------------------------------------------------
# Step-distillation LoRAs (Lightning / LightX2V), stacked on the StoryMem LoRA.

def convert_distill_state_dict(state: dict[str, torch.Tensor], path: Path,
                               transformer) -> dict[str, torch.Tensor]:
    """A published Wan2.2 distillation LoRA as diffusers peft keys for `transformer`.

    Accepted formats: the original Wan names with a `diffusion_model.` prefix
    (`lora_down`/`lora_up` or `lora_A`/`lora_B`, optional `alpha`, `diff_b` biases) as the
    LightX2V and Lightning releases ship them - converted by diffusers' own Wan LoRA
    conversion (which folds `alpha / rank` into the matrices) - or diffusers peft keys
    (`blocks.N.attn1.to_q.lora_A.weight`, optionally prefixed `transformer.`). Every key
    must name a Linear of this expert with matching shapes; anything else refuses the file.
    """
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    try:
        converted = WanLoraLoaderMixin.lora_state_dict(dict(state))
    except Exception as error:  # noqa: BLE001 - diffusers raises ValueError/KeyError
        raise LoraLoadError(f"{path}: not a Wan LoRA diffusers can convert "
                            f"({type(error).__name__}: {error})") from error
    converted = {(k[len("transformer."):] if k.startswith("transformer.") else k): v
                 for k, v in converted.items()}
    modules = dict(transformer.named_modules())
    problems = []
    for key, tensor in converted.items():
        name, _, part = key.partition(".lora_")
        layer = modules.get(name)
        layer = getattr(layer, "base_layer", layer)
        if not isinstance(layer, torch.nn.Linear) or part not in ("A.weight", "B.weight", "B.bias"):
            problems.append(f"{key}: no such Linear in this expert")
            continue
        if part == "A.weight":
            ok = tensor.ndim == 2 and tensor.shape[1] == layer.in_features
        elif part == "B.weight":
            ok = tensor.ndim == 2 and tensor.shape[0] == layer.out_features
        else:
            ok = tensor.ndim == 1 and tensor.shape[0] == layer.out_features
        if not ok:
            problems.append(f"{key}: shape {tuple(tensor.shape)} does not fit "
                            f"{layer.out_features}x{layer.in_features}")
    pairs = {k.rsplit(".lora_", 1)[0] for k in converted if k.endswith(".lora_A.weight")}
    half = sorted(n for n in {k.rsplit(".lora_", 1)[0] for k in converted if "weight" in k}
                  if f"{n}.lora_A.weight" not in converted or f"{n}.lora_B.weight" not in converted)
    problems += [f"{name}: lora_A and lora_B must come together" for name in half]
    if not pairs:
        problems.append("no LoRA matrices")
    if problems:
        raise LoraLoadError(f"{path}: {len(problems)} problem(s), e.g. {problems[:3]}")
    bad = [k for k, t in converted.items() if not torch.isfinite(t.float()).all()]
    if bad:
        raise LoraLoadError(f"{path}: NaN or inf in {bad[:3]}")
    return converted


def load_distill_lora(pipeline, lora, strength: float = 1.0) -> str:
    """Stack a step-distillation LoRA pair on the two M2V experts (high-noise file on
    `transformer`, low-noise on `transformer_2`) with its own `strength`, beside the
    StoryMem LoRA; returns its id. Both files are read and checked before either expert is
    touched; a failure rolls back, nothing is half-loaded."""
    from .model_identity import IdentityError, distill_lora_files, lora_identity

    if not isinstance(strength, (int, float)) or isinstance(strength, bool):
        raise LoraLoadError(f"distillation LoRA strength must be a number, got {strength!r}")
    try:
        high_path, low_path = distill_lora_files(lora)
    except IdentityError as error:
        raise LoraLoadError(str(error)) from None
    experts = (pipeline.transformer, pipeline.transformer_2)
    if any(DISTILL_ADAPTER_NAME in (getattr(e, "peft_config", None) or {}) for e in experts):
        raise LoraLoadError("this pipeline already holds a distillation LoRA")
    checked = [convert_distill_state_dict(read_lora_file(path), path, expert)
               for path, expert in zip((high_path, low_path), experts)]
    done = []
    try:
        for expert, state in zip(experts, checked):
            dtype = next(expert.parameters()).dtype
            expert.load_lora_adapter({k: v.to(dtype) for k, v in state.items()}, prefix=None,
                                     adapter_name=DISTILL_ADAPTER_NAME)
            done.append(expert)
            _activate_adapters(expert, {DISTILL_ADAPTER_NAME: float(strength)})
    except Exception as error:
        for expert in done:
            expert.delete_adapters(DISTILL_ADAPTER_NAME)
            _activate_adapters(expert, {DISTILL_ADAPTER_NAME: None})
        raise LoraLoadError(f"loading {high_path} / {low_path} failed and was rolled back: "
                            f"{error}") from error
    pipeline.distill_lora_id = lora_identity(high_path, low_path, strength, kind="distill-lora")
    return pipeline.distill_lora_id


def _activate_adapters(expert, changes: dict[str, float | None]) -> None:
    """Record adapter strengths (None: removed) and make every loaded adapter active with
    its own strength, so stacked LoRAs add up (StoryMem + distillation)."""
    weights = dict(getattr(expert, "_storymem_adapter_weights", {}))
    for name, weight in changes.items():
        if weight is None:
            weights.pop(name, None)
        else:
            weights[name] = weight
    expert._storymem_adapter_weights = weights
    loaded = getattr(expert, "peft_config", None) or {}
    names = [name for name in weights if name in loaded]
    if names:
        expert.set_adapters(names, weights=[weights[n] for n in names])


def unload_storymem_lora(pipeline) -> None:
    """Remove an unfused StoryMem LoRA from both experts."""
    if getattr(pipeline, "lora_fused", False):
        raise LoraLoadError("the StoryMem LoRA was fused into the weights and cannot be unloaded")
    for expert in (pipeline.transformer, pipeline.transformer_2):
        if has_storymem_lora(expert):
            expert.delete_adapters(ADAPTER_NAME)
            _activate_adapters(expert, {ADAPTER_NAME: None})
    pipeline.lora_id = None


def _lora_id(high: Path, low: Path, strength: float) -> str:
    from .model_identity import lora_identity

    return lora_identity(high, low, strength)
