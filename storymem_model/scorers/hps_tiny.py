"""A tiny random HPSv3 (Qwen2-VL base + processor + checkpoint) built in code, offline.

Runs INSIDE the HPS environment (transformers 4.45.2):

    .hps-venv/bin/python -m storymem_model.scorers.hps_tiny OUT_DIR [--seed 0]

writes `OUT_DIR/qwen2vl/` (a Qwen2-VL model folder: config, random weights, a byte-level
BPE tokenizer trained in code, the Qwen2-VL image processor and a chat template) and
`OUT_DIR/hpsv3.safetensors` (a full HPSv3 state dict for that base, made by hpsv3's own
`create_model_and_processor`, so the real package loads it with `strict=True`). Everything is
seeded: the same seed gives the same files. Scores are noise-like but deterministic; the
reward head is shifted so tiny scores sit around the reference's gate value 3.0.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

BASE_DIR = "qwen2vl"
CHECKPOINT = "hpsv3.safetensors"
MANIFEST = "tiny_hps.json"

# Token strings the Qwen2-VL processor and HPSv3 rely on.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# A chat template of our own covering what HPSv3 sends: user turns whose content is a list
# of {"type": "image"} / {"type": "text", "text": ...} items, plus the generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass(frozen=True)
class TinyHPSSizes:
    """Every size of the tiny HPSv3 in one place."""

    vocab_size: int = 1000         # BPE vocabulary incl. special tokens (then +1 reward token)
    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4   # head_dim 8 -> mrope sections (2, 1, 1)
    num_key_value_heads: int = 2
    vision_depth: int = 2
    vision_embed_dim: int = 32
    vision_num_heads: int = 4
    vision_mlp_ratio: int = 2
    # HPSv3 resizes every image to its 256 * 28 * 28 pixel budget (448x448, 1024 patches of
    # 14 px); the tiny image processor then shrinks it to at most this many pixels (112x112:
    # 64 patches, 16 image tokens). Patch 14 and merge 2 stay real. This matters on a CPU:
    # transformers 4.45's SDPA vision attention masks one (P, P) matrix over all P patches of
    # the batch, so its cost grows with the square of the batch's patch count.
    image_max_pixels: int = 112 * 112
    target_mean_score: float = 3.0  # centre of tiny scores (the reference's HPS gate)
    target_score_std: float = 1.0   # spread of tiny scores over random calibration images


TINY_HPS = TinyHPSSizes()


def _tokenizer_corpus() -> list[str]:
    """Text the tiny BPE is trained on: HPSv3's own instruction plus story-like prompts."""
    from hpsv3.dataset.data_collator_qwen import (INSTRUCTION, prompt_with_special_token,
                                                  prompt_without_special_token)
    return [INSTRUCTION, prompt_with_special_token, prompt_without_special_token,
            "user assistant system", "A lighthouse keeper climbs the spiral stairs at dusk.",
            "The girl with a red scarf walks through the snowy market, close-up, cinematic.",
            "Wide shot of a harbour at night, lanterns, rain, two friends talking."]


def build_tokenizer(vocab_size: int):
    """A byte-level BPE trained in code, wrapped as the Qwen2 fast tokenizer class."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    return Qwen2TokenizerFast(tokenizer_object=bpe, unk_token=None, bos_token=None,
                              eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                              errors="replace")


def build_base_model(folder: Path, seed: int, sizes: TinyHPSSizes = TINY_HPS) -> None:
    """Tiny random Qwen2VLForConditionalGeneration + Qwen2VLProcessor saved to `folder`."""
    import torch
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor)

    tokenizer = build_tokenizer(sizes.vocab_size)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    head_dim = sizes.hidden_size // sizes.num_attention_heads
    half = head_dim // 2
    mrope_section = [half - 2 * (half // 4), half // 4, half // 4]
    config = Qwen2VLConfig(
        vocab_size=len(tokenizer), hidden_size=sizes.hidden_size,
        intermediate_size=sizes.intermediate_size, num_hidden_layers=sizes.num_hidden_layers,
        num_attention_heads=sizes.num_attention_heads,
        num_key_value_heads=sizes.num_key_value_heads, max_position_embeddings=4096,
        rope_theta=10000.0, rope_scaling={"type": "mrope", "mrope_section": mrope_section},
        tie_word_embeddings=False, torch_dtype="float32",
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|image_pad|>"], image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_config={"depth": sizes.vision_depth, "embed_dim": sizes.vision_embed_dim,
                       "hidden_size": sizes.hidden_size, "num_heads": sizes.vision_num_heads,
                       "mlp_ratio": sizes.vision_mlp_ratio, "patch_size": 14,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3})
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56,
                                            max_pixels=sizes.image_max_pixels)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 chat_template=CHAT_TEMPLATE)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)


def _calibration_images(seed: int, count: int = 8):
    """Smooth random colour images (gradients + blocks), uint8 (count, 64, 64, 3)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    grid = np.linspace(0.0, 1.0, 64)
    images = []
    for _ in range(count):
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = (grid[:, None] * rng.uniform() + grid[None, :] * rng.uniform()) / 2
        image = a * (1 - t[..., None]) + b * t[..., None]
        image[rng.integers(0, 32):, rng.integers(0, 32):] *= rng.uniform(0.3, 1.0)
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return np.stack(images)


