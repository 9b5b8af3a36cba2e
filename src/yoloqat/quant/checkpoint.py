"""QAT checkpoints: rebuildable recipe + state_dict, and a baked plain-Ultralytics copy.

Brevitas modules cannot be pickled, so a QAT checkpoint (``<stem>.qat.pt``) stores the plain
model's yaml, the quantization recipe and the fake-quant model's state_dict;
:func:`load_qat_checkpoint` rebuilds the float architecture, replays the recipe and loads the
weights.  The baked checkpoint (``<stem>.pt``) replaces every quantized conv by a float
``nn.Conv2d`` holding the dequantized integer weights, in Ultralytics' own format, so
``ultralytics.YOLO(path)`` loads it with no project code.

A ``.qat.pt`` holds only plain containers, numbers, strings and tensors, so it is read with
``torch.load(weights_only=True)`` and its model yaml is checked before a model is built from it:
a file received from someone else cannot run code when it is loaded.  An Ultralytics ``.pt``
(pickled modules) is first read with Ultralytics' restricted loader and its yaml checked the
same way (:mod:`yoloqat.quant.safeload`); only a file that passes goes on to Ultralytics' own
loader, which uses the full unpickler.
"""

from __future__ import annotations

import copy
import datetime as _dt
import numbers
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from yoloqat.errors import CheckpointError
from yoloqat.quant.convert import (
    QuantRecipe,
    float_conv_like,
    quant_convs,
    quant_weight_value,
    quantize_model,
    remove_fake_quant_mode,
)
from yoloqat.quant.correction import corrected_convs, wrap_convs
from yoloqat.quant.safeload import (
    LoadFailed,
    LoadRefused,
    failure_reason,
    model_yaml_problem,
    restricted_ultralytics_load,
    weights_only_load,
)

FORMAT = "yoloqat-qat-v1"


