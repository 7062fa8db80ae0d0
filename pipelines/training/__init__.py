"""StoryMem LoRA training on Ray: preparation on Ray Data (`prepare.run_prepare`), fitting on
Ray Train (`fit.run_fit`). The model work itself is `storymem_model.training`."""
