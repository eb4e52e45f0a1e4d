"""``lookalike``: the one command-line entry point (``.venv/bin/lookalike``)."""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import requests
from tqdm import tqdm

from lookalike.config import ENCODER_FOR_MODALITY, QUEUE, Settings, SettingsError
from lookalike.encoders import load_encoder
from lookalike.encoders.shipped import shipped_path
from lookalike.index.catalogue import CATALOGUE_FILE, Catalogue
from lookalike.ops.demo import sample_labels, show_example, store_samples
from lookalike.ops.stack import SOURCE_ROOT, Stack, StackConfig, write_configs
from lookalike.orthanc.client import HttpOrthanc, OrthancError, get_json
from lookalike.query.audit import show
from lookalike.worker.backfill import (Backfill, BackfillReport, Checkpoint, RemotePacs, StudyFilter, local_studies,
                                        remote_walk)
from lookalike.worker.celery_app import make_app

DEFAULT_STATE = SOURCE_ROOT / "var"
DEFAULT_STACK_CONFIG = SOURCE_ROOT / "deploy" / "local" / "stack.json"
SAMPLES = SOURCE_ROOT / "deploy" / "samples"


def _settings(args: argparse.Namespace) -> Settings:
    path = args.config or (DEFAULT_STATE / "lookalike.json")
    if not Path(path).exists():
        sys.exit(f"lookalike: no settings at {path}; start the stack with `make run` or pass --config")
    return Settings.load(path)


def _api(settings: Settings):
    return HttpOrthanc(settings.orthanc_url, settings.orthanc_user, settings.orthanc_password)


