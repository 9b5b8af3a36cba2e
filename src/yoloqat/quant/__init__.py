"""Quantization algorithms, each a small testable piece: Brevitas int-N conversion and the fast
fake-quant path (``convert``), EMA of latent weights (``ema``), Nagel's oscillation tracker
(``oscillation``), Quantization Correction (``correction``), BatchNorm folding that keeps the
integer grid (``fold``) and the QAT checkpoint format (``checkpoint``).
"""
