"""No file the project reads runs code: payload pickles and payload model yamls, through every
loader and every stage input that names a checkpoint, against the installed torch's messages."""

from __future__ import annotations

import builtins
import copy
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from yoloqat.offline import configure_offline

configure_offline()

from ultralytics.nn.tasks import DetectionModel

from tests.helpers import default_params
from yoloqat.errors import CheckpointError
from yoloqat.quant.checkpoint import (
    check_start_checkpoint,
    load_qat_checkpoint,
    load_ultralytics_model,
    save_qat_checkpoint,
)
from yoloqat.quant.convert import QuantRecipe, quantize_model
from yoloqat.quant.safeload import (
    LoadFailed,
    LoadRefused,
    model_yaml_problem,
    referenced_globals,
    weights_only_load,
)

REPO = Path(__file__).resolve().parents[1]
TORCH_ADVICE = ("weights_only set to False", "weights_only` set to `False", "Re-running",
                "add_safe_globals", "trusted source")


class ExecPayload:
    """Unpickling it calls ``builtins.exec`` on code that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


class SystemPayload:
    """Unpickling it runs ``os.system("touch marker")`` (GLOBAL posix.system)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def payload_file(path: Path, payload: object) -> Path:
    """A file that claims the project's format and carries ``payload``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "yoloqat-qat-v1", "x": payload}, path)
    return path


def no_advice(msg: str) -> None:
    assert "\n" not in msg
    for words in TORCH_ADVICE:
        assert words not in msg, msg


@pytest.fixture(scope="module")
def yolo():
    torch.manual_seed(0)
    return DetectionModel("yolov10n.yaml", nc=6, verbose=False).eval()


# --------------------------------------------------------------------------------------------
# the payloads are real: the full unpickler runs them


@pytest.mark.parametrize("kind", [ExecPayload, SystemPayload])
def test_the_payloads_do_run_under_the_full_unpickler(tmp_path, kind):
    marker = tmp_path / "marker"
    path = payload_file(tmp_path / "evil.qat.pt", kind(marker))
    torch.load(path, weights_only=False)
    assert marker.exists()


# --------------------------------------------------------------------------------------------
# the loaders


@pytest.mark.parametrize(("kind", "global_name"), [(ExecPayload, "builtins.exec"),
                                                   (SystemPayload, "posix.system")])
def test_every_loader_refuses_a_payload_naming_the_global(tmp_path, kind, global_name):
    marker = tmp_path / "marker"
    path = payload_file(tmp_path / "received.qat.pt", kind(marker))
    with pytest.raises(LoadRefused) as err:
        weights_only_load(path)
    assert str(err.value) == f"unsupported GLOBAL {global_name}"
    with pytest.raises(CheckpointError) as err:
        load_qat_checkpoint(path)
    assert str(err.value) == (
        f"checkpoint {str(path)!r} holds more than weights and was not loaded "
        f"(weights-only load refused: unsupported GLOBAL {global_name})"
    )
    no_advice(str(err.value))
    for key in ("qat.init", "fp.init_checkpoint"):
        with pytest.raises(CheckpointError) as err:
            check_start_checkpoint(path, key, "received.qat.pt")
        assert str(err.value) == (
            f"params: {key}='received.qat.pt' is not allowed; expected an Ultralytics YOLO .pt "
            f"checkpoint (weights-only load refused: unsupported GLOBAL {global_name})"
        )
    with pytest.raises(CheckpointError) as err:
        load_ultralytics_model(path, "FP checkpoint")
    assert str(err.value) == (
        f"FP checkpoint {str(path)!r} is not allowed "
        f"(weights-only load refused: unsupported GLOBAL {global_name})"
    )
    assert not marker.exists()


def test_the_refusal_is_the_unpicklers_reason_not_torchs_advice(tmp_path):
    """The installed torch wraps the reason in advice to retry with weights_only=False."""
    path = payload_file(tmp_path / "last.qat.pt", SystemPayload(tmp_path / "marker"))
    with pytest.raises(pickle.UnpicklingError) as raw:
        torch.load(path, weights_only=True)
    assert "Re-running" in str(raw.value)  # what the line must not repeat
    with pytest.raises(CheckpointError) as err:
        load_qat_checkpoint(path)
    assert "unsupported GLOBAL posix.system" in str(err.value)
    no_advice(str(err.value))


def test_a_plain_pickle_is_refused_quietly_naming_what_it_calls(tmp_path, capfd):
    marker = tmp_path / "marker"
    path = tmp_path / "plain.qat.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "yoloqat-qat-v1", "x": SystemPayload(marker)}, f, protocol=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError) as err:
            load_qat_checkpoint(path)
        with pytest.raises(CheckpointError) as err2:
            check_start_checkpoint(path, "qat.init", "plain.qat.pt")
    assert [str(w.message) for w in caught] == []  # torch's protocol warning is silenced
    assert "UserWarning" not in capfd.readouterr().err
    assert str(err.value) == (
        f"checkpoint {str(path)!r} holds more than weights and was not loaded (weights-only load "
        "refused: a plain pickle (protocol 4), not a torch.save file; it names posix.system)"
    )
    assert str(err2.value).endswith(
        "(weights-only load refused: a plain pickle (protocol 4), not a torch.save file; it names "
        "posix.system)"
    )
    assert not marker.exists()
    # the silencing is local to these loads
    with pytest.warns(UserWarning, match="Detected pickle protocol 4"), \
            pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_files_that_are_not_checkpoints_get_the_readers_reason(tmp_path):
    notes = tmp_path / "notes.pt"
    notes.write_text("# my notes\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    script = tmp_path / "script.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(script))
    cases = ((notes, "invalid load key, '#'"), (empty, "the file is empty"),
             (script, "a TorchScript archive, not a torch.save checkpoint"))
    for path, reason in cases:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(LoadFailed) as failed:
                weights_only_load(path)
            with pytest.raises(CheckpointError) as err:
                load_qat_checkpoint(path)
        assert str(failed.value) == reason
        assert str(err.value) == f"checkpoint {str(path)!r} is unreadable or corrupt ({reason})"
        assert [str(w.message) for w in caught] == []


def test_referenced_globals_reads_without_running(tmp_path):
    marker = tmp_path / "marker"
    zipped = payload_file(tmp_path / "a.pt", ExecPayload(marker))
    assert referenced_globals(zipped) == ["builtins.exec"]
    plain = tmp_path / "b.pkl"
    plain.write_bytes(pickle.dumps([SystemPayload(marker), ExecPayload(marker)], protocol=4))
    assert referenced_globals(plain) == ["posix.system", "builtins.exec"]
    assert not marker.exists()


def test_a_qat_checkpoint_named_as_ultralytics_start_points_to_its_baked_copy(tmp_path, yolo):
    model = quantize_model(copy.deepcopy(yolo), QuantRecipe())
    qat_path, baked_path = save_qat_checkpoint(model, QuantRecipe(), tmp_path / "shared", {},
                                               {i: str(i) for i in range(6)})
    with pytest.raises(CheckpointError) as err:
        check_start_checkpoint(qat_path, "qat.init", "shared.qat.pt")
    assert str(err.value) == (
        "params: qat.init='shared.qat.pt' is not allowed; expected an Ultralytics YOLO .pt "
        "checkpoint (a yoloqat QAT checkpoint; its baked copy shared.pt is the Ultralytics one)"
    )
    check_start_checkpoint(baked_path, "qat.init", "shared.pt")  # the baked copy passes
    load_qat_checkpoint(qat_path)


# --------------------------------------------------------------------------------------------
# model yamls: Ultralytics' parse_model eval()s the activation


def _evil_activation(marker: Path) -> str:
    return f"__import__('builtins').open({str(marker)!r}, 'w') and __import__('torch').nn.SiLU()"


def test_a_yaml_activation_does_run_when_ultralytics_builds_the_model(tmp_path, yolo):
    marker = tmp_path / "marker"
    evil = copy.deepcopy(yolo.yaml)
    evil["activation"] = _evil_activation(marker)
    try:
        DetectionModel(evil, nc=6, verbose=False)
    finally:
        from ultralytics.nn.modules import Conv

        Conv.default_act = torch.nn.SiLU()  # parse_model left the payload's activation there
    assert marker.exists()


def test_model_yaml_problem(yolo):
    assert model_yaml_problem(yolo.yaml) is None
    for act in ("nn.SiLU()", "torch.nn.LeakyReLU(0.1)", "nn.LeakyReLU(negative_slope=0.2)"):
        assert model_yaml_problem({**yolo.yaml, "activation": act}) is None, act
    assert model_yaml_problem({**yolo.yaml, "activation": "eval('1')"}) == (
        "its model yaml sets activation=\"eval('1')\", not a torch.nn class with literal arguments"
    )
    assert model_yaml_problem({**yolo.yaml, "activation": "nn.SiLU(x)"}) is not None
    layer = ["-1", 1, "torch_safe_load", ["evil.pt"]]  # a function of ultralytics.nn.tasks
    assert model_yaml_problem({**yolo.yaml, "head": [*yolo.yaml["head"], layer]}) == (
        f"its model yaml's layer {len(yolo.yaml['backbone']) + len(yolo.yaml['head'])} names "
        "'torch_safe_load', which is not a model layer"
    )
    assert model_yaml_problem("yolov10n.yaml") == "its model yaml is a str, not a mapping"


def test_a_qat_checkpoint_whose_yaml_runs_code_is_refused(tmp_path, yolo):
    marker = tmp_path / "marker"
    model = quantize_model(copy.deepcopy(yolo), QuantRecipe())
    qat_path, _ = save_qat_checkpoint(model, QuantRecipe(), tmp_path / "good", {}, {0: "a"})
    payload = torch.load(qat_path, weights_only=True)
    payload["yaml"]["activation"] = _evil_activation(marker)
    torch.save(payload, tmp_path / "evil.qat.pt")  # weights-only clean: only strings changed
    with pytest.raises(CheckpointError) as err:
        load_qat_checkpoint(tmp_path / "evil.qat.pt")
    assert str(err.value).startswith(
        f"checkpoint {str(tmp_path / 'evil.qat.pt')!r} was not loaded: its model yaml sets "
        "activation=\"__import__('builtins').open("
    )
    assert str(err.value).endswith("not a torch.nn class with literal arguments")
    assert not marker.exists()


def test_an_ultralytics_checkpoint_whose_yaml_runs_code_is_refused(tmp_path, yolo):
    """It passes the restricted load; the trainer would then build from its yaml."""
    marker = tmp_path / "marker"
    model = copy.deepcopy(yolo)
    model.yaml["activation"] = _evil_activation(marker)
    torch.save({"model": None, "ema": model}, tmp_path / "evil.pt")
    for key in ("qat.init", "fp.init_checkpoint"):
        with pytest.raises(CheckpointError, match=r"its model yaml sets activation=") as err:
            check_start_checkpoint(tmp_path / "evil.pt", key, "evil.pt")
        assert str(err.value).startswith(f"params: {key}='evil.pt' is not allowed; expected an ")
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# every stage input that names a checkpoint, end to end


def _params(root: Path, **changes) -> Path:
    raw = default_params()
    raw["fp"]["control"] = False  # export's FP input is models/fp/best.pt
    for dotted, value in changes.items():
        block, key = dotted.split(".")
        raw[block][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root / "params.yaml"


REFUSED = "(weights-only load refused: unsupported GLOBAL builtins.exec)"
EXPECTED_CKPT = "expected an Ultralytics YOLO .pt checkpoint " + REFUSED
CASES = {
    # stage, params changes, where the payload file is, the line after "<stage>: error: "
    "qat.init": (
        "qat", {"qat.init": "received.qat.pt"}, "received.qat.pt",
        "params: qat.init='received.qat.pt' is not allowed; " + EXPECTED_CKPT,
    ),
    "fp.init_checkpoint": (
        "train_fp", {"fp.init_checkpoint": "received.qat.pt"}, "received.qat.pt",
        "params: fp.init_checkpoint='received.qat.pt' is not allowed; " + EXPECTED_CKPT,
    ),
    "qat.init=fp": (
        "qat", {}, "models/fp/best.pt",
        "FP checkpoint 'models/fp/best.pt' is not allowed " + REFUSED,
    ),
    "fp_control": (
        "fp_control", {"fp.control": True}, "models/fp/best.pt",
        "FP checkpoint 'models/fp/best.pt' is not allowed " + REFUSED,
    ),
    "qc": (
        "qc", {}, "models/qat/last.qat.pt",
        "checkpoint 'models/qat/last.qat.pt' holds more than weights and was not loaded " + REFUSED,
    ),
    "export qc input": (
        "export", {}, "models/qc/best.qat.pt",
        "checkpoint '{root}/models/qc/best.qat.pt' holds more than weights and was not loaded "
        + REFUSED,
    ),
    "export fp input": (
        "export", {}, "models/fp/best.pt",
        "FP checkpoint '{root}/models/fp/best.pt' is not allowed " + REFUSED,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_no_stage_runs_a_payload_and_each_says_why_in_one_line(tmp_path, yolo, case):
    stage, changes, where, expected = CASES[case]
    root = tmp_path / "repo"
    root.mkdir()
    (root / "data/prepared").mkdir(parents=True)
    (root / "data/prepared/dataset.yaml").write_text("path: .\ntrain: x\nval: x\nnames: {0: a}\n")
    (root / "models/fp").mkdir(parents=True)
    torch.save({"model": None, "ema": yolo}, root / "models/fp/best.pt")  # a good FP checkpoint
    marker = tmp_path / "marker"
    payload_file(root / where, ExecPayload(marker))
    params = _params(root, **changes)
    res = subprocess.run(
        [sys.executable, str(REPO / "stages" / f"{stage}.py"), "--params", str(params)],
        check=False, capture_output=True, text=True, cwd=root, timeout=300,
    )
    assert res.returncode == 2, res.stderr
    assert not marker.exists()
    assert "Traceback" not in res.stderr and "UserWarning" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith(f"{stage}:")]
    assert lines == [f"{stage}: error: " + expected.format(root=root)]
    no_advice(lines[0])
