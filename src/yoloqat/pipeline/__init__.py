"""The DVC stage jobs, one module per stage of dvc.yaml, and :func:`stage.run_stage`.

Each job reads the validated config, calls the algorithms in ``data``, ``train``, ``quant``,
``deploy`` and ``curves``, and writes its own outputs (paths from :mod:`yoloqat.paths`).
Nothing below imports this package; it never imports ``analysis`` or ``cli``.
"""
