"""Prompt encoding with the UMT5 encoder, as Wan does it, plus Wan's negative prompt.

Prompts are whitespace-cleaned, tokenized to a fixed length, encoded, and every position
after the prompt's own tokens is zeroed (Wan's convention). Encoded prompts are kept in a
small per-encoder LRU cache: the negative prompt is the same for every shot.
"""
from __future__ import annotations

import html
import re
from collections import OrderedDict

import torch

# Wan2.2's standard negative prompt (sample_neg_prompt of its generation configs).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


def clean_prompt(text: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


class PromptEncoder:
    """Tokenizer + UMT5 encoder -> (1, text_length, dim) embeddings, zero-padded, cached."""

    def __init__(self, tokenizer, text_encoder, text_length: int, cache_size: int = 16):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.text_length = text_length
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts], padding="max_length", max_length=self.text_length,
            truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        hidden = self.text_encoder(ids, mask).last_hidden_state
        keep = mask.unsqueeze(-1).to(hidden.dtype)
        return hidden * keep  # zeros after each prompt's own tokens

    def encode(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """(len(prompts), text_length, dim) on `device` (computed where the encoder lives)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            encoder_device = next(self.text_encoder.parameters()).device
            if encoder_device.type == "meta":  # offloaded with hooks: they move inputs themselves
                encoder_device = device
            encoded = self._encode_uncached(missing, encoder_device)
            for prompt, embedding in zip(missing, encoded):
                self._cache[prompt] = embedding.detach().cpu()
        for prompt in prompts:
            self._cache.move_to_end(prompt)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return torch.stack([self._cache[p] for p in prompts]).to(device)
