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

from lookalike.config import Settings
from lookalike.stack import SOURCE_ROOT

DEFAULT_STATE = SOURCE_ROOT / "var"
DEFAULT_STACK_CONFIG = SOURCE_ROOT / "deploy" / "local" / "stack.json"
SAMPLES = SOURCE_ROOT / "deploy" / "samples"


def _settings(args: argparse.Namespace) -> Settings:
    path = args.config or (DEFAULT_STATE / "lookalike.json")
    if not Path(path).exists():
        sys.exit(f"lookalike: no settings at {path}; start the stack with `make run` or pass --config")
    return Settings.load(path)


def _api(settings: Settings):
    from lookalike.orthanc_rest import HttpOrthanc

    return HttpOrthanc(settings.orthanc_url, settings.orthanc_user, settings.orthanc_password)


def cmd_lookup(args: argparse.Namespace) -> int:
    from lookalike.orthanc_rest import OrthancError, get_json

    api = _api(_settings(args))
    try:
        answer = get_json(api, f"/lookalike/studies/{args.study}/similar?limit={args.limit}")
    except OrthancError as exc:
        print(f"lookalike: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from lookalike.orthanc_rest import get_json

    print(json.dumps(get_json(_api(_settings(args)), "/lookalike/status"), indent=2))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from lookalike.indexer.audit import show

    return show(args.file or _settings(args).audit_log, args.since)


def cmd_query_scp(args: argparse.Namespace) -> int:
    from lookalike.indexer.query_scp import serve

    return serve(_settings(args), args.logfile)


def cmd_run(args: argparse.Namespace) -> int:
    from lookalike.stack import Stack, StackConfig
    from lookalike.demo import sample_labels, show_example, store_samples

    config = StackConfig.load_or_create(args.stack_config, args.state)
    stack = Stack(config)
    print(f"lookalike: starting Redis :{config.redis_port}, Orthanc :{config.http_port} (DICOM :{config.dicom_port}), worker")
    print(f"lookalike: logs in {config.logs}")
    print(f"lookalike: {config.dicom_access(args.stack_config)}")
    settings = config.settings()
    callers = ", ".join(f"{aet} from {' '.join(hosts)}" for aet, hosts in settings.query_allowed.items())
    print(f"lookalike: DICOM query endpoint {settings.query_aet} on :{config.query_port} (C-FIND similar studies,"
          f" C-MOVE, C-ECHO) answers {callers}; audit trail {settings.audit_log}")
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    with stack:
        if not args.no_samples:
            store_samples(stack, sorted(SAMPLES.glob("*.dcm")))
            show_example(stack, sample_labels(SAMPLES / "index.csv"))
        print(f"\nOrthanc Explorer: {config.orthanc_url}/app/explorer.html  user admin, password {config.admin_password}")
        print(f"From a workstation: findscu -S -aet FINDSCU -aec {settings.query_aet} -k QueryRetrieveLevel=STUDY"
              f" -k StudyInstanceUID=UID -k StudyDate -k StudyDescription 127.0.0.1 {config.query_port}")
        print("Ctrl-C stops Redis, Orthanc, the worker and the query endpoint.")
        while not stopping:
            supervise(stack, lambda: stopping)
            time.sleep(0.5)
    print("lookalike: stopped")
    return 0


def supervise(stack, stopping: Callable[[], bool]) -> None:
    """Start again whatever process of the stack died; the others, Orthanc above all, keep running.

    A PACS must keep accepting images when Lookalike's worker or Redis fails: each is restarted alone, and what
    it missed meanwhile is caught up from Orthanc's change log by the worker.
    """
    for name in stack.crashed():
        if stopping():
            return
        code = stack.procs[name].returncode
        print(f"lookalike: {name} exited with status {code}; restarting it (see {stack.config.logs})", file=sys.stderr)
        try:
            stack.restart(name)
        except (RuntimeError, TimeoutError) as exc:
            print(f"lookalike: {name} did not come back: {exc}; trying again", file=sys.stderr)


def _passthrough(module: str) -> Callable[[list[str]], int]:
    """A sub-command that hands its arguments to the ``main`` of the module that owns the task."""

    def run(argv: list[str]) -> int:
        return importlib.import_module(module).main(argv) or 0

    return run


#: Sub-commands whose own argument parser lives with the code (``lookalike train --help``).
PASSTHROUGH = {
    "train": ("train an encoder", _passthrough("lookalike.encoders.training")),
    "samples": ("rebuild the bundled sample studies", _passthrough("lookalike.dicom_io.samples")),
    "evaluate": ("retrieval figures of an encoder under the evaluation protocol", _passthrough("lookalike.encoders.evaluate")),
    "embed": ("embed the images of a manifest into a .npy", _passthrough("lookalike.encoders.embed")),
    "lesions": ("lesion box of each ultrasound image of a manifest into a CSV", _passthrough("lookalike.encoders.lesion")),
    "train-lesions": ("train the ultrasound lesion finder", _passthrough("lookalike.encoders.lesion_training")),
    "check": ("decode DICOM files as the worker would and say what happens to each", _passthrough("lookalike.dicom_io.check")),
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

    p = sub.add_parser("status", help="what is indexed, queued and failed")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("audit", help="who looked up which study, and what came back (JSON lines)")
    p.add_argument("--since", help="only entries at or after this: an ISO date or time (UTC), or an age: 30m, 2h, 7d")
    p.add_argument("--file", help="the audit file (default: audit_log of the settings)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("query-scp", help="the DICOM query endpoint (C-FIND similar studies, C-MOVE, C-ECHO)")
    p.add_argument("--logfile", help="log here instead of to standard error")
    p.set_defaults(func=cmd_query_scp)

    for name, (help_text, _) in PASSTHROUGH.items():
        sub.add_parser(name, help=f"{help_text} (`lookalike {name} --help`)", add_help=False)

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH:
        return PASSTHROUGH[argv[0]][1](argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
