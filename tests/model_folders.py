"""Real-layout model folders made from the tiny preset, for tests that need files on disk.

`save_diffusers_folders(pipeline, root)` writes the tiny weights in the layout of the
`Wan2.2-I2V-A14B-Diffusers` / `Wan2.2-T2V-A14B-Diffusers` repositories;
`write_lora_pair(folder, transformer_pair, rank)` writes a StoryMem LoRA pair in the released
key format. Both are what a studio would mount, at tiny sizes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# Original Wan module names -> diffusers names (written from docs/method.md, independently
# of the loader's own table).
ORIGINAL_TO_DIFFUSERS = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}


def save_diffusers_folders(pipeline, root: Path) -> tuple[Path, Path]:
    """(I2V folder, T2V folder) under `root` holding the tiny pipeline's weights."""
    from diffusers import UniPCMultistepScheduler

    from storymem_model.sampling import SCHEDULER_CONFIG

    i2v, t2v = Path(root) / "Wan2.2-I2V-A14B-Diffusers", Path(root) / "Wan2.2-T2V-A14B-Diffusers"
    for name in ("transformer", "transformer_2", "vae", "text_encoder", "tokenizer"):
        getattr(pipeline, name).save_pretrained(i2v / name)
    UniPCMultistepScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(i2v / "scheduler")
    (i2v / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline",
                                                      "boundary_ratio": 0.9}))
    pipeline.t2v_transformer.save_pretrained(t2v / "transformer")
    pipeline.t2v_transformer_2.save_pretrained(t2v / "transformer_2")
    return i2v, t2v


def released_lora_state(transformer, seed: int, rank: int) -> dict[str, torch.Tensor]:
    """A random LoRA for `transformer` in the released StoryMem key format."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(transformer.named_modules())
    state = {}
    for block in range(transformer.config.num_layers):
        for original, diffusers_name in ORIGINAL_TO_DIFFUSERS.items():
            layer = modules[f"blocks.{block}.{diffusers_name}"]
            key = f"base_model.model.blocks.{block}.{original}"
            state[f"{key}.lora_A.weight"] = torch.randn(rank, layer.in_features,
                                                        generator=generator) * 0.1
            state[f"{key}.lora_B.weight"] = torch.randn(layer.out_features, rank,
                                                        generator=generator) * 0.1
    return state


def write_lora_states(folder: Path, states, suffix: str = ".safetensors") -> Path:
    """The (high, low) state dicts as backbone_high_noise / backbone_low_noise files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, state in zip(("backbone_high_noise", "backbone_low_noise"), states):
        path = folder / f"{stem}{suffix}"
        if suffix == ".safetensors":
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        else:
            torch.save(state, path)
    return folder


def write_lora_pair(folder: Path, experts, rank: int, seed: int = 1,
                    suffix: str = ".safetensors") -> Path:
    """A random released-format LoRA pair for the (high, low) experts."""
    states = [released_lora_state(expert, seed + offset, rank)
              for offset, expert in enumerate(experts)]
    return write_lora_states(folder, states, suffix)