def build_checkpoint(base_folder: Path, checkpoint: Path, seed: int,
                     sizes: TinyHPSSizes = TINY_HPS) -> None:
    """HPSv3 state dict for the tiny base, made by hpsv3's own model factory.

    The last reward-head layer is then rescaled and shifted (seeded calibration images) so the
    scores ("mu") have mean `target_mean_score` and std `target_score_std` on them.
    """
    import tempfile

    import torch
    from safetensors.torch import save_file
    from hpsv3.train import create_model_and_processor
    from hpsv3.utils.parser import (DataConfig, ModelConfig, PEFTLoraConfig, TrainingConfig,
                                    parse_args_with_yaml)

    from storymem_model.scorers.hps_model import HPSv3Model, write_hps_config

    with tempfile.TemporaryDirectory(prefix="hpsv3-tiny-") as tmp:
        config_path = write_hps_config(base_folder, tmp, "float32")
        (_, training_args, model_config, lora_config), _ = parse_args_with_yaml(
            (DataConfig, TrainingConfig, ModelConfig, PEFTLoraConfig), str(config_path),
            is_train=False)
        torch.manual_seed(seed + 1)
        model, _, _ = create_model_and_processor(model_config, lora_config, training_args)
    state = {name: value.detach().contiguous() for name, value in model.state_dict().items()}
    save_file(state, str(checkpoint))

    scorer = HPSv3Model(checkpoint, base_folder, device="cpu", dtype="float32")
    raw = scorer.score(_calibration_images(seed))
    scale = sizes.target_score_std / max(float(raw.std()), 1e-6)
    shift = sizes.target_mean_score - scale * float(raw.mean())
    # Only the "mu" output (row 0) of the last linear layer is calibrated.
    last = [name for name in state if name.startswith("rm_head.") and name.endswith(".weight")][-1]
    bias = last[: -len("weight")] + "bias"
    state[last][0] *= scale
    state[bias][0] = state[bias][0] * scale + shift
    save_file(state, str(checkpoint))


def build_tiny_hps(out_dir: str | Path, seed: int = 0) -> dict:
    """Build the tiny base folder and checkpoint under `out_dir`; returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_folder = out / BASE_DIR
    checkpoint = out / CHECKPOINT
    build_base_model(base_folder, seed)
    build_checkpoint(base_folder, checkpoint, seed)
    manifest = {"seed": seed, "base_model_path": str(base_folder.resolve()),
                "checkpoint_path": str(checkpoint.resolve()),
                "sizes": TINY_HPS.__dict__}
    # Written last: its presence means the folder is complete.
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> int:
    """OUT_DIR [SEED]: write the tiny Qwen2-VL base and HPSv3 checkpoint into OUT_DIR."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2) or (len(argv) == 2 and not argv[1].isdigit()):
        print("usage: python -m storymem_model.scorers.hps_tiny OUT_DIR [SEED]",
              file=sys.stderr)
        return 2
    manifest = build_tiny_hps(argv[0], seed=int(argv[1]) if len(argv) == 2 else 0)
    print(json.dumps(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
