"""StoryMem M2V LoRA training: pure torch / diffusers / peft (no Ray, no Prefect).

The layers above (`pipelines/training/`: Ray Data preparation and Ray Train fitting,
`flows/train_lora.py`, `flows/cli/train.py`) call these modules:

* `specs`: `PrepareSpec`, `FitSpec`, `ValidationSpec` - typed, frozen, JSON specs built once
  at the edge;
* `clip_manifest`: the clip list (JSONL / Parquet manifest, or the dataset flow's output);
* `clips`: one clip decoded with the project's ffmpeg to the training frames (fps, frame
  count, crop and resize), or a `ClipError` naming why not;
* `grouping`: clips grouped into pseudo-stories (given group ids, else CLIP similarity);
* `encoding`: VAE latents and UMT5 caption embeddings through `StoryMemPipeline`'s own
  encoding methods;
* `prepared`: the prepared data set (sharded Parquet rows, manifest) - writing and reading;
* `samples`: one training sample (memory, MI2V/MM2V variant, `conditioning.m2v_inputs`,
  flow-matching noise and target);
* `lora`: rsLoRA on the ten target modules of every block, its state in the released
  key format;
* `experts`: loading one frozen expert for training;
* `optimization`: AdamW, warm-up, clipping, the training step;
* `validation`: rendering the validation script with a LoRA and its consistency numbers;
* `card`: the training card.
"""
