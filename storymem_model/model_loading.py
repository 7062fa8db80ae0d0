"""`load_pipeline`: the tiny preset, diffusers-format Wan2.2 folders, original Wan2.2 checkpoints.

Accepted layouts:

* `"tiny"`: the real classes at tiny sizes with seeded random weights (`tiny_models.py`).
* diffusers layout, as in the `Wan-AI/Wan2.2-I2V-A14B-Diffusers` and `-T2V-A14B-Diffusers`
  repositories: `model_index.json`, `transformer/` (high-noise expert), `transformer_2/`
  (low-noise expert), `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`.
* original layout, as in `Wan-AI/Wan2.2-I2V-A14B`: `high_noise_model/` and `low_noise_model/`,
  each a `config.json` plus safetensors shards. Only the experts are read from it; the VAE,
  text encoder and tokenizer come from a diffusers-layout folder given as `components=`.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .model_identity import IdentityError, ModelIdentity, model_identity
from .presets import REAL_LORA_RANK, REAL_SHOT, REAL_TEXT_LENGTH, TINY
from .specs import ModelSpec

logger = logging.getLogger(__name__)

DIFFUSERS_EXPERTS = ("transformer", "transformer_2")
ORIGINAL_EXPERTS = ("high_noise_model", "low_noise_model")
EXPERTS = ("high", "low")  # the order of the two tuples above
M2V_ROLE = "I2V-A14B (M2V)"


class ModelLoadError(ValueError):
    """A model folder or file that cannot be loaded; the message names the path and the problem."""


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU, bf16 on accelerators."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype must be a torch.dtype or one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


def cast_keeping_fp32_modules(model: torch.nn.Module | None, dtype: torch.dtype) -> None:
    """Cast floating weights to `dtype`, except the submodules the model keeps in fp32."""
    if model is None:
        return
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point():
                continue
            target = torch.float32 if keep.intersection(name.split(".")) else dtype
            if tensor.dtype != target:
                tensor.data = tensor.data.to(target)


def detect_layout(folder: Path) -> str:
    """'diffusers' or 'original'; ModelLoadError naming what is missing otherwise."""
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: not a folder (expected a Wan2.2 model folder or 'tiny')")
    if all((folder / name).is_dir() for name in DIFFUSERS_EXPERTS):
        return "diffusers"
    if all((folder / name).is_dir() for name in ORIGINAL_EXPERTS):
        return "original"
    present = sorted(p.name for p in folder.iterdir())[:20]
    raise ModelLoadError(
        f"{folder}: not a Wan2.2 A14B layout: expected {'/ and '.join(DIFFUSERS_EXPERTS)}/ (diffusers) or "
        f"{'/ and '.join(ORIGINAL_EXPERTS)}/ (original checkpoints); found {present}")


def load_pipeline(preset_or_path: str | os.PathLike, lora=None, device=None, dtype=None, *, t2v=None,
                  components=None, lora_strength: float = 1.0, fuse_lora: bool = False,
                  lora_rank: int | None = None, lora_alpha: float | None = None, offload: str | None = None,
                  vae_dtype=torch.float32, text_length: int | None = None, distill_lora=None,
                  distill_lora_strength: float = 1.0, storage_dtype: str | None = None,
                  attention_backend: str = "native", compile: bool = False):
    """Build a `StoryMemPipeline`.

    preset_or_path: "tiny" or a Wan2.2 I2V-A14B folder (diffusers or original layout).
    lora: a folder with backbone_high_noise.{pth,safetensors} and backbone_low_noise.*, or a
        (high, low) tuple of files; loaded with rsLoRA scale alpha/sqrt(r) times `lora_strength`.
    device / dtype: default cuda + bf16 when a GPU is visible, else cpu + fp32.
    t2v: a Wan2.2 T2V-A14B folder for text-only first shots (tiny builds its own T2V experts).
    components: the diffusers-layout folder that supplies the VAE, text encoder and tokenizer;
        required for an original-layout folder, optional otherwise (default: the model folder).
    offload: None, "model" (whole components move to the GPU when used), "sequential"
        (layer by layer, slowest, least memory) or "group" (block groups with CUDA streams);
        needs an accelerator.
    text_length: UMT5 sequence length (default: 512 for real models, TINY.text_length for tiny).
    distill_lora: a step-distillation LoRA pair (folder or (high, low) files) stacked on the
        StoryMem LoRA with `distill_lora_strength` (see `lora_loading.load_distill_lora`).
    storage_dtype / attention_backend / compile: see `acceleration.py`.
    """
    from .acceleration import apply_acceleration, group_offload
    from .lora_loading import load_distill_lora, load_storymem_lora
    from .shot_pipeline import StoryMemPipeline

    device = torch.device(device) if device is not None else default_device()
    dtype = _resolve_dtype(dtype) or default_dtype(device)
    vae_dtype = _resolve_dtype(vae_dtype) or torch.float32
    if offload not in (None, "model", "sequential", "group"):
        raise ValueError(f"offload must be None, 'model', 'sequential' or 'group', got {offload!r}")
    if offload is not None and device.type == "cpu":
        raise ValueError("offload moves weights between CPU and an accelerator; it needs device='cuda'")
    from .acceleration import check_attention_backend

    check_attention_backend(attention_backend, device)  # before minutes of loading

    if str(preset_or_path) == "tiny":
        from .tiny_models import build_tiny_components

        if t2v not in (None, "tiny"):
            raise ValueError("the tiny preset builds its own T2V experts; t2v must be None")
        parts = build_tiny_components(TINY)
        shot, default_length, scheduler_config = TINY.shot, TINY.text_length, None
        identity = model_identity(ModelSpec(preset="tiny"))
        expected_rank = lora_rank or TINY.lora_rank
    else:
        parts, scheduler_config = _load_folder_components(Path(preset_or_path), components, t2v, dtype)
        shot, default_length = REAL_SHOT, REAL_TEXT_LENGTH
        identity = _folder_identity(preset_or_path, components, t2v)
        expected_rank = lora_rank or REAL_LORA_RANK
    model_id, t2v_model_id = identity.model_id, identity.t2v_model_id

    pipeline = StoryMemPipeline(**parts)
    lora_id = distill_lora_id = None
    if lora is not None:
        lora_id = load_storymem_lora(pipeline, lora, strength=lora_strength, fuse=fuse_lora,
                                     rank=expected_rank, alpha=lora_alpha)
    if distill_lora is not None:
        distill_lora_id = load_distill_lora(pipeline, distill_lora, strength=distill_lora_strength)
    for name in ("text_encoder", "transformer", "transformer_2", "t2v_transformer", "t2v_transformer_2"):
        cast_keeping_fp32_modules(getattr(pipeline, name), dtype)
    cast_keeping_fp32_modules(pipeline.vae, vae_dtype)
    apply_acceleration(pipeline, device=device, compute_dtype=dtype, storage_dtype=storage_dtype,
                       attention_backend=attention_backend, compile=compile)
    if offload == "model":
        pipeline.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipeline.enable_sequential_cpu_offload(device=device)
    elif offload == "group":
        group_offload(pipeline, device)
    else:
        pipeline.to(device)
    pipeline.configure(shot=shot, text_length=text_length or default_length, model_id=model_id, lora_id=lora_id,
                       t2v_model_id=t2v_model_id, scheduler_config=scheduler_config,
                       offload_device=device if offload else None, compute_dtype=dtype)
    pipeline.distill_lora_id = distill_lora_id
    pipeline.storage_dtype = storage_dtype
    pipeline.attention_backend = attention_backend
    pipeline.compiled = bool(compile)
    return pipeline


def build_pipeline(spec: ModelSpec):
    """The pipeline a (resolved) ModelSpec names: the one way every host loads the model."""
    return load_pipeline(spec.preset or spec.model_dir, lora=spec.lora_dir, device=spec.device,
                         dtype=spec.dtype, t2v=spec.t2v_model_dir, components=spec.components_dir,
                         lora_strength=spec.lora_strength, offload=spec.offload,
                         distill_lora=spec.distill_lora_dir,
                         distill_lora_strength=spec.distill_lora_strength,
                         storage_dtype=spec.storage_dtype,
                         attention_backend=spec.attention_backend, compile=spec.compile)


def _folder_identity(folder, components, t2v) -> ModelIdentity:
    try:
        return model_identity(ModelSpec(model_dir=str(folder), components_dir=None if components is None
                                        else str(components), t2v_model_dir=None if t2v is None else str(t2v)))
    except IdentityError as error:
        raise ModelLoadError(str(error)) from error


def _load_folder_components(folder: Path, components, t2v, dtype) -> tuple[dict, dict | None]:
    """Components of a StoryMemPipeline from real model folders (see the module docstring)."""
    base = components_folder(folder, components)
    high, low = load_expert_pair(folder, dtype, in_channels=36, role=M2V_ROLE)
    parts = {
        **load_shared_components(base, dtype),
        "transformer": high,
        "transformer_2": low,
        "t2v_transformer": None,
        "t2v_transformer_2": None,
    }
    if t2v is not None:
        parts["t2v_transformer"], parts["t2v_transformer_2"] = load_expert_pair(
            Path(t2v), dtype, in_channels=16, role="T2V-A14B")
    scheduler_config = None
    scheduler_file = base / "scheduler" / "scheduler_config.json"
    if scheduler_file.is_file():
        scheduler_config = _read_json(scheduler_file)
    return parts, scheduler_config


def components_folder(folder: Path, components) -> Path:
    """The diffusers-layout folder that supplies the VAE, text encoder and tokenizer of the
    model in `folder`: `components`, else `folder` itself when it has the diffusers layout."""
    folder = Path(folder)
    layout = detect_layout(folder)
    if components is None and layout == "diffusers":
        base = folder
    else:
        if components is None:
            raise ModelLoadError(
                f"{folder}: original Wan2.2 layout holds the experts only; pass components= a diffusers-layout "
                "folder (e.g. Wan2.2-I2V-A14B-Diffusers) for the VAE, text encoder and tokenizer")
        base = Path(components)
        if not base.is_dir():
            raise ModelLoadError(f"{base}: components folder not found")
    for sub in ("vae", "text_encoder", "tokenizer"):
        if not (base / sub).is_dir():
            raise ModelLoadError(f"{base}: missing {sub}/ (expected the Wan2.2 diffusers layout)")
    return base


def load_shared_components(base: Path, dtype: torch.dtype) -> dict:
    """tokenizer, text_encoder (UMT5 in `dtype`) and vae (fp32) of a `components_folder`."""
    return {
        "tokenizer": _load(base / "tokenizer", "tokenizer", _auto_tokenizer),
        "text_encoder": _load(base / "text_encoder", "UMT5 text encoder",
                              lambda p: _umt5().from_pretrained(p, dtype=dtype)),
        "vae": _load(base / "vae", "Wan VAE", lambda p: _diffusers().AutoencoderKLWan.from_pretrained(
            p, torch_dtype=torch.float32)),
    }


def _diffusers():
    import diffusers

    return diffusers


def _umt5():
    from transformers import UMT5EncoderModel

    return UMT5EncoderModel


def _auto_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _load(path: Path, what: str, loader):
    try:
        return loader(path)
    except ModelLoadError:
        raise
    except Exception as error:  # noqa: BLE001 - re-raised with the path and what was being loaded
        raise ModelLoadError(f"{path}: cannot load the {what}: {type(error).__name__}: {error}") from error


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except Exception as error:  # noqa: BLE001
        raise ModelLoadError(f"{path}: unreadable JSON ({error})") from error


def load_expert(folder: Path, which: str, dtype: torch.dtype, in_channels: int, role: str):
    """The `which` ("high" or "low") noise expert of a diffusers or original-layout Wan2.2
    folder, checked to take `in_channels` (`role` names the model kind in messages)."""
    if which not in EXPERTS:
        raise ValueError(f"expert must be 'high' or 'low', got {which!r}")
    folder = Path(folder)
    layout = detect_layout(folder)
    name = (DIFFUSERS_EXPERTS if layout == "diffusers" else ORIGINAL_EXPERTS)[EXPERTS.index(which)]
    if layout == "diffusers":
        expert = _load(folder / name, f"{role} {name}", lambda p: _diffusers().WanTransformer3DModel.from_pretrained(
            p, torch_dtype=dtype))
    else:
        expert = load_original_expert(folder / name, dtype)
    if expert.config.in_channels != in_channels:
        raise ModelLoadError(
            f"{folder / name}: this expert takes {expert.config.in_channels} input channels, a Wan2.2 {role} "
            f"expert takes {in_channels} (I2V/M2V: 36, T2V: 16); check which folder goes where")
    return expert


def load_expert_pair(folder: Path, dtype: torch.dtype, in_channels: int, role: str):
    """(high-noise, low-noise) experts from a diffusers or original-layout Wan2.2 folder."""
    return tuple(load_expert(folder, which, dtype, in_channels, role) for which in EXPERTS)


ORIGINAL_CONFIG_KEYS = {  # original Wan config.json -> diffusers WanTransformer3DModel config
    "num_heads": "num_attention_heads", "in_dim": "in_channels", "out_dim": "out_channels",
    "text_dim": "text_dim", "freq_dim": "freq_dim", "ffn_dim": "ffn_dim", "num_layers": "num_layers",
    "eps": "eps", "cross_attn_norm": "cross_attn_norm",
}


def original_expert_config(config: dict, path: Path) -> dict:
    required = ("dim", "num_heads", "num_layers", "ffn_dim", "in_dim")
    missing = [key for key in required if key not in config]
    if missing:
        raise ModelLoadError(f"{path}: original Wan config lacks {missing}")
    if config.get("model_type") not in (None, "i2v", "t2v"):
        raise ModelLoadError(f"{path}: model_type {config['model_type']!r} is not a Wan2.2 A14B i2v/t2v expert")
    converted = {target: config[key] for key, target in ORIGINAL_CONFIG_KEYS.items() if key in config}
    converted["attention_head_dim"] = config["dim"] // config["num_heads"]
    converted.setdefault("out_channels", 16)
    converted.setdefault("text_dim", 4096)
    converted["patch_size"] = tuple(config.get("patch_size", (1, 2, 2)))
    converted.update(qk_norm="rms_norm_across_heads", image_dim=None, added_kv_proj_dim=None)
    return converted


def _original_shards(folder: Path) -> list[Path]:
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        weight_map = _read_json(index[0]).get("weight_map", {})
        shards = sorted({folder / name for name in weight_map.values()})
        absent = [p.name for p in shards if not p.is_file()]
        if absent:
            raise ModelLoadError(f"{index[0]}: lists shard(s) that are not in {folder}: {absent}")
        return shards
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise ModelLoadError(f"{folder}: no .safetensors shards")
    return shards


def load_original_expert(folder: Path, dtype: torch.dtype):
    """One expert from an original Wan2.2 folder (`config.json` + safetensors shards)."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from safetensors.torch import load_file

    from .rope import install_frame_position_rope

    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: expert folder not found")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{folder}: missing config.json")
    config = original_expert_config(_read_json(config_path), config_path)
    checkpoint: dict[str, torch.Tensor] = {}
    for shard in _original_shards(folder):
        try:
            checkpoint.update(load_file(str(shard), device="cpu"))
        except Exception as error:  # noqa: BLE001
            raise ModelLoadError(f"{shard}: cannot read safetensors shard ({error})") from error
    state = convert_wan_transformer_to_diffusers(checkpoint)
    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    install_frame_position_rope(model)  # the stock rope's tables would be left on the meta device
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(f"{folder}: checkpoint does not match its config.json: {len(missing)} missing "
                             f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    wrong = [f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in state.items()
             if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise ModelLoadError(f"{folder}: {len(wrong)} tensor(s) with wrong shapes, e.g. {wrong[:3]}")
    model.load_state_dict(state, strict=True, assign=True)
    cast_keeping_fp32_modules(model, dtype)
    return model.eval()
