"""CLIP image and text embeddings through open_clip, batched, L2-normalised.

Real use: an open_clip model name plus a local checkpoint file: an open_clip state dict
(`.bin`/`.pt`/`.safetensors`) or OpenAI's TorchScript release file (the reference uses
OpenAI's ViT-B/32: `ViT-B-32-quickgelu` with `ViT-B-32.pt`). Nothing is downloaded.
Tests and the demo use `OpenClipEmbedder.tiny()`: a small custom architecture registered
with `open_clip.add_model_config`, seeded random weights, and open_clip's own BPE tokenizer
(shipped inside the wheel).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from storymem_model.scorers.fixed_batch import DEFAULT_ROWS, run_fixed
from storymem_model.scorers.base import ScorerError, check_image_batch

REFERENCE_CLIP_MODEL = "ViT-B-32-quickgelu"  # OpenAI CLIP ViT-B/32, as the reference uses

RESIZE_MODES = ("squash", "center_crop", "squash_bilinear")

TINY_CLIP_NAME = "storymem-tiny-clip"
# ~4.2 M parameters: the 49408-token embedding table of the text tower and one 64x64
# patch. One patch per image on purpose: with 16 small patches the (near uniform) random
# attention averages the patches and every tiny render embeds alike (cosine ~0.97 between
# different shots); one whole-image patch keeps them apart (~0.74), like a trained CLIP.
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32,
                   "patch_size": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                 "layers": 2},
}
TINY_CLIP_SEED = 0


def register_tiny_clip_config() -> str:
    """Register the tiny architecture with open_clip (idempotent); returns its model name."""
    if TINY_CLIP_NAME in open_clip.list_models():
        return TINY_CLIP_NAME
    folder = Path(tempfile.gettempdir()) / f"storymem-open-clip-configs-{os.getuid()}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{TINY_CLIP_NAME}.json"
    text = json.dumps(TINY_CLIP_CONFIG, indent=1, sort_keys=True)
    if not path.is_file() or path.read_text() != text:
        tmp = folder / f".{TINY_CLIP_NAME}.{os.getpid()}.tmp"
        tmp.write_text(text)
        os.replace(tmp, path)
    open_clip.add_model_config(path)
    return TINY_CLIP_NAME


@contextlib.contextmanager
def _quiet_random_init(active: bool):
    """Drop open_clip's "No pretrained weights loaded" warning when random weights are
    what was asked for (the tiny preset); every other message passes."""
    def keep(record: logging.LogRecord) -> bool:
        return not (active and "No pretrained weights loaded" in record.getMessage())

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _is_torchscript_archive(path: str) -> bool:
    """OpenAI's released CLIP files (e.g. ViT-B-32.pt, the reference's) are TorchScript
    archives: a zip with a `code/` folder (plain torch.save zips have none)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in f"/{name}" for name in archive.namelist())


def _load_torchscript_weights(model, path: str) -> None:
    """Copy the weights of an OpenAI TorchScript CLIP into the open_clip model (same names;
    OpenAI's fp16 weights are cast to the model's dtype)."""
    with warnings.catch_warnings():  # "torch.jit.load is deprecated": the format is not
        warnings.simplefilter("ignore", FutureWarning)
        state = torch.jit.load(path, map_location="cpu").state_dict()
    for key in ("input_resolution", "context_length", "vocab_size"):
        state.pop(key, None)
    model.load_state_dict(state, strict=True)


def _content_driven_cls_token(model) -> None:
    """Start the class token at zero (class embedding and its positional row).

    In a randomly initialised ViT the constant class token dominates the pooled output, so
    every image embeds almost the same way (cosine ~0.98 between unrelated noise images).
    Zeroing it makes the tiny random CLIP depend on image content: unrelated noise images
    land at cosine ~0.07 +- 0.2, slightly perturbed copies at ~0.98, the way a trained CLIP
    separates different frames from near-duplicates.
    """
    with torch.no_grad():
        model.visual.class_embedding.zero_()
        model.visual.positional_embedding[0].zero_()


