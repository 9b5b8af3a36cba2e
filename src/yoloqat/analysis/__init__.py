"""Tools that read finished runs: ``yoloqat judge`` (curves -> verdicts), DVC experiment
records, the model ladder (grouping, the rung rule, queueing) and its reports.

The top layer next to ``cli``: it reads pipeline outputs through ``curves`` and ``paths`` and
is never imported by the pipeline.
"""