def cmd_lookup(args: argparse.Namespace) -> int:
    api = _api(_settings(args))
    try:
        answer = get_json(api, f"/lookalike/studies/{args.study}/similar?limit={args.limit}")
    except OrthancError as exc:
        print(f"lookalike: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        status, code = get_json(_api(settings), "/lookalike/status"), 0
    except (OrthancError, requests.RequestException) as exc:  # the index's own state still shows below
        status, code = {"error": f"the plugin's status is unavailable: {exc}"}, 1
    status["index_segments"] = _index_layout(settings)
    print(json.dumps(status, indent=2))
    return code


def _has_index(settings: Settings) -> bool:
    """Whether the index folder on this host holds a catalogue (what ``status`` and ``compact`` open)."""
    return (Path(settings.index_dir) / CATALOGUE_FILE).exists()


def _index_layout(settings: Settings) -> list[dict]:
    """Per index, read from the index folder on this host: segments, vectors, storage, merges still pending."""
    from lookalike.index.store import IndexStore  # FAISS only where the index is opened

    if not _has_index(settings):
        return []
    # No prefetch: a report has no lookups to warm up, and would read the whole index into the page cache.
    with IndexStore.from_settings(settings, readonly=True, prefetch=False) as store:
        return store.layout()


def cmd_compact(args: argparse.Namespace) -> int:
    from lookalike.index.store import IndexStore  # FAISS only where the index is opened

    settings = _settings(args)
    if not _has_index(settings):
        print(f"lookalike compact: no index at {settings.index_dir}", file=sys.stderr)
        return 1
    print(f"lookalike compact: merging the segments of {settings.index_dir} and rewriting any not in"
          f" {settings.index_storage} (index_storage); waits for a merge the worker has under way, and lookups and"
          " indexing go on meanwhile", file=sys.stderr)
    # Beside a running worker: each merge takes the write lock only to swap its segment in (compact.lock orders
    # the merges of both processes).
    with IndexStore.from_settings(settings, background_compaction=False) as store:
        merges = store.compact(settle=True, convert=True)
        print(json.dumps({"merges": merges, "index_segments": store.layout()}, indent=2))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    return show(args.file or _settings(args).audit_log, args.since)


def cmd_query_scp(args: argparse.Namespace) -> int:
    from lookalike.query.query_scp import serve  # here, not above: FAISS only in the query service's process

    return serve(_settings(args), args.logfile)


def cmd_run(args: argparse.Namespace) -> int:
    config = StackConfig.load_or_create(args.stack_config, args.state)
    config.move_taken_ports()  # held by another program since they were saved: moved before anything is printed
    # Supervised: Redis, the worker and the query endpoint are restarted whenever they exit; Orthanc keeps running.
    stack = Stack(config, supervise=True)
    print(f"lookalike: starting Redis :{config.redis_port}, Orthanc :{config.http_port} (DICOM :{config.dicom_port}), worker")
    print(f"lookalike: logs in {config.logs}")
    print(f"lookalike: {config.dicom_access(args.stack_config)}")
    settings = config.settings()
    callers = ", ".join(f"{aet} from {' '.join(hosts)}" for aet, hosts in settings.query_allowed.items())
    print(f"lookalike: DICOM query endpoint {settings.query_aet} on :{config.query_port} (C-FIND similar studies,"
          f" C-MOVE, C-ECHO) answers {callers}, and the REST routes' lookups on {settings.lookup_socket};"
          f" audit trail {settings.audit_log}")
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    with stack:
        if config.moved_ports:
            config.save(args.stack_config)
            print(f"lookalike: {', '.join(config.moved_ports)} held by another program; now Orthanc"
                  f" :{config.http_port} (DICOM :{config.dicom_port}), Redis :{config.redis_port}, query endpoint"
                  f" :{config.query_port}, saved in {args.stack_config}")
        if not args.no_samples:
            try:
                store_samples(stack, sorted(SAMPLES.glob("*.dcm")))
                show_example(stack, sample_labels(SAMPLES / "index.csv"))
            except (OSError, RuntimeError, requests.RequestException) as exc:  # TimeoutError is an OSError
                print(f"lookalike: the sample studies could not be shown ({exc}); Orthanc keeps running,"
                      f" see {config.logs / 'supervisor.log'}", file=sys.stderr)
        print(f"\nOrthanc Explorer: {config.orthanc_url}/app/explorer.html  user admin, password {config.admin_password}")
        print(f"From a workstation: findscu -S -aet FINDSCU -aec {settings.query_aet} -k QueryRetrieveLevel=STUDY"
              f" -k StudyInstanceUID=UID -k StudyDate -k StudyDescription 127.0.0.1 {config.query_port}")
        print("Ctrl-C stops Redis, Orthanc, the worker and the query endpoint.")
        while not stopping:  # the stack's supervisor thread restarts whatever exits; what it missed is caught up
            time.sleep(0.5)
    print("lookalike: stopped")
    return 0


def cmd_configure(args: argparse.Namespace) -> int:
    config = StackConfig.load_or_create(args.stack_config, args.state)
    for path in write_configs(config):
        print(path)
    print(f"lookalike: Orthanc HTTP :{config.http_port}, DICOM :{config.dicom_port}, query endpoint"
          f" :{config.query_port}, Redis :{config.redis_port}; admin password in {args.stack_config}", file=sys.stderr)
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    settings = _settings(args)
    api = _api(settings)
    which = StudyFilter(tuple(args.modality or ENCODER_FOR_MODALITY), args.date_from, args.date_to)
    report = BackfillReport()
    source = f"remote-{args.remote}" if args.remote else "local"
    if args.remote:
        # Orthanc answers a C-MOVE once it is over: a whole study must fit in the HTTP timeout.
        mover = HttpOrthanc(settings.orthanc_url, settings.orthanc_user, settings.orthanc_password,
                            timeout=args.move_timeout)
        pacs = RemotePacs(mover, args.remote, args.target_aet or get_json(api, "/system")["DicomAet"])
        remote = pacs.studies(which)
        ids, total = remote_walk(api, pacs, remote, report, dry_run=args.dry_run), len(remote)
    else:
        ids = local_studies(api, which)
        total = len(ids)
    checkpoint = (Checkpoint(args.checkpoint) if args.checkpoint
                  else Checkpoint.default(Path(settings.index_dir), f"{source}-{which.key()}"))
    catalogue = Catalogue(Path(settings.index_dir) / CATALOGUE_FILE, readonly=True)
    app = make_app(settings)

    def send(name: str, task_args: list, kwargs: dict) -> None:
        app.send_task(name, args=task_args, kwargs=kwargs, queue=QUEUE)

    backfill = Backfill(api, catalogue, send, checkpoint, batch=args.batch, rate=args.rate,
                        settle_timeout=args.settle_timeout)
    print(f"lookalike: backfill of {total} {source} studies ({', '.join(which.modalities)}"
          f"{', dates ' + which.study_date if which.study_date else ''}); checkpoint {checkpoint.path}"
          f"{'; dry run: nothing is queued' if args.dry_run else ''}", file=sys.stderr)
    with tqdm(total=total, unit="study", desc="backfill", file=sys.stderr) as bar:
        backfill.run(ids, dry_run=args.dry_run, progress=bar, report=report)
    print(json.dumps(report.as_dict(), indent=2))
    return 1 if report.waiting or report.incomplete else 0


def cmd_reindex(args: argparse.Namespace) -> int:
    from lookalike.index.store import IndexStore  # here and below, not above: FAISS only where a reindex runs
    from lookalike.worker.reindex import ReindexRefused, reindex

    settings = _settings(args)
    own = settings.weights.get(args.encoder, "")
    weights = str(Path(args.model).resolve()) if args.model else ""
    if weights and not own and Path(weights) == shipped_path(args.encoder).resolve():
        weights = ""  # recorded as "the shipped file", so that the next release's file is not taken for this model
    model_version = load_encoder(args.encoder, weights or own or None).model_version
    app = make_app(settings)

    def send(name: str, task_args: list, kwargs: dict) -> None:
        app.send_task(name, args=task_args, kwargs=kwargs, queue=QUEUE)

    print(f"lookalike: re-indexing {args.encoder} with {model_version} ({weights or own or 'shipped'}); lookups keep"
          " the current model until every instance has its new vector", file=sys.stderr)
    with IndexStore.from_settings(settings) as store:
        default_weights = own
        # With no active model recorded, the settings' checkpoint is the active one.
        default_model = ("" if store.catalogue.active_model(args.encoder)
                         else load_encoder(args.encoder, default_weights or None).model_version)
        try:
            report = reindex(_api(settings), store, send, args.encoder, model_version, weights,
                             default_weights=default_weights, default_model=default_model, batch=args.batch,
                             rate=args.rate,
                             progress=lambda n: tqdm(total=n, unit="instance", desc="reindex", file=sys.stderr))
        except ReindexRefused as exc:
            print(f"lookalike reindex: refused, nothing done: {exc}", file=sys.stderr)
            return 2
    print(json.dumps(report.as_dict(), indent=2))
    return 0 if report.switched else 1


def _passthrough(module: str) -> Callable[[list[str]], int]:
    """A sub-command that hands its arguments to the ``main`` of the module that owns the task."""

    def run(argv: list[str]) -> int:
        return importlib.import_module(module).main(argv) or 0

    return run


#: Sub-commands whose own argument parser lives with the code (``lookalike train --help``).
PASSTHROUGH = {
    "train": ("train an encoder", _passthrough("lookalike.lab.train")),
    "samples": ("rebuild the bundled sample studies", _passthrough("lookalike.lab.samples")),
    "evaluate": ("retrieval figures of an encoder under the evaluation protocol", _passthrough("lookalike.lab.evaluate")),
    "embed": ("embed the images of a manifest into a .npy", _passthrough("lookalike.lab.embed")),
    "lesions": ("lesion box of each ultrasound image of a manifest into a CSV", _passthrough("lookalike.lab.lesions")),
    "train-lesions": ("train the ultrasound lesion finder", _passthrough("lookalike.lab.lesion_training")),
    "check": ("decode DICOM files as the worker would and say what happens to each", _passthrough("lookalike.ops.check")),
    "calibrate": ("measure an encoder's similarity floor on validation data, stored beside its weights",
                  _passthrough("lookalike.lab.calibration")),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lookalike", description=__doc__)
    parser.add_argument("--config", help="settings JSON (default: var/lookalike.json of `make run`)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="start Redis, Orthanc with the plugin and a worker; store the sample studies")
    p.add_argument("--state", type=Path, default=DEFAULT_STATE, help="where data and logs go")
    p.add_argument("--stack-config", type=Path, default=DEFAULT_STACK_CONFIG, help="ports and generated credentials")
    p.add_argument("--no-samples", action="store_true", help="do not store the bundled sample studies")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("lookup", help="most similar other studies of an Orthanc study")
    p.add_argument("study", help="Orthanc study id")
    p.add_argument("--limit", type=int, default=10)
    p.set_defaults(func=cmd_lookup)

    p = sub.add_parser("status", help="what is indexed, queued and failed; the index's segments, storage and pending"
                       " merges")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("compact", help="merge the index's segments now and rewrite those not in index_storage (safe"
                       " beside a running worker)")
    p.set_defaults(func=cmd_compact)

    p = sub.add_parser("audit", help="who looked up which study, and what came back (JSON lines)")
    p.add_argument("--since", help="only entries at or after this: an ISO date or time (UTC), or an age: 30m, 2h, 7d")
    p.add_argument("--file", help="the audit file (default: audit_log of the settings)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("query-scp", help="the DICOM query endpoint (C-FIND similar studies, C-MOVE, C-ECHO)")
    p.add_argument("--logfile", help="log here instead of to standard error")
    p.set_defaults(func=cmd_query_scp)

    p = sub.add_parser("reindex", help="embed everything again with a new checkpoint, then switch lookups to it")
    p.add_argument("--encoder", required=True, choices=("us", "xr"))
    p.add_argument("--model", help="the new checkpoint (lookalike train --out); default the settings' one, the shipped"
                   " file unless `weights` names another (after an update: the newer shipped model)")
    p.add_argument("--batch", type=int, default=32, help="instances queued before waiting for the worker")
    p.add_argument("--rate", type=float, default=20.0, help="instances queued per second at most")
    p.set_defaults(func=cmd_reindex)

    p = sub.add_parser("configure", help="write the configuration files the service units read; start nothing")
    p.add_argument("--state", type=Path, default=DEFAULT_STATE, help="where data, logs and the files go")
    p.add_argument("--stack-config", type=Path, default=DEFAULT_STACK_CONFIG, help="ports and generated credentials")
    p.set_defaults(func=cmd_configure)

    p = sub.add_parser("backfill", help="index an existing archive: this Orthanc's studies, or a remote PACS's")
    p.add_argument("--remote", metavar="MODALITY", help="a remote PACS known to Orthanc (DicomModalities): C-FIND"
                   " its studies, C-MOVE them into Orthanc, index them")
    p.add_argument("--target-aet", help="AE title the remote PACS moves to (default: this Orthanc's)")
    p.add_argument("--move-timeout", type=float, default=3600.0, help="seconds one study's C-MOVE may take")
    p.add_argument("--modality", action="append", choices=("US", "DX", "CR"), help="repeat for several (default: all)")
    p.add_argument("--from", dest="date_from", default="", metavar="YYYYMMDD", help="first study date")
    p.add_argument("--to", dest="date_to", default="", metavar="YYYYMMDD", help="last study date")
    p.add_argument("--batch", type=int, default=32, help="most instances left to the worker at once")
    p.add_argument("--rate", type=float, default=20.0, help="instances queued per second at most")
    p.add_argument("--settle-timeout", type=float, default=600.0, help="seconds to wait for one batch")
    p.add_argument("--checkpoint", type=Path, help="resume file (default: under the index folder, per filter)")
    p.add_argument("--dry-run", action="store_true", help="say what would be done; queue and move nothing")
    p.set_defaults(func=cmd_backfill)

    for name, (help_text, _) in PASSTHROUGH.items():
        sub.add_parser(name, help=f"{help_text} (`lookalike {name} --help`)", add_help=False)

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH:
        return PASSTHROUGH[argv[0]][1](argv[1:])
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SettingsError as exc:  # a mistyped key in stack.json or a settings file: named, at start
        print(f"lookalike: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
