"""The committed repair-curve table is regenerated from the committed archive, byte for byte."""

from __future__ import annotations

from tests.helpers import REPO
from yoloqat.analysis.repair_report import table_from_archive
from yoloqat.cli import main

STUDY = REPO / "reports" / "collapse_repairs"


def test_regenerate_the_committed_repair_table_from_its_archive_byte_for_byte():
    assert table_from_archive(STUDY / "runs") == (STUDY / "table.md").read_text()


def test_repairs_command_prints_the_table_and_refuses_a_missing_folder_in_one_line(tmp_path, capsys):
    assert main(["repairs", "--from", str(STUDY / "runs"), "--out", str(tmp_path / "t.md")]) == 0
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "t.md").read_text() == (STUDY / "table.md").read_text()
    assert "| cc-rep-s0 | EMA+QC |" in printed
    assert main(["repairs", "--from", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("yoloqat repairs: error: --from ")
