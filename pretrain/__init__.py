"""Self-supervised pre-training: corpora, objectives (MAE, SimCLR, MoCo v3) and the DeepSpeed engine."""
