"""The `tiny` preset: the real Wan2.2 classes at tiny sizes with seeded random weights.

Everything is built in code (no files, no downloads): a byte-level BPE tokenizer trained
with the `tokenizers` library on a fixed corpus, a UMT5 encoder, an AutoencoderKLWan and
the WanTransformer3DModel experts. Sizes come from `presets.TINY`. Videos made with these
weights are noise; the preset exists so the whole system runs on a CPU.
"""
from __future__ import annotations

import functools

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from .presets import TINY, TinyPreset

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2 as in T5 vocabularies

_TOKENIZER_CORPUS = """
A lighthouse keeper climbs the spiral stairs at dusk and lights the lamp.
The camera slowly pushes in on her face as the storm gathers over the sea.
Close-up of a young boy with a red scarf running through a snowy forest at night.
Wide shot of a city street in the rain, neon signs reflecting on the wet asphalt.
An old man sits by the fire, reading a letter; warm light flickers on the walls.
The girl opens the wooden door and steps into a sunlit garden full of flowers.
Medium shot: two friends laugh at a cafe table while the waiter brings coffee.
A dragon flies over the mountains, its wings casting long shadows on the valley.
The detective examines the footprints in the mud, then looks up at the window.
Aerial view of a small fishing village at sunrise, boats leaving the harbour.
She turns around, surprised, and the camera follows her gaze to the horizon.
Cinematic lighting, shallow depth of field, soft focus, smooth camera motion.
"""


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_TOKENIZER_CORPUS.strip().splitlines(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", special_tokens=[(EOS, tokenizer.token_to_id(EOS))])
    return tokenizer.to_str()


def build_tiny_tokenizer(preset: TinyPreset = TINY) -> PreTrainedTokenizerFast:
    """A T5-style tokenizer (pad 0, eos 1, unk 2, eos appended) built in code."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(_tokenizer_json(preset.tokenizer_vocab_size))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK,
        model_max_length=preset.text_length)


def build_tiny_text_encoder(vocab_size: int, preset: TinyPreset = TINY) -> UMT5EncoderModel:
    config = UMT5Config(
        vocab_size=vocab_size, d_model=preset.text_dim, d_kv=preset.text_d_kv, d_ff=preset.text_d_ff,
        num_layers=preset.text_num_layers, num_heads=preset.text_num_heads,
        relative_attention_num_buckets=preset.text_relative_buckets,
        relative_attention_max_distance=preset.text_relative_max_distance,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, tie_word_embeddings=False)
    return UMT5EncoderModel(config)


def build_tiny_vae(preset: TinyPreset = TINY) -> AutoencoderKLWan:
    return AutoencoderKLWan(
        base_dim=preset.vae_base_dim, decoder_base_dim=preset.vae_decoder_base_dim, z_dim=16, dim_mult=list(preset.vae_dim_mult),
        num_res_blocks=preset.vae_num_res_blocks, attn_scales=[], temperal_downsample=[False, True, True])


def build_tiny_transformer(in_channels: int, preset: TinyPreset = TINY) -> WanTransformer3DModel:
    """One tiny expert: 36 input channels for I2V/M2V experts, 16 for T2V experts."""
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=preset.num_attention_heads,
        attention_head_dim=preset.attention_head_dim, in_channels=in_channels, out_channels=16,
        text_dim=preset.text_dim, freq_dim=preset.freq_dim, ffn_dim=preset.ffn_dim,
        num_layers=preset.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)


def _randomize_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded random weights everywhere (some diffusers inits are zeros or identities)."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.ndim == 1 and ("norm" in name or name.endswith(".gamma")):
                parameter.copy_(1.0 + 0.1 * torch.randn(parameter.shape, generator=generator))
            else:
                fan_in = parameter[0].numel() if parameter.ndim > 1 else parameter.numel()
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / max(fan_in, 1) ** 0.5)


def build_tiny_components(preset: TinyPreset = TINY) -> dict:
    """tokenizer, text_encoder, vae, transformer, transformer_2 (+ t2v_transformer{,_2})."""
    generator = torch.Generator().manual_seed(preset.weights_seed)
    tokenizer = build_tiny_tokenizer(preset)
    components = {
        "tokenizer": tokenizer,
        "text_encoder": build_tiny_text_encoder(len(tokenizer), preset),
        "vae": build_tiny_vae(preset),
        "transformer": build_tiny_transformer(36, preset),
        "transformer_2": build_tiny_transformer(36, preset),
        "t2v_transformer": build_tiny_transformer(16, preset) if preset.with_t2v else None,
        "t2v_transformer_2": build_tiny_transformer(16, preset) if preset.with_t2v else None,
    }
    for name in ("text_encoder", "vae", "transformer", "transformer_2", "t2v_transformer", "t2v_transformer_2"):
        if components[name] is not None:
            _randomize_(components[name], generator)
            components[name].eval()
    with torch.no_grad():  # centre decoded pixels: a random output layer pushes most of them to black
        conv_out = components["vae"].decoder.conv_out
        conv_out.weight.sub_(conv_out.weight.mean(dim=(1, 2, 3, 4), keepdim=True))
        conv_out.bias.zero_()
    return components