class OpenClipEmbedder:
    """`ImageEmbedder` over an open_clip model: `embed_images`, `embed_texts`, `name`."""

    def __init__(self, model_name: str = REFERENCE_CLIP_MODEL, checkpoint: str | None = None,
                 *, device: str | torch.device | None = None, precision: str = "fp32",
                 batch_size: int = DEFAULT_ROWS, random_init_seed: int | None = None,
                 resize_mode: str = "squash"):
        if checkpoint is None and random_init_seed is None:
            raise ScorerError(
                f"CLIP {model_name!r}: no checkpoint path given; pass the local weights file "
                "(random weights only through random_init_seed, for tests)")
        if checkpoint is not None and not os.path.isfile(checkpoint):
            raise ScorerError(f"CLIP {model_name!r}: checkpoint file not found: {checkpoint}")
        if model_name == TINY_CLIP_NAME:
            register_tiny_clip_config()
        if model_name not in open_clip.list_models():
            raise ScorerError(f"unknown open_clip model {model_name!r}; known: "
                              f"{', '.join(open_clip.list_models()[:8])}, ...")
        if resize_mode not in RESIZE_MODES:
            raise ScorerError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        if batch_size < 1:
            raise ScorerError(f"batch_size must be >= 1, got {batch_size}")
        self.model_name = model_name
        self.checkpoint = checkpoint
        self.batch_size = batch_size
        self.resize_mode = resize_mode
        self.device = torch.device(device or "cpu")
        scripted = checkpoint is not None and _is_torchscript_archive(checkpoint)
        try:
            with torch.random.fork_rng(devices=[]), \
                    _quiet_random_init(checkpoint is None or scripted):
                torch.manual_seed(0 if random_init_seed is None else random_init_seed)
                model = open_clip.create_model(
                    model_name, pretrained=None if scripted else checkpoint,
                    precision=precision, device=self.device)
            if scripted:
                _load_torchscript_weights(model, checkpoint)
        except ScorerError:
            raise
        except Exception as exc:  # wrong architecture, truncated file, unknown format
            raise ScorerError(f"cannot load CLIP {model_name!r} from {checkpoint}: "
                              f"{type(exc).__name__}: {exc}") from exc
        self.model = model.eval().requires_grad_(False)
        if checkpoint is None and model_name == TINY_CLIP_NAME:
            _content_driven_cls_token(self.model)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        preprocess = open_clip.get_model_preprocess_cfg(self.model)
        size = preprocess.get("size", self.model.visual.image_size)
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self._mean = torch.tensor(preprocess["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(preprocess["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self._dtype = next(self.model.parameters()).dtype
        source = os.path.basename(checkpoint) if checkpoint else f"random-seed{random_init_seed}"
        self.name = f"open_clip:{model_name}:{source}"
        self.embed_dim = int(self.model.text_projection.shape[1]
                             if self.model.text_projection is not None
                             else self.model.visual.output_dim)

    @classmethod
    def tiny(cls, seed: int = TINY_CLIP_SEED, **kwargs) -> "OpenClipEmbedder":
        """The tiny random CLIP used by the `tiny` preset (fast on a CPU)."""
        return cls(register_tiny_clip_config(), None, random_init_seed=seed, **kwargs)

    def preprocess(self, batch: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> normalised (N, 3, S, S) with CLIP's mean/std.

        `resize_mode="squash"` resizes the whole frame to S x S, bicubic with antialias (so a
        change anywhere in a wide frame counts); `"squash_bilinear"` squashes it bilinear
        without antialias, on float pixels (the reference release's CLIP input, used with
        keyframe_preprocess "reference"); `"center_crop"` resizes the shortest side to S and
        crops the centre (open_clip's own transform, used for the aesthetic predictor). The
        bicubic resizes run on uint8 pixels on the CPU like PIL's (much faster than floats).
        """
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device).permute(0, 3, 1, 2)
        target_h, target_w = self.image_size
        height, width = x.shape[-2:]
        if self.resize_mode == "squash_bilinear":
            x = x.float() / 255.0
            if (height, width) != (target_h, target_w):
                x = F.interpolate(x, size=(target_h, target_w), mode="bilinear",
                                  align_corners=False, antialias=False)
            return (x - self._mean.to(x.device)) / self._std.to(x.device)
        if self.resize_mode == "squash":
            size = (target_h, target_w)
        else:
            scale = max(target_h / height, target_w / width)
            size = (max(target_h, round(height * scale)), max(target_w, round(width * scale)))
        if size != (height, width):
            if x.device.type == "cpu":
                x = F.interpolate(x, size=size, mode="bicubic", antialias=True)
                x = x.float() / 255.0
            else:
                x = F.interpolate(x.float() / 255.0, size=size, mode="bicubic",
                                  antialias=True).clamp_(0.0, 1.0)
        else:
            x = x.float() / 255.0
        top, left = (size[0] - target_h) // 2, (size[1] - target_w) // 2
        x = x[:, :, top:top + target_h, left:left + target_w]
        return (x - self._mean.to(x.device)) / self._std.to(x.device)

    @torch.inference_mode()
    def embed_images(self, images) -> np.ndarray:
        batch = check_image_batch(images)

        def forward(chunk: np.ndarray) -> np.ndarray:
            features = self.model.encode_image(self.preprocess(chunk).to(self._dtype))
            return F.normalize(features.float(), dim=-1).cpu().numpy()

        # fixed-size forwards (black padding frames): numbers never depend on batch mates
        return run_fixed(forward, batch, self.batch_size, 0).astype(np.float32, copy=False)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise ScorerError("embed_texts: expected a list of strings, got a single string")
        texts = list(texts)
        if not texts:
            raise ScorerError("embed_texts: empty list")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise ScorerError(f"embed_texts: texts[{index}] is {type(text).__name__}, "
                                  "not str")

        def forward(chunk: list[str]) -> np.ndarray:
            features = self.model.encode_text(self.tokenizer(chunk).to(self.device))
            return F.normalize(features.float(), dim=-1).cpu().numpy()

        return run_fixed(forward, texts, self.batch_size, "").astype(np.float32, copy=False)
