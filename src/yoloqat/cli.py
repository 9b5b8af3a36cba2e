"""The ``yoloqat`` console script.

* ``yoloqat judge PATH... [--json] [--params P]``: verdicts of training curves
  (:mod:`yoloqat.judge`).
* ``yoloqat ladder [--json] [--queue-next] [--dry-run] [--from-json FILE] [--params P]
  [--no-report]``: this repo's DVC experiments grouped by model and method, the rung
  decision for yolo10n -> yolo10s -> yolo10m, reports under ``reports/ladder/``, and
  optionally the next rung's grid queued with ``dvc exp run --queue``.
* ``yoloqat archive EXP... --to reports/<study>/runs/``: one JSON file per experiment (params,
  metrics, curves) that ``ladder``, ``search`` and ``remedies`` read with ``--from`` instead of
  DVC (:mod:`yoloqat.analysis.archive`).
* ``yoloqat repairs --from DIR``: every curve of archived runs, judged, with endpoints.
* ``yoloqat bnre-images CKPT... --data DATASET.yaml``: checkpoints scored after BN
  re-estimation on three image sets (:mod:`yoloqat.analysis.bnre_images`).

Errors are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from yoloqat.errors import YoloqatError
from yoloqat.paths import LADDER_REPORTS


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _ladder_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="yoloqat ladder",
        description="Group this repo's DVC experiments by model and method, decide which rung "
        "of yolo10n -> yolo10s -> yolo10m is next, and write reports/ladder/.",
    )
    ap.add_argument("--json", action="store_true", help="print the table and decision as JSON")
    ap.add_argument("--queue-next", action="store_true",
                    help="queue the next rung's missing seeds (ema=true qc=true: one run gives "
                    "the live and EMA curves and the QC delta) with dvc exp run --queue")
    ap.add_argument("--dry-run", action="store_true",
                    help="with --queue-next: print the dvc command instead of running it")
    ap.add_argument("--from-json", metavar="FILE",
                    help="read a saved `dvc exp show --json` instead of running dvc")
    _from_archive(ap)
    ap.add_argument("--params", default="params.yaml",
                    help="params file with the ladder block (default: params.yaml)")
    ap.add_argument("--no-report", action="store_true", help="do not write reports/ladder/")
    ap.add_argument("--repo", default=".", help="the DVC repo (default: the current directory)")
    ap.add_argument("--out", default=None,
                    help="report folder (default: <repo>/reports/ladder, written only for models "
                    "with DVC experiments; a folder given here is written from whatever is found)")
    ap.add_argument("--all", dest="all_commits", action="store_true",
                    help="experiments of every commit (dvc exp show -A); default: of HEAD only")
    return ap


def _from_archive(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--from", dest="archive", metavar="DIR", action="append",
                    help="read the runs archived in DIR by `yoloqat archive` (params, metrics, "
                         "curves) instead of this repo's DVC experiments; repeat to read "
                         "several folders")


def ladder_main(argv: list[str]) -> int:
    from yoloqat.analysis.exp_curves import run_curves
    from yoloqat.analysis.experiments import load_runs
    from yoloqat.analysis.ladder import decide, ladder_settings, queue_next
    from yoloqat.analysis.ladder_groups import committed_report_models, group_runs
    from yoloqat.analysis.ladder_tables import format_table, ladder_json

    args = _ladder_parser().parse_args(argv)
    repo = Path(args.repo)
    params = Path(args.params)
    if not params.is_absolute() and not params.is_file() and (repo / params).is_file():
        params = repo / params
    quiet = args.json  # keep stdout pure JSON
    messages: list[str] = []
    try:
        ladder_cfg, configured = ladder_settings(params)
        records = load_runs(repo, args.from_json, args.archive, all_commits=args.all_commits)
        rows = group_runs(records, lambda rec: run_curves(rec, repo))
        decision = decide(rows, ladder_cfg, configured)
        models, left_out = None, []
        if not args.no_report and not args.out:  # never replace committed evidence from commits
            models, left_out = committed_report_models(records, rows, repo / LADDER_REPORTS)
        from yoloqat.analysis import endpoint_table

        ends = endpoint_table.ladder_tables(rows, endpoint_table.default_reader(repo))
        if args.json:
            print(json.dumps({**ladder_json(rows, decision),
                              "endpoints": endpoint_table.ladder_json(ends)}, indent=2))
        else:
            print(format_table(rows) if rows else "no runs found")
            print()
            if ends:  # per setting: endpoints of every curve, paired to live by seed
                print(endpoint_table.ladder_text(ends))
                print()
            print("\n".join(decision.lines()))
        # archived runs are another study's evidence: written only where --out says
        archived_only = args.archive and not args.out
        if archived_only and not args.no_report:
            messages.append("reports: not written for archived runs (--from); pass --out DIR")
        if not args.no_report and not archived_only:
            from yoloqat.analysis.report import write_reports

            out = Path(args.out) if args.out else repo / LADDER_REPORTS
            written = write_reports(rows, decision, out, repo=repo, models=models)
            messages.append(f"reports: {len(written)} files in {out}")
            if left_out:
                messages.append(f"reports: {', '.join(left_out)} not written: no DVC experiments "
                                "of it, only git commits (pass --out DIR to write it there)")
        if args.queue_next:
            queue_next(decision, repo, dry_run=args.dry_run,
                       echo=(messages.append if quiet else print))
    except (YoloqatError, OSError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"yoloqat ladder: error: {msg}", file=sys.stderr)
        return 2
    for m in messages:
        print(m, file=sys.stderr if quiet else sys.stdout)
    return 0


def _exps_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="yoloqat exps",
                 description="One compact line per DVC experiment (fits in 160 columns).")
    ap.add_argument("--repo", default=".", help="the DVC repo (default: the current directory)")
    ap.add_argument("--from-json", metavar="FILE",
                    help="read a saved `dvc exp show --json` instead of running dvc")
    ap.add_argument("--all", dest="all_commits", action="store_true",
                    help="experiments of every commit (dvc exp show -A); default: of HEAD only")
    return ap


def exps_main(argv: list[str]) -> int:
    from yoloqat.analysis.experiments import read_experiments
    from yoloqat.analysis.exps import format_exps

    args = _exps_parser().parse_args(argv)
    try:
        records = read_experiments(args.repo, args.from_json, all_commits=args.all_commits)
    except (YoloqatError, OSError) as exc:
        print(f"yoloqat exps: error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(format_exps(records))
    return 0


# committed reports: written only when every experiment asked for is found (search.find_named)
SEARCH_OUT, REMEDIES_OUT = "reports/failure_search", "reports/remedies"


def _report_options(ap: argparse.ArgumentParser, out: str, title: str) -> argparse.ArgumentParser:
    ap.add_argument("--out", default=None,
                    help=f"output folder (default: {out}, written only when every named experiment "
                    "is found; a folder given here is written with the ones found)")
    ap.add_argument("--title", default=title, help="the report's heading")
    ap.add_argument("--repo", default=".", help="the DVC repo (default: the current directory)")
    ap.add_argument("--from-json", metavar="FILE",
                    help="read a saved `dvc exp show --json` instead of running dvc")
    _from_archive(ap)
    return ap


def _write_report(prog: str, write: Callable[[], tuple[Any, str]]) -> int:
    """Run a report writer: its table on stdout, or one error line and exit 2."""
    try:
        report, table = write()
    except (YoloqatError, OSError) as exc:
        print(f"{prog}: error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(table)
    print(f"wrote {report} and {report.parent / 'curves.png'}")
    return 0


def _search_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="yoloqat search",
                 description="Tabulate and plot single experiments of a failure search "
                             "(README.md + curves.png in --out).")
    ap.add_argument("names", nargs="+", metavar="NAME", help="DVC experiment names, in table order")
    return _report_options(ap, SEARCH_OUT, "Failure search")


def search_main(argv: list[str]) -> int:
    from yoloqat.analysis.experiments import load_runs
    from yoloqat.analysis.search import find_named, write_search_report

    args = _search_parser().parse_args(argv)

    def write() -> tuple[Any, str]:
        found, missing = find_named(load_runs(args.repo, args.from_json, args.archive), args.names,
                                    args.out, SEARCH_OUT)
        return write_search_report(Path(args.out or SEARCH_OUT), found, args.repo, args.title,
                                   missing=missing)

    return _write_report("yoloqat search", write)


def _remedies_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="yoloqat remedies",
                 description="Judge and plot one curve of a group of seed runs per variant "
                             "(README.md + curves.png in --out).")
    ap.add_argument("--variant", action="append", required=True, metavar="LABEL=CURVE:EXP,EXP,...",
                    help="a table row: its label, the curve judged (live | ema | bnre, or a repair "
                         "curve such as ema_qc, live_bnre) and the "
                         "DVC experiments (one per seed); repeat for every row")
    return _report_options(ap, REMEDIES_OUT, "Remedies")


def remedies_main(argv: list[str]) -> int:
    from yoloqat.analysis.experiments import load_runs
    from yoloqat.analysis.remedies import parse_variant, write_remedies_report
    from yoloqat.analysis.search import find_named

    args = _remedies_parser().parse_args(argv)

    def write() -> tuple[Any, str]:
        variants = [parse_variant(v) for v in args.variant]
        names = list(dict.fromkeys(n for v in variants for n in v.names))
        found, _ = find_named(load_runs(args.repo, args.from_json, args.archive), names,
                              args.out, REMEDIES_OUT)
        return write_remedies_report(Path(args.out or REMEDIES_OUT), variants,
                                     {r.name: r for r in found}, args.repo, args.title,
                                     args.archive or ())

    return _write_report("yoloqat remedies", write)


def _archive_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="yoloqat archive",
                 description="Write one small JSON file per DVC experiment (resolved params, every "
                             "stage's metrics, every DVCLive curve) into --to, for ladder / search "
                             "/ remedies --from; nothing is written unless every experiment is "
                             "known and finished.")
    ap.add_argument("names", nargs="+", metavar="EXP", help="DVC experiment names")
    ap.add_argument("--to", required=True, metavar="DIR",
                    help="the archive folder, e.g. reports/<study>/runs (created if missing)")
    ap.add_argument("--repo", default=".", help="the DVC repo (default: the current directory)")
    return ap


def archive_main(argv: list[str]) -> int:
    from yoloqat.analysis.archive import MAX_BYTES, archive_runs

    args = _archive_parser().parse_args(argv)
    try:
        written = archive_runs(args.names, args.to, args.repo)
    except (YoloqatError, OSError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"yoloqat archive: error: {msg}", file=sys.stderr)
        return 2
    for path, size in written:
        print(f"wrote {path} ({size / 1000:.1f} kB)")
        if size > MAX_BYTES:
            print(f"yoloqat archive: warning: {path} is {size / 1000:.0f} kB, over the "
                  f"{MAX_BYTES // 1000} kB an archive file is meant to stay under", file=sys.stderr)
    return 0


def repairs_main(argv: list[str]) -> int:
    from yoloqat.analysis.repair_report import table_from_archive

    ap = argparse.ArgumentParser(
        prog="yoloqat repairs",
        description="Every QAT curve of archived runs (live, EMA, each repair of each model), "
                    "judged with the current rules from the end of warm-up, with its endpoints.")
    ap.add_argument("--from", dest="archive", required=True, metavar="DIR",
                    help="a folder of `yoloqat archive` files, e.g. reports/collapse_repairs/runs")
    ap.add_argument("--out", metavar="FILE", help="also write the markdown table here")
    ap.add_argument("--decay-plot", metavar="PATH.png",
                    help="also plot the learned-scale shrink, the BN mismatch and mAP of the runs "
                    "that logged mechanism metrics against cumulative lr x wd x steps, with the "
                    "plotted points in PATH.csv and a row per run in PATH.md beside it (into an "
                    "existing folder)")
    args = ap.parse_args(argv)
    try:
        table = table_from_archive(args.archive)
        if args.decay_plot:
            from yoloqat.analysis.archive_reader import read_archive
            from yoloqat.analysis.decay_plot import write_decay_plot

            png, table_csv, summary = write_decay_plot(args.decay_plot, read_archive(args.archive))
            print(f"yoloqat repairs: wrote {png}, {table_csv} and {summary}", file=sys.stderr)
        if args.out:
            Path(args.out).write_text(table)
    except (YoloqatError, OSError) as exc:
        print(f"yoloqat repairs: error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(table, end="")
    return 0


def bnre_images_main(argv: list[str]) -> int:
    from yoloqat.analysis.bnre_images import IMAGE_SETS, bnre_images_table, probe_checkpoint

    ap = _Parser(
        prog="yoloqat bnre-images",
        description="Score saved QAT checkpoints as saved and after BN re-estimation on each of "
                    f"{', '.join(IMAGE_SETS)} images of the training split (the same number of "
                    "batches each), with the validator the training curves use.")
    ap.add_argument("checkpoints", nargs="+", metavar="CKPT.qat.pt")
    ap.add_argument("--data", required=True, metavar="DATASET.yaml",
                    help="the dataset the checkpoints were trained on, e.g. data/prepared/dataset.yaml")
    ap.add_argument("--imgsz", type=int, default=96, help="the run's data.imgsz (default 96)")
    ap.add_argument("--batch", type=int, default=8, help="the run's qat.batch (default 8)")
    ap.add_argument("--batches", type=int, default=50,
                    help="re-estimation batches per image set (default 50: qat.repair_bn_batches)")
    ap.add_argument("--mosaic", type=float, default=0.0,
                    help="the run's qat.mosaic, for the augmented set (default 0)")
    ap.add_argument("--out", metavar="FILE", help="also write the markdown table here")
    args = ap.parse_args(argv)
    for name in ("imgsz", "batch", "batches"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.mosaic <= 1.0:
        ap.error(f"--mosaic must be in [0, 1], got {args.mosaic}")
    if not Path(args.data).is_file():
        ap.error(f"--data {args.data!r} is not a file")
    try:
        rows = [probe_checkpoint(Path(c), args.data, args.imgsz, args.batch, args.batches,
                                 args.mosaic) for c in args.checkpoints]
    except (YoloqatError, OSError) as exc:
        print(f"yoloqat bnre-images: error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    table = bnre_images_table(rows)
    if args.out:
        Path(args.out).write_text(table)
    print(table, end="")
    return 0


def _main_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="yoloqat",
        description="EMA + Quantization Correction for W4A16 QAT of YOLOv10: stability tools.",
    )
    sub = ap.add_subparsers(dest="command",
                            metavar="{exps,judge,ladder,search,remedies,archive,repairs,bnre-images}")
    sub.add_parser("exps", help="one compact line per DVC experiment (yoloqat exps -h)",
                   add_help=False)
    sub.add_parser("judge", help="label training curves stable / collapsed / ... "
                   "(yoloqat judge -h for its options)", add_help=False)
    sub.add_parser("ladder", help="group experiments, decide the next rung, write reports "
                   "(yoloqat ladder -h)", add_help=False)
    sub.add_parser("search", help="table + curves of single runs of a failure search "
                   "(yoloqat search -h)", add_help=False)
    sub.add_parser("remedies", help="per variant, one curve of a group of seed runs judged and "
                   "plotted (yoloqat remedies -h)", add_help=False)
    sub.add_parser("archive", help="one JSON file per experiment (params, metrics, curves) for "
                   "--from (yoloqat archive -h)", add_help=False)
    sub.add_parser("repairs", help="every repair curve of archived runs, judged, with endpoints "
                   "(yoloqat repairs -h)", add_help=False)
    sub.add_parser("bnre-images", help="checkpoints scored after BN re-estimation on each of "
                   "three image sets (yoloqat bnre-images -h)", add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "judge":
            from yoloqat.analysis.judge import judge_main

            return judge_main(argv[1:])
        if argv and argv[0] == "ladder":
            return ladder_main(argv[1:])
        if argv and argv[0] == "exps":
            return exps_main(argv[1:])
        if argv and argv[0] == "search":
            return search_main(argv[1:])
        if argv and argv[0] == "remedies":
            return remedies_main(argv[1:])
        if argv and argv[0] == "archive":
            return archive_main(argv[1:])
        if argv and argv[0] == "repairs":
            return repairs_main(argv[1:])
        if argv and argv[0] == "bnre-images":
            return bnre_images_main(argv[1:])
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    ap = _main_parser()
    if not argv or argv[0] in ("-h", "--help"):
        ap.print_help(sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    print(f"yoloqat: error: unknown command {argv[0]!r}; expected exps, judge, ladder, search, remedies, "
          "archive, repairs or bnre-images",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
