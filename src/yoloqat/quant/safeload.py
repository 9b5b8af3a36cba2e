"""Reading a checkpoint file without letting it run code, and saying in one line why one is refused.

A pickle can call any function it names (``os.system`` through an object's ``__reduce__``), so
no file the project reads goes to Python's full unpickler first:

* :func:`weights_only_load` reads with ``torch.load(weights_only=True)``: containers, numbers,
  strings and tensors, nothing callable beyond torch's own allow-list.  The project's ``.qat.pt``
  files are only that.
* :func:`restricted_ultralytics_load` reads an Ultralytics ``.pt`` (pickled ``nn.Module``\\ s)
  with Ultralytics' own restricted loader: ``weights_only=True`` plus an allow-list of its model
  classes (``torch_safe_load(..., safe_only=True)``).
* :func:`model_yaml_problem` checks a model yaml before Ultralytics builds a model from it:
  ``parse_model`` passes the yaml's ``activation`` to ``eval()`` and calls whatever name a layer
  gives, so a yaml from a file is as dangerous as a pickle.

The refusal reason is the unpickler's own ("unsupported GLOBAL posix.system"); torch wraps it in
advice to retry with ``weights_only=False``, which is exactly what must not be done with a file
from someone else, so that advice never reaches the user.
"""

from __future__ import annotations

import ast
import io
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class LoadRefused(Exception):
    """The weights-only unpickler refused the file; the message is the reason, one line."""


class LoadFailed(Exception):
    """The file could not be read at all (truncated, empty, not a pickle); message: the reason."""


@contextmanager
def quiet_torch_load() -> Iterator[None]:
    """Silence torch's two-line UserWarnings about the kind of file (a pickle protocol other than
    2, i.e. any plain ``pickle.dump`` file; a TorchScript archive); the one-line refusal that
    follows says what matters."""
    with warnings.catch_warnings():
        for words in (r"Detected pickle protocol", r".*looks like a TorchScript archive"):
            warnings.filterwarnings("ignore", message=words, category=UserWarning)
        yield


