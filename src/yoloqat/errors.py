"""Every error type the project raises on purpose for bad input, in one light module.

A stage or CLI reports these as one line and exits 2; anything else is a bug and keeps its
traceback.  This module imports nothing heavy (no torch, no Ultralytics), so the error path of a
stage costs no more than its happy path.  Messages never start with the stage name: the runner
adds it once.
"""

from __future__ import annotations


class YoloqatError(ValueError):
    """Base of every expected error; the message is a single line."""


class ConfigError(YoloqatError):
    """A params.yaml value that is not allowed."""


class DataError(YoloqatError):
    """A dataset that cannot be prepared or read."""


class DataWarning(UserWarning):
    """Items skipped while importing (unreadable images, malformed labels); never fatal."""


class StageBusyError(YoloqatError):
    """Another live process is already writing this stage's outputs."""


class CheckpointError(YoloqatError):
    """A checkpoint that is missing, unreadable or not of the expected format."""


class CorrectionError(YoloqatError):
    """The folded QC model does not reproduce the corrected one, or integers moved."""


class ExportError(YoloqatError):
    """The ONNX graph could not be written or failed its own verification."""


class EvaluateError(YoloqatError):
    """Inputs the evaluate stage cannot use."""


class VerdictError(YoloqatError):
    """The qat outputs the verdict needs are missing or unreadable."""


class CurveError(YoloqatError):
    """A training curve file that cannot be read."""


class ExperimentsError(YoloqatError):
    """dvc could not list the experiments, or its JSON is not what dvc prints."""


class LadderError(YoloqatError):
    """Something the ladder cannot work with."""
