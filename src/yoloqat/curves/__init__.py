"""Training curves and their verdict: the one reader of per-epoch curves (DVCLive folders and
TSVs, Ultralytics results.csv) and the stability classifier over a whole curve.

Used by the pipeline's verdict stage and by the analysis tools alike, so it imports neither:
only config, errors and paths.
"""
