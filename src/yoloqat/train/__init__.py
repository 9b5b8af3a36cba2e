"""Training with Ultralytics: trainer subclasses extended by overrides and callbacks (importable
for DDP), the per-epoch DVCLive logger, and PyTorch-side validation / calibration loaders.
"""
