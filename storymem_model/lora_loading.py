"""StoryMem LoRA loading (in progress)."""


class LoraLoadError(ValueError):
    """A StoryMem LoRA file or pair that is refused; nothing was loaded."""


def load_storymem_lora(pipeline, lora, strength=1.0, fuse=False, rank=None, alpha=None):
    raise NotImplementedError("StoryMem LoRA loading is not implemented yet")
