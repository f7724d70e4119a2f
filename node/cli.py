"""``ctnode``: run the node, process files offline, inspect results and jobs."""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from pathlib import Path

from node.config import ROLES, ConfigError, Settings, load_settings
from node.logredact import install_log_redaction


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "config", None) or os.environ.get("CTNODE_CONFIG"))


def _sessions(settings: Settings):
    from node.db import open_database

    return open_database(settings.storage.database_url)


def cmd_serve(args: argparse.Namespace) -> int:
    from node.service import Node

    settings = _settings(args)
    if args.roles:
        roles = [r.strip() for r in args.roles.split(",") if r.strip()]
        unknown = sorted(set(roles) - set(ROLES)) or ([] if roles else ["(none)"])
        if unknown:
            raise ConfigError(f"--roles: unknown role {unknown[0]!r} (known: {', '.join(ROLES)})")
        settings.node.roles = roles
    Node(settings).serve_forever()
    return 0


def cmd_process(args: argparse.Namespace) -> int:
    from node.processing import analyse_with, write_outputs
    from node.results import process_report

    src = Path(args.path)
    paths = sorted(p for p in (src.rglob("*") if src.is_dir() else [src]) if p.is_file())
    if not paths:
        print(f"no files under {src}", file=sys.stderr)
        return 2
    settings = _settings(args)
    analysis = analyse_with(settings.processing, paths, engine=args.engine, lobe_maps=args.lobe_seg or [])
    out = write_outputs(analysis, Path(args.out)) if analysis.status == "done" else {}
    report = process_report(analysis, out)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))
    return 0 if analysis.status in ("done", "skipped") else 1


def cmd_results(args: argparse.Namespace) -> int:
    from node import reports

    settings = _settings(args)
    sessions = _sessions(settings)
    with sessions() as session:
        if args.action == "list":
            print(reports.results_table(session))
        elif args.action == "show":
            text = reports.result_text(session, args.job, settings.files)
            if text is None:
                print(f"no job {args.job}", file=sys.stderr)
                return 1
            print(text)
        elif args.action == "export":
            rows = reports.result_rows(session)
            out = open(args.csv, "w", newline="") if args.csv and args.csv != "-" else sys.stdout
            writer = csv.DictWriter(out, fieldnames=reports.CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
            if out is not sys.stdout:
                out.close()
                print(f"{len(rows)} rows written to {args.csv}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from node import reports

    settings = _settings(args)
    sessions = _sessions(settings)
    if args.action == "list":
        with sessions() as session:
            print(reports.jobs_table(session))
        return 0
    with sessions.begin() as session:
        n = reports.retry(session, args.id)
    print(f"{n} export(s)/job(s) queued again")
    return 0 if n else 1


def cmd_echo(args: argparse.Namespace) -> int:
    from node.config import Transport
    from node.exporters.cstore import echo

    settings = _settings(args)
    dests = {d.name: d for d in settings.destinations}
    if args.dest not in dests:
        print(f"unknown destination {args.dest!r}; configured: {', '.join(dests) or 'none'}", file=sys.stderr)
        return 2
    if dests[args.dest].transport != Transport.DIMSE:
        print(f"destination {args.dest!r} uses {dests[args.dest].transport}: C-ECHO is for DIMSE destinations",
              file=sys.stderr)
        return 2
    outcome = echo(settings, dests[args.dest])
    print(f"C-ECHO {args.dest}: {'success' if outcome.ok else 'FAILED: ' + outcome.error}")
    return 0 if outcome.ok else 1


def cmd_db(args: argparse.Namespace) -> int:
    from node.db import upgrade

    settings = _settings(args)
    upgrade(settings.storage.database_url)
    print("database schema is up to date")
    return 0


def cmd_phantom(args: argparse.Namespace) -> int:
    from node.phantom import make_phantom, save_ground_truth, write_phantom_study

    phantom = make_phantom(rows=args.size, cols=args.size, slices=args.slices, seed=args.seed, burden=args.burden)
    out = Path(args.out)
    files = write_phantom_study(phantom, out / "dicom")
    truth = save_ground_truth(phantom, out)
    print(f"{len(files)} CT instances in {out / 'dicom'}; ground truth in {truth}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from node.demo import run_demo

    return run_demo(size=args.size, slices=args.slices, out=Path(args.out) if args.out else None,
                    engine=args.engine)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # Accepted before or after the sub-command: `ctnode --config F serve` and `ctnode serve --config F`.
    common.add_argument("--config", default=argparse.SUPPRESS,
                        help="TOML configuration file (default: $CTNODE_CONFIG, else built-in defaults)")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    parser = argparse.ArgumentParser(prog="ctnode", description=__doc__, parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: _add_parser(*a, parents=[common], **k)  # type: ignore[method-assign]

    p = sub.add_parser("serve", help="run the DICOM listener, scheduler and workers")
    p.add_argument("--roles", "--role", help="comma-separated: listener, worker, exporter (overrides node.roles; "
                   "default: all three)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("process", help="run the pipeline offline on a folder of DICOM files")
    p.add_argument("path")
    p.add_argument("--out", required=True, help="folder for the SEG, SR and report.json")
    p.add_argument("--engine", help="override processing.engine")
    p.add_argument("--lobe-seg", action="append", metavar="SEG",
                   help="a DICOM SEG of the lung lobes of the series: the zones become lobes (repeatable)")
    p.set_defaults(func=cmd_process)

    p = sub.add_parser("results", help="list, show or export results")
    p.add_argument("action", choices=["list", "show", "export"])
    p.add_argument("job", nargs="?", type=int, help="job id (for show)")
    p.add_argument("--csv", default="-", help="CSV file for export (default: standard output)")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("jobs", help="list jobs and exports, retry a failed job or dead exports")
    p.add_argument("action", choices=["list", "retry"])
    p.add_argument("id", nargs="?", type=int, help="job id (for retry)")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("echo", help="C-ECHO a configured destination")
    p.add_argument("dest")
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser("db", help="database maintenance")
    p.add_argument("action", choices=["upgrade"])
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("phantom", help="write a procedural chest CT study and its ground-truth masks")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--slices", type=int, default=240)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--burden", type=float, default=0.15)
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("demo", help="start a node, send it a phantom study, wait for the SEG and SR")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--slices", type=int, default=240)
    p.add_argument("--engine", default="auto", help="auto (default: infnet when its weights load), infnet or threshold")
    p.add_argument("--out", help="keep the demo's files here (default: a temporary folder)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    install_log_redaction()  # warnings into logging; patient values out of every record (node.logredact)
    for noisy in ("apscheduler", "alembic"):  # a line per scheduler tick / per migration plugin otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
