"""yoloqat: does EMA + Quantization Correction stop W4A16 QAT collapse on YOLOv10?

Layers, imported one way (``tests/test_layout.py``): base (``config``, ``paths``, ``errors``,
``numbers``, ``provenance``, ``offline``) <- algorithms (``data``, ``quant``, ``train``,
``deploy``, ``curves``) <- ``pipeline`` (one job per DVC stage) <- ``analysis`` and ``cli``.
"""
