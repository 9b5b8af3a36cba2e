"""The check vocabulary of params.yaml, the one builder that applies it, and the params-file
plumbing (reading the file, dotted keys).

Each config field carries its own rule: ``bits: int = param(4, IntRange(2, 8))`` is
``field(default=4, metadata=check(IntRange(2, 8)))``.  A rule takes the raw value and returns it
typed, or raises :class:`Invalid` with what is allowed.  :func:`build` reads a mapping into any
config dataclass: unknown keys, each field's rule, nested sections, then the class's
``cross_check`` (rules that tie fields together, raising :class:`Conflict`).  Every failure is
one :class:`ConfigError` line naming the dotted key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from yoloqat.errors import ConfigError

CHECK = "check"  # the dataclass field metadata key of a field's rule
SECTION_RULE = "a mapping of keys (leave the section out for its defaults)"


class Invalid(Exception):
    """A value a rule refuses (reported as the value given, converted where the rule did)."""

    def __init__(self, value: Any, allowed: str) -> None:
        super().__init__(allowed)
        self.value, self.allowed = value, allowed


class Conflict(Exception):
    """A field's value that a config's ``cross_check`` refuses given the other fields."""

    def __init__(self, name: str, allowed: str) -> None:
        super().__init__(allowed)
        self.name, self.allowed = name, allowed


def fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"params: {key}={value!r} is not allowed; expected {allowed}")


def check(rule: Any) -> dict[str, Any]:
    """Field metadata holding ``rule``."""
    return {CHECK: rule}


def param(default: Any, rule: Any) -> Any:
    """A config field with its default and its rule."""
    return dataclasses.field(default=default, metadata=check(rule))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _range_text(
    lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False
) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    return "" if hi is None else f" <= {hi}"


@dataclass(frozen=True)
class Choice:
    options: tuple[Any, ...]

    def __call__(self, value: Any, root: Path) -> Any:
        if value not in self.options:
            raise Invalid(value, "one of " + " | ".join(map(str, self.options)))
        return value


@dataclass(frozen=True)
class Bool:
    def __call__(self, value: Any, root: Path) -> bool:
        if not isinstance(value, bool):
            raise Invalid(value, "true or false")
        return value


@dataclass(frozen=True)
class IntRange:
    lo: int | None = None
    hi: int | None = None

    def __call__(self, value: Any, root: Path) -> int:
        if (
            not _is_int(value)
            or (self.lo is not None and value < self.lo)
            or (self.hi is not None and value > self.hi)
        ):
            raise Invalid(value, "an integer" + _range_text(self.lo, self.hi))
        return value


@dataclass(frozen=True)
class Multiple:
    """An integer multiple of ``step`` in [lo, hi]; ``why`` names where the step comes from."""

    step: int
    lo: int
    hi: int
    why: str

    def __call__(self, value: Any, root: Path) -> int:
        if not _is_int(value) or not self.lo <= value <= self.hi or value % self.step:
            raise Invalid(
                value, f"a multiple of {self.step} ({self.why}) in [{self.lo}, {self.hi}]"
            )
        return value


_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


@dataclass(frozen=True)
class FloatRange:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __call__(self, value: Any, root: Path) -> float:
        # `dvc exp run -S qat.dampening=1e-5` writes `1e-05`, which PyYAML (YAML 1.1) reads as a
        # string: a float without a dot
        if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
            value = float(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
            ok = math.isfinite(value)
            if ok and self.lo is not None:
                ok = value > self.lo if self.lo_open else value >= self.lo
            if ok and self.hi is not None:
                ok = value < self.hi if self.hi_open else value <= self.hi
        if not ok:
            bound = _range_text(self.lo, self.hi, self.lo_open, self.hi_open)
            raise Invalid(value, "a finite number" + bound)
        return value


@dataclass(frozen=True)
class Optional:
    """null, or what ``rule`` allows; ``allowed`` replaces the rule's text when given."""

    rule: Any
    allowed: str | None = None

    def __call__(self, value: Any, root: Path) -> Any:
        if value is None:
            return None
        try:
            return self.rule(value, root)
        except Invalid as bad:
            raise Invalid(bad.value, self.allowed or bad.allowed) from None


@dataclass(frozen=True)
class Either:
    """One of the ``literals`` (a YAML ``false``, ``auto``...) or, given a ``rule``, what it allows."""

    literals: tuple[Any, ...]
    allowed: str
    rule: Any = None

    def __call__(self, value: Any, root: Path) -> Any:
        # identity, not equality: `0 in (False, ...)` would accept 0 for false
        if any(value is lit or (isinstance(value, str) and value == lit) for lit in self.literals):
            return value
        try:
            if self.rule is not None:
                return self.rule(value, root)
        except Invalid:
            pass
        raise Invalid(value, self.allowed)


@dataclass(frozen=True)
class Loose:
    """The value as given (a YAML ``1e-05`` string read as the number it is), for a field whose
    allowed values depend on others: its class's ``cross_check`` judges it."""

    def __call__(self, value: Any, root: Path) -> Any:
        if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
            return float(value)
        return value


@dataclass(frozen=True)
class Text:
    def __call__(self, value: Any, root: Path) -> str:
        return str(value)


@dataclass(frozen=True)
class OptionalPath:
    """A path (relative to the params file's folder) that must exist, or null / ''."""

    def __call__(self, value: Any, root: Path) -> str | None:
        if value in (None, ""):
            return None
        if not isinstance(value, str):
            raise Invalid(value, "a path string or null")
        if not (root / value).expanduser().exists():
            raise Invalid(value, "an existing path (not found)")
        return value