def bake(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` whose convs hold the dequantized int weights.

    A head correction (a :class:`CorrectedConv` left after QC) is folded into the float conv:
    weight ``gamma * W_q``, bias ``gamma * b + beta`` (the baked copy has no integer grid to keep).
    """
    baked = copy.deepcopy(model)
    for name in corrected_convs(baked):
        wrapped = baked.get_submodule(name)
        q, aff = wrapped.conv, wrapped.correction
        gamma, beta = aff.gamma.detach(), aff.beta.detach()
        bias = q.bias.detach() if q.bias is not None else torch.zeros_like(gamma)
        weight = quant_weight_value(q) * gamma.view(-1, 1, 1, 1)
        baked.set_submodule(name, float_conv_like(q, weight, gamma * bias + beta))
    for name, q in list(quant_convs(baked)):
        bias = q.bias.detach() if q.bias is not None else None
        baked.set_submodule(name, float_conv_like(q, quant_weight_value(q), bias))
    remove_fake_quant_mode(baked)
    if hasattr(baked, "quant_recipe"):
        del baked.quant_recipe
    for attr in ("is_fused",):
        baked.__dict__.pop(attr, None)
    return baked


def _plain(value: Any, where: str) -> Any:
    """``value`` made of what ``weights_only=True`` accepts (dict, list, str, int, float, bool,
    None, tensors); numpy scalars become Python numbers, anything else is a bug to report."""
    if value is None or isinstance(value, (str, bool, int, float, torch.Tensor)):
        return value
    if isinstance(value, dict):
        return {_plain(k, where): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, numbers.Number) and hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{where} holds a {type(value).__name__}, which a weights-only checkpoint cannot store")


def save_qat_checkpoint(
    model: nn.Module, recipe: QuantRecipe, stem: Path, info: dict[str, Any], names: Any
) -> tuple[Path, Path]:
    """Write ``<stem>.qat.pt`` (rebuildable) and ``<stem>.pt`` (baked, Ultralytics format)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    qat_path, baked_path = stem.with_suffix(".qat.pt"), stem.with_suffix(".pt")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = _plain({
        "format": FORMAT,
        "yaml": copy.deepcopy(getattr(model, "yaml", None)),
        "nc": int(getattr(model, "nc", len(names))),
        "names": dict(names) if isinstance(names, dict) else list(names),
        "recipe": recipe.to_dict(),
        # convs wrapped by a QC correction that is kept as a module (the head's output convs)
        "corrected": corrected_convs(model),
        "info": info,
        "date": _dt.datetime.now(_dt.UTC).isoformat(),
    }, "checkpoint")
    payload["state_dict"] = state
    _atomic_save(payload, qat_path)
    baked = bake(model).float().cpu().eval()
    baked.names = payload["names"]
    for p in baked.parameters():
        p.requires_grad_(False)
    if hasattr(baked, "criterion"):
        baked.criterion = None
    _atomic_save(
        {
            "model": None,
            "ema": baked,
            "train_args": getattr(model, "args", {}) if isinstance(getattr(model, "args", {}), dict) else {},
            "epoch": info.get("epoch", -1),
            "date": payload["date"],
            "yoloqat": {"format": FORMAT, "baked_from": recipe.to_dict(), **info},
        },
        baked_path,
    )
    return qat_path, baked_path


def copy_checkpoint(saved: tuple[Path, Path], stem: Path) -> tuple[Path, Path]:
    """The pair written by :func:`save_qat_checkpoint` copied to ``<stem>.qat.pt`` and
    ``<stem>.pt``, each file replaced whole (a reader never sees half a copy)."""
    copies = (stem.with_suffix(".qat.pt"), stem.with_suffix(".pt"))
    for source, target in zip(saved, copies):
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(source, tmp)
        tmp.replace(target)
    return copies


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _payload_problem(payload: Any) -> str | None:
    """What keeps a weights-only-loaded object from being a QAT checkpoint to rebuild, or None."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        return f"is not a yoloqat QAT checkpoint (expected format {FORMAT})"
    kinds = {"nc": int, "names": (dict, list), "recipe": dict, "state_dict": dict}
    for key, kind in kinds.items():
        if not isinstance(payload.get(key), kind):
            return f"is not a valid {FORMAT} checkpoint ({key!r} is missing or of the wrong type)"
    if not all(isinstance(v, torch.Tensor) for v in payload["state_dict"].values()):
        return f"is not a valid {FORMAT} checkpoint (its state_dict holds more than tensors)"
    corrected = payload.get("corrected", [])
    if not (isinstance(corrected, list) and all(isinstance(n, str) for n in corrected)):
        return f"is not a valid {FORMAT} checkpoint ('corrected' is not a list of layer names)"
    problem = model_yaml_problem(payload.get("yaml"))
    return f"was not loaded: {problem}" if problem else None


def load_qat_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the fake-quant model saved by :func:`save_qat_checkpoint`."""
    from ultralytics.nn.tasks import DetectionModel

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    try:
        # weights_only: refuses any pickled object beyond containers and tensors, so loading a
        # .qat.pt cannot run code (see the module docstring).
        payload = weights_only_load(path)
    except LoadRefused as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds more than weights and was not loaded "
            f"(weights-only load refused: {exc})"
        ) from None
    except LoadFailed as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable or corrupt ({exc})") from None
    problem = _payload_problem(payload)
    if problem:
        raise CheckpointError(f"checkpoint {str(path)!r} {problem}")
    try:
        # the yaml passed model_yaml_problem: building from it runs no code it names
        model = DetectionModel(copy.deepcopy(payload["yaml"]), nc=payload["nc"], verbose=False)
        model.names = payload["names"]
        quantize_model(model, QuantRecipe.from_dict(payload["recipe"]))
        wrap_convs(model, list(payload.get("corrected", [])))
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match its recipe ({failure_reason(exc)})"
        ) from None
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"checkpoint {str(path)!r} does not match its recipe ({first})") from None
    return model.eval(), payload


def weights_finite(model: nn.Module) -> bool:
    """Every floating-point entry of the state_dict is finite (a diverged run's are not)."""
    return all(
        bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point()
    )


def _ultralytics_model(path: Path) -> nn.Module:
    """The model of an Ultralytics ``.pt``; CheckpointError whose message is only the reason.

    Read with ``weights_only=True`` first (a project-format or plain-data file needs no more),
    then, for pickled modules, with Ultralytics' restricted loader; never the full unpickler.
    """
    try:
        ckpt = weights_only_load(path)
    except LoadFailed as exc:
        raise CheckpointError(f"unreadable or corrupt: {exc}") from None
    except LoadRefused:
        try:
            ckpt = restricted_ultralytics_load(path)
        except LoadRefused as exc:
            raise CheckpointError(f"weights-only load refused: {exc}") from None
        except LoadFailed as exc:
            raise CheckpointError(f"unreadable or corrupt: {exc}") from None
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
        name = Path(path).name
        baked = name[: -len(".qat.pt")] + ".pt" if name.endswith(".qat.pt") else "<stem>.pt"
        raise CheckpointError(f"a yoloqat QAT checkpoint; its baked copy {baked} is the Ultralytics one")
    model = None
    if isinstance(ckpt, dict):
        model = ckpt.get("ema") if ckpt.get("ema") is not None else ckpt.get("model")
    if not isinstance(model, nn.Module) or not hasattr(model, "model"):
        raise CheckpointError("not an Ultralytics checkpoint: no model under 'ema' or 'model'")
    # Ultralytics' trainer rebuilds the model from this yaml (eval() on its activation)
    problem = model_yaml_problem(getattr(model, "yaml", None))
    if problem:
        raise CheckpointError(problem)
    return model


def load_ultralytics_model(path: Path, what: str = "checkpoint") -> nn.Module:
    """The float model of an Ultralytics ``.pt`` (its EMA, else its model), on CPU in eval mode,
    read with Ultralytics' restricted loader (see :func:`_ultralytics_model`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} not found; run the stage that writes it")
    try:
        model = _ultralytics_model(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{what} {str(path)!r} is not allowed ({exc})") from None
    return model.float().cpu().eval()


def check_start_checkpoint(path: Path, key: str, value: str) -> None:
    """A params-named Ultralytics ``.pt`` (``fp.init_checkpoint``, ``qat.init``) must pass the
    restricted load before Ultralytics' trainer opens it with the full unpickler (which would
    run any code the file names, and fail later with chained tracebacks on a bad file).

    Loading it once more costs about a second and puts the reason in the one line.
    """
    try:
        _ultralytics_model(Path(path))
    except CheckpointError as exc:
        raise CheckpointError(
            f"params: {key}={value!r} is not allowed; expected an Ultralytics YOLO .pt "
            f"checkpoint ({exc})"
        ) from None
