"""rsLoRA on one Wan2.2 expert for training, and its state in the released key format.

Targets: the ten linears of every block that the released StoryMem LoRAs adapt
(`lora_loading.MODULE_NAMES`: self- and cross-attention q/k/v/o, both FFN linears), with
`use_rslora=True` (scale alpha / sqrt(r)), injected by diffusers' peft integration under the
adapter name the loader uses. A is initialised by peft (Kaiming-uniform) from `seed`, B is
zero, so the untrained adapter changes nothing.

Saved files use the released keys, `base_model.model.blocks.{i}.{self_attn|cross_attn}.
{q|k|v|o}.lora_{A|B}.weight` and `...ffn.{0|2}...`, so `load_pipeline(lora=...)` and
`--lora-dir` load them unchanged. The loader assumes alpha = r (as the release); a LoRA
trained with another alpha is saved with B multiplied by alpha / r, which gives exactly the
same update under the loader's scale.
"""
from __future__ import annotations

import re

import torch

from storymem_model.lora_loading import ADAPTER_NAME, FILE_STEMS, MODULE_NAMES, PEFT_PREFIX

_DIFFUSERS_TO_RELEASED = {v: k for k, v in MODULE_NAMES.items()}
_TRAINED_KEY = re.compile(r"^(?:.*\.)?blocks\.(\d+)\.(.+)\.lora_([AB])\." + re.escape(ADAPTER_NAME) + r"\.weight$")
EXPERT_FILES = {"high": f"{FILE_STEMS[0]}.safetensors", "low": f"{FILE_STEMS[1]}.safetensors"}


def target_modules(num_layers: int) -> list[str]:
    return [f"blocks.{block}.{name}" for block in range(num_layers) for name in MODULE_NAMES.values()]


def add_lora(expert, rank: int, alpha: float, seed: int) -> None:
    """Inject the rsLoRA adapter (seeded A, zero B); every other weight is frozen."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=True, lora_dropout=0.0, bias="none",
                        init_lora_weights=True, target_modules=target_modules(expert.config.num_layers))
    expert.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        expert.add_adapter(config, adapter_name=ADAPTER_NAME)
    for name, parameter in expert.named_parameters():
        parameter.requires_grad_(".lora_" in name)


def lora_parameters(expert) -> list[torch.nn.Parameter]:
    return [p for name, p in expert.named_parameters() if ".lora_" in name]


def released_state(trained: dict[str, torch.Tensor], rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """The trained adapter state (module names as in the model, e.g. `blocks.0.attn1.to_q.
    lora_A.storymem.weight`) as a released-format state dict (float32, CPU)."""
    out = {}
    factor = float(alpha) / float(rank)
    for name, tensor in trained.items():
        match = _TRAINED_KEY.match(name)
        if match is None:
            raise ValueError(f"not a StoryMem LoRA weight: {name}")
        block, module, ab = match.groups()
        if module not in _DIFFUSERS_TO_RELEASED:
            raise ValueError(f"{name}: {module} is not one of the ten StoryMem LoRA targets")
        value = tensor.detach().to(torch.float32).cpu()
        if ab == "B" and factor != 1.0:
            value = value * factor
        out[f"{PEFT_PREFIX}blocks.{int(block)}.{_DIFFUSERS_TO_RELEASED[module]}.lora_{ab}.weight"] = value.contiguous()
    return dict(sorted(out.items()))


def zero_like_released(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A pair file that changes nothing (all zeros) with the keys and shapes of `state`: the
    other expert's file when only one expert is trained (both experts share one architecture)."""
    return {key: torch.zeros_like(value) for key, value in state.items()}


def released_file_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """The .safetensors bytes of a released-format state dict. Deterministic (the same
    weights always give the same bytes, hence the same `lora_id`): one metadata entry only,
    as safetensors writes several in no fixed order."""
    from safetensors.torch import save

    return save(state, metadata={"format": "pt"})