@dataclass(frozen=True)
class NameOrPath:
    """One of ``names``, or a path to an existing ``what``."""

    names: tuple[str, ...]
    what: str

    def __call__(self, value: Any, root: Path) -> str:
        names = " | ".join(self.names)
        if not isinstance(value, str) or not value:
            raise Invalid(value, f"{names} | a path to a {self.what}")
        if value not in self.names and not (root / value).expanduser().exists():
            raise Invalid(value, f"{names} | a path to an existing {self.what}")
        return value


@dataclass(frozen=True)
class Distinct:
    """A list without repeats, kept as a tuple in its order: of ``items`` (a tuple of names, or
    ``int``), ``required`` among them; null is the empty list where that is allowed."""

    items: tuple[str, ...] | type
    non_empty: bool = False
    required: str | None = None

    def allowed(self) -> str:
        if self.items is int:
            return f"a {'non-empty ' if self.non_empty else ''}list of distinct integers"
        text = "a list of " + " | ".join(self.items) + " without repeats"
        if self.required:
            return text + f", including {self.required}"
        return text if self.non_empty else text + " (or [])"

    def __call__(self, value: Any, root: Path) -> tuple[Any, ...]:
        may_be_empty = not self.non_empty and self.required is None
        if value is None and may_be_empty:
            return ()
        ok = isinstance(value, (list, tuple)) and all(
            _is_int(v) if self.items is int else (isinstance(v, str) and v in self.items)
            for v in value
        )
        ok = ok and len(set(value)) == len(value) and (may_be_empty or bool(value))
        if not ok or (self.required is not None and self.required not in value):
            raise Invalid(value, self.allowed())
        return tuple(value)


# the forms of ``device`` a stage accepts (pipeline/devices.py checks the machine has it)
FORMS = "cpu, a CUDA index N, a list N,M, cuda, cuda:N or mps"
_INDICES = re.compile(r"\d+(,\d+)*")
_CUDA_INDEX = re.compile(r"cuda(:\d+)?")


def parse_device(value: str) -> tuple[str, tuple[int, ...]] | None:
    """``("cpu", ())``, ``("mps", ())`` or ``("cuda", indices)`` for an allowed form, else None."""
    text = str(value).strip().lower().replace(" ", "")
    if text in ("cpu", "mps"):
        return text, ()
    if _CUDA_INDEX.fullmatch(text):
        return "cuda", (int(text[5:]) if ":" in text else 0,)
    if _INDICES.fullmatch(text):
        indices = tuple(int(i) for i in text.split(","))
        if len(set(indices)) == len(indices):
            return "cuda", indices
    return None


@dataclass(frozen=True)
class Device:
    """``device``: cpu, a CUDA index or a list of them (a YAML integer becomes its string).
    Whether this machine has it is the stage's check (pipeline/devices.py)."""

    def __call__(self, value: Any, root: Path) -> str:
        if _is_int(value):
            value = str(value)
        if not isinstance(value, str) or not value:
            raise Invalid(value, "cpu, a CUDA index such as 0, or a list such as 0,1")
        return value


# --------------------------------------------------------------------------------------------
# the builder


def is_section(f: dataclasses.Field) -> bool:
    return dataclasses.is_dataclass(f.default_factory)


def parse_field(cls: type, name: str, value: Any, root: Path, prefix: str = "") -> Any:
    """``value`` through the rule of ``cls``'s field ``name``; one line naming ``prefix + name``."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    try:
        return f.metadata[CHECK](value, root)
    except Invalid as bad:
        raise fail(prefix + name, bad.value, bad.allowed) from None


def build(cls: type, raw: Any, root: Path = Path("."), prefix: str = "") -> Any:
    """An instance of the config dataclass ``cls`` read from the mapping ``raw``.

    Its params are the fields with a rule and the nested sections (other fields, such as
    ``root``, keep their default); a key ``raw`` omits takes the field's default, checked like a
    given value.  ``prefix`` is the dotted path of ``raw`` (``qat.``); ``root`` is the folder
    relative paths are checked in."""
    if not isinstance(raw, dict):
        raise fail(prefix.rstrip("."), raw, SECTION_RULE)
    params = [f for f in dataclasses.fields(cls) if CHECK in f.metadata or is_section(f)]
    known = sorted(f.name for f in params)
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"params: unknown key {prefix}{key}; allowed keys are " + ", ".join(known)
            )
    values = {}
    for f in params:
        if is_section(f):
            values[f.name] = build(
                f.default_factory, raw.get(f.name, {}), root, f"{prefix}{f.name}."
            )
        else:
            values[f.name] = parse_field(cls, f.name, raw.get(f.name, f.default), root, prefix)
    made = cls(**values)
    if hasattr(made, "cross_check"):
        try:
            made.cross_check()
        except Conflict as bad:
            raise fail(prefix + bad.name, getattr(made, bad.name), bad.allowed) from None
    return made


# --------------------------------------------------------------------------------------------
# params files and dotted keys


def read_mapping(path: Path) -> dict[str, Any]:
    """The mapping a params file holds; one line when it is missing, not YAML or not a mapping."""
    if not path.is_file():
        raise ConfigError(f"params: file {str(path)!r} not found; expected a params.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"params: {str(path)!r} is not valid YAML ({first})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"params: {str(path)!r} must hold a mapping of keys")
    return raw


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for i, p in enumerate(parents):
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise fail(".".join(parents[: i + 1]), node, SECTION_RULE)
    node[leaf] = value


MISSING = object()  # get_dotted's answer for a key that is not there


def get_dotted(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node
