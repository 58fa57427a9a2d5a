"""Files on disk: atomic writes, checkpoints (training state) and model files (any nn.Module)."""
