"""Training stage: Ray Train TorchTrainer workers running DeepSpeed ZeRO on a HF causal LM."""