def weights_only_load(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; LoadRefused / LoadFailed with the reason."""
    import torch

    if Path(path).stat().st_size == 0:
        raise LoadFailed("the file is empty")
    try:
        with quiet_torch_load():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _classified(exc, path) from None
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a corrupt file
        if "TorchScript" in str(exc):
            raise LoadFailed("a TorchScript archive, not a torch.save checkpoint") from None
        raise LoadFailed(failure_reason(exc)) from None


def restricted_ultralytics_load(path: Path) -> dict[str, Any]:
    """An Ultralytics checkpoint dict read by Ultralytics' restricted (weights-only) loader."""
    from ultralytics.nn.tasks import torch_safe_load

    try:
        with quiet_torch_load():
            ckpt, _ = torch_safe_load(str(path), safe_only=True)
    except Exception as exc:  # noqa: BLE001 - Ultralytics re-raises torch's errors as TypeError
        raise _classified(exc, path) from None
    return ckpt


# --------------------------------------------------------------------------------------------
# reasons


_GLOBAL = re.compile(r"GLOBAL (\S+?)\.?(?=\s|$)")
_OPERAND = re.compile(r"Unsupported operand (\d+)")
# torch's and Ultralytics' words around the reason (headers, advice to turn the check off or to
# allow-list the global); a sentence holding one of them is never the reason
_ADVICE = ("Weights only load failed", "In PyTorch 2.6", "Re-running", "set to `False`",
           "trusted source", "Please file an issue", "Check the documentation", "safe_globals",
           "ERROR ❌")


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception behind it (``__cause__``, and ``__context__`` even where torch
    raised ``from None``: its own unpickler's error is kept there), outermost first."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__]
    return seen


def _classified(exc: BaseException, path: Path) -> Exception:
    """LoadRefused when the weights-only unpickler refused something, else LoadFailed."""
    chain = _chain(exc)
    text = "\n".join(str(e) for e in chain)
    found = _GLOBAL.search(text)
    if found:
        name = found.group(1)
        # torch names a builtins global without its module ("GLOBAL eval")
        return LoadRefused(f"unsupported GLOBAL {name if '.' in name else 'builtins.' + name}")
    operand = _OPERAND.search(text)
    if operand:
        code = chr(int(operand.group(1)))
        op = pickletools.code2op.get(code)
        if op is None:  # not a pickle at all: the full unpickler's own words
            return LoadFailed(f"invalid load key, {code!r}")
        names = referenced_globals(path)
        refs = f"; it names {', '.join(names)}" if names else ""
        proto = _protocol(path)
        kind = f"a plain pickle (protocol {proto})" if proto else f"a pickle with opcode {op.name}"
        return LoadRefused(f"{kind}, not a torch.save file{refs}")
    # the unpickler's own error is the innermost UnpicklingError (torch re-raises it wrapped)
    raw = next((e for e in reversed(chain) if isinstance(e, pickle.UnpicklingError)), None)
    if raw is not None:
        return LoadRefused(failure_reason(raw).split(": ", 1)[-1])
    return LoadFailed(failure_reason(exc))


def failure_reason(exc: BaseException) -> str:
    """``Type: first sentence`` of the innermost error of a loader that is not advice."""
    for e in reversed(_chain(exc)):
        sentences = [t.strip().rstrip(".") for ln in str(e).splitlines() for t in ln.split(". ")]
        kept = [t for t in sentences if t and not any(a in t for a in _ADVICE)]
        if kept:
            return f"{type(e).__name__}: {kept[0]}"
    return type(exc).__name__


def _protocol(path: Path) -> int | None:
    """The protocol a plain pickle file declares in its first two bytes (``\\x80 N``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return None
    return head[1] if len(head) == 2 and head[0] == 0x80 else None


_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg", "exceptions": "builtins"}


def referenced_globals(path: Path, limit: int = 3) -> list[str]:
    """The module.name of the first ``limit`` globals a pickle names, read with pickletools
    (which only decodes opcodes, never calls anything); for messages only.

    A torch zip's ``data.pkl`` or the file itself; [] where neither decodes.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                data = next((zf.read(n) for n in zf.namelist() if n.endswith("/data.pkl")), b"")
        else:
            data = Path(path).read_bytes()
    except (OSError, zipfile.BadZipFile):
        return []
    names: list[str] = []
    strings: list[str] = []  # recent string pushes (STACK_GLOBAL takes two)
    memo: dict[int, str] = {}
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name == "GLOBAL":  # protocol 2 writes Python 2 module names
                module, _, name = str(arg).partition(" ")
                names.append(f"{_PY2_MODULES.get(module, module)}.{name}")
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif "UNICODE" in op.name or "STRING" in op.name:
                strings.append(str(arg))
            elif op.name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
            elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                memo[int(arg)] = strings[-1]
            elif op.name in ("BINGET", "LONG_BINGET", "GET") and int(arg) in memo:
                strings.append(memo[int(arg)])
            if len(names) >= limit:
                break
    except Exception:  # noqa: BLE001 - a truncated or odd pickle: keep what was decoded
        return list(dict.fromkeys(names))
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------------------------
# model yaml


def _literal_nn_call(spec: Any) -> bool:
    """``nn.X(...)`` / ``torch.nn.X(...)`` with literal arguments, X a torch.nn module class."""
    from torch import nn

    if not isinstance(spec, str):
        return False
    try:
        call = ast.parse(spec.strip(), mode="eval").body
    except SyntaxError:
        return False
    if not isinstance(call, ast.Call):
        return False
    parts, node = [], call.func
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return False
    parts.append(node.id)
    if parts[1:] not in (["nn"], ["nn", "torch"]):
        return False
    try:
        for a in [*call.args, *(k.value for k in call.keywords)]:
            ast.literal_eval(a)
    except ValueError:
        return False
    cls = getattr(nn, parts[0], None)
    return isinstance(cls, type) and issubclass(cls, nn.Module)


def _layer_class(name: str) -> Any:
    """What Ultralytics' ``parse_model`` would call for a layer's module name, without calling it."""
    from torch import nn
    from ultralytics.nn import tasks

    if name.startswith("nn."):
        return getattr(nn, name[3:], None)
    if name.startswith("torchvision.ops."):
        import torchvision

        return getattr(torchvision.ops, name[16:], None)
    return vars(tasks).get(name)


def model_yaml_problem(yaml: Any) -> str | None:
    """Why building a model from ``yaml`` could run code, or None when it cannot.

    Ultralytics' ``parse_model`` runs ``eval(yaml["activation"])`` and calls the object each
    layer names (any global of ``ultralytics.nn.tasks``); only a torch.nn class with literal
    arguments, and layers that are ``nn.Module`` classes, are let through.
    """
    from torch import nn

    if not isinstance(yaml, dict):
        return f"its model yaml is a {type(yaml).__name__}, not a mapping"
    act = yaml.get("activation")
    if act is not None and not _literal_nn_call(act):
        return f"its model yaml sets activation={_short(act)}, not a torch.nn class with literal arguments"
    layers = yaml.get("backbone"), yaml.get("head")
    if not all(isinstance(part, list) for part in layers):
        return "its model yaml has no backbone and head layer lists"
    for i, layer in enumerate([*layers[0], *layers[1]]):
        if not (isinstance(layer, (list, tuple)) and len(layer) == 4 and isinstance(layer[2], str)):
            return f"its model yaml's layer {i} is not [from, repeats, module, args]"
        cls = _layer_class(layer[2])
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            return f"its model yaml's layer {i} names {_short(layer[2])}, which is not a model layer"
    return None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
