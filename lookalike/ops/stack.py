"""Start and stop the whole stack on this machine: Redis, Orthanc with the plugin, and a Celery worker.

``lookalike run`` (behind ``make run``) and the end-to-end tests use the same code, so what the tests start is
what an administrator runs. Redis, PostgreSQL and the query endpoint listen on loopback; Orthanc 1.10 cannot be
bound to an address, so its HTTP and DICOM ports listen on every interface and refuse every peer that is not on
loopback (``orthanc_config``). Every log goes to ``<state>/logs``, owner-only.

``lookalike run`` supervises the processes (``Stack(config, supervise=True)``): Orthanc comes first and is the
only process whose failure at start is fatal; Redis, the query service and the workers are each restarted alone
with back-off whenever they exit, before or after they were ready, and one that keeps failing is reported in
``<state>/logs/supervisor.log`` and ``/lookalike/status``, never stopping the PACS.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis
import requests

from lookalike.config import EMBED_QUEUE, QUEUE, WRITE_QUEUE, Settings, SettingsError
from lookalike.query.lookup_service import LookupClient, LookupUnavailable

PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
#: The script Orthanc's Python plugin loads; it only puts the project on ``sys.path`` and registers callbacks.
PLUGIN_SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "orthanc" / "lookalike_plugin.py"
SOURCE_ROOT = PLUGIN_SCRIPT.parent.parent.parent
ORTHANC_AET = "ORTHANC"
#: AE titles allowed to talk DICOM to this Orthanc (DCMTK's defaults, on loopback).
KNOWN_MODALITIES = {"STORESCU": "STORESCU", "FINDSCU": "FINDSCU"}
#: Calling AE titles the DICOM query endpoint answers (DCMTK's findscu and movescu defaults, on loopback).
QUERY_CALLERS = ("FINDSCU", "MOVESCU")
#: Orthanc's PostgreSQL index plugin (Debian ``orthanc-postgresql``), used when ``orthanc_index`` is "postgresql".
POSTGRES_PLUGIN = PLUGIN_DIR / "libOrthancPostgreSQLIndex.so"
#: Name of Orthanc's database and of the role it logs in as, in the stack's own PostgreSQL cluster.
ORTHANC_DB = "orthanc"
#: PostgreSQL refuses to run as root: a stack started by root runs its cluster as this user (Debian's).
POSTGRES_SYSTEM_USER = "postgres"
#: The PACS itself: a failure to start these is fatal (nothing would run); any other process is a component,
#: restarted alone while they keep running.
ESSENTIAL = ("orthanc", "postgres")
#: Seconds the supervisor waits before restarting a component after its 1st, 2nd, ... exit in a row; the last
#: one repeats for as long as it keeps failing.
BACKOFF = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
#: Exits in a row after which a component is reported as failing (it is still restarted).
FAILING_AFTER = 3
#: A component that ran at least this many seconds before exiting starts its count of exits in a row again.
STABLE_AFTER = 60.0


def _ephemeral_ports() -> range:
    """The kernel's range for the local ports of outgoing connections (``ip_local_port_range``)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def free_port(preferred: int = 0) -> int:
    """A TCP port on loopback that nothing listens on right now: ``preferred`` if it is free.

    Probed as the servers bind (SO_REUSEADDR), so a port of ours that only has connections closing (TIME_WAIT)
    after a restart still counts as free and keeps its number. Other ports are drawn below the kernel's ephemeral
    range: a port from that range can become the local port of any client's outgoing connection between this probe
    and the server's bind (seen: Orthanc refusing to start on a port a test's HTTP client had just been given).
    """
    ephemeral = _ephemeral_ports()
    drawn = random.sample(range(20000, ephemeral.start), 64) if ephemeral.start > 20064 else []
    for port in ([preferred] if preferred else []) + drawn + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port on loopback")


def dcmtk_env() -> dict[str, str]:
    """Environment for Orthanc and DCMTK clients: without TCP_NODELAY, C-STORE crawls at ~11 instances/s."""
    return {**os.environ, "TCP_NODELAY": "1"}


@dataclass
class StackConfig:
    """Ports, credentials and folders of one stack; saved as JSON so that a restart reuses them."""

    state_dir: Path
    http_port: int
    dicom_port: int
    redis_port: int
    admin_password: str
    service_password: str
    #: The DICOM query endpoint's port (``lookalike query-scp``); 0 in a stack.json older than the endpoint.
    query_port: int = 0
    #: Redis's own password: the broker carries tasks that erase studies from the index (``forget``).
    redis_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    #: The secret the plugin shows the query service with each lookup (``Settings.lookup_secret``).
    lookup_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    stable_age: int = 2
    with_plugin: bool = True
    #: Encoder name -> checkpoint path, replacing the shipped weights (a hospital's own model).
    weights: dict[str, str] = field(default_factory=dict)
    extra_orthanc: dict = field(default_factory=dict)
    #: The site's own DICOM peers, beside KNOWN_MODALITIES: name -> [calling AE title, host, port].
    modalities: dict[str, list] = field(default_factory=dict)
    #: Settings fields that differ from the defaults (e.g. a short ``catch_up_interval`` in tests).
    extra_settings: dict = field(default_factory=dict)
    #: Orthanc's index: "sqlite" (Orthanc's own file beside its storage) or "postgresql": a PostgreSQL cluster of the
    #: stack's own (``<state>/postgres``, loopback, password) through Orthanc's PostgreSQL index plugin, for an
    #: archive that outgrows SQLite. The DICOM files stay on disk either way.
    orthanc_index: str = "sqlite"
    #: That cluster's port (0: none chosen yet) and the password of Orthanc's role in it.
    postgres_port: int = 0
    postgres_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    #: Addresses Redis listens on: loopback, and the index host's address on its workers' network when embedding
    #: workers run on other hosts (deploy/SCALE_OUT.md). Every client must give Redis's password.
    redis_bind: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    #: Ports changed at start because another program held them (not saved: the caller saves the config).
    moved_ports: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, state_dir: Path, **kw) -> "StackConfig":
        """New free ports and freshly generated passwords."""
        return cls(
            state_dir=Path(state_dir),
            http_port=kw.pop("http_port", None) or free_port(),
            dicom_port=kw.pop("dicom_port", None) or free_port(),
            redis_port=kw.pop("redis_port", None) or free_port(),
            query_port=kw.pop("query_port", None) or free_port(),
            postgres_port=kw.pop("postgres_port", None)
            or (free_port() if kw.get("orthanc_index") == "postgresql" else 0),
            admin_password=secrets.token_urlsafe(12),
            service_password=secrets.token_urlsafe(18),
            **kw,
        )

    @classmethod
    def load_or_create(cls, path: Path, state_dir: Path) -> "StackConfig":
        """The stack saved at ``path``, checked (an unknown key or setting is an error naming it); else a new one."""
        if path.exists():
            data = json.loads(path.read_text())
            unknown = sorted(set(data) - set(cls.__dataclass_fields__) - {"moved_ports"})
            if unknown:
                raise SettingsError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; known: "
                                    f"{', '.join(sorted(set(cls.__dataclass_fields__) - {'moved_ports'}))}")
            data["state_dir"] = Path(data["state_dir"])
            cfg = cls(**data)
            try:
                cfg.settings()
            except SettingsError as exc:
                raise SettingsError(f"{path}: extra_settings: {exc}") from None
            if "lookup_secret" not in data:  # a stack.json older than the lookup service: keep the new secret
                cfg.save(path)
            if cfg.query_port and (cfg.postgres_port or cfg.orthanc_index != "postgresql"):
                return cfg
            # Kept from now on, so that workstations keep finding the query endpoint.
            cfg.query_port = cfg.query_port or free_port(11112)
            if cfg.orthanc_index == "postgresql" and not cfg.postgres_port:  # just switched to PostgreSQL
                cfg.postgres_port = free_port(5432)
        else:
            # The usual ports of Orthanc, Redis and a DICOM query SCP where they are free: viewers find them.
            cfg = cls.create(state_dir, http_port=free_port(8042), dicom_port=free_port(4242),
                             redis_port=free_port(6379), query_port=free_port(11112))
        cfg.save(path)
        return cfg

    def save(self, path: Path) -> None:
        """Keep the ports and credentials (owner-only), so that a restart finds the same stack."""
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in self.__dict__.items() if k != "moved_ports"}
        write_owner_only(path, json.dumps({**data, "state_dir": str(self.state_dir)}, indent=2))

    def move_taken_ports(self) -> list[str]:
        """Replace each port that another program holds by a free one; the names of those moved."""
        moved = []
        for name in ("http_port", "dicom_port", "redis_port", "query_port", "postgres_port"):
            port = getattr(self, name)
            if port and free_port(port) != port:
                setattr(self, name, free_port())
                moved.append(name)
        self.moved_ports.extend(moved)
        return moved

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def postgres_dir(self) -> Path:
        """The PostgreSQL cluster's data folder (owned by the user the cluster runs as)."""
        return self.state_dir / "postgres" / "data"

    def dicom_modalities(self) -> dict[str, list]:
        """Orthanc's ``DicomModalities``: the only calling AE titles (and hosts) it lets store, query and echo."""
        return {**{name: [aet, "127.0.0.1", 104] for name, aet in KNOWN_MODALITIES.items()}, **self.modalities}

    def dicom_access(self, config_path: Path) -> str:
        """Who may talk DICOM to Orthanc and how to add one, for ``make run`` to print: Orthanc refuses any other
        calling AE title (``echoscu``'s default ECHOSCU too) and the caller sees no reason."""
        allowed = ", ".join(f"{aet} from {host}" for aet, host, *_ in self.dicom_modalities().values())
        return (f"Orthanc {ORTHANC_AET} on DICOM port :{self.dicom_port} accepts C-STORE, C-FIND and C-ECHO from {allowed}"
                f" only (e.g. echoscu -aet STORESCU -aec {ORTHANC_AET} 127.0.0.1 {self.dicom_port}); to add a peer, put"
                f' "modalities": {{"NAME": ["AE_TITLE", "host", port]}} in {config_path} and restart')

    @property
    def orthanc_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def components_file(self) -> Path:
        """The supervisor's view of each process (``lookalike run``), read by ``/lookalike/status``."""
        return self.state_dir / "components.json"

    def settings(self) -> Settings:
        """What the worker, the plugin and the command line need to find each other.

        ``extra_settings`` replace these values (a site's ``query_host`` and ``query_allowed`` let workstations
        query); an unknown setting or a value of the wrong type there is a :class:`SettingsError` naming it.
        """
        return Settings.from_dict({
            "orthanc_url": self.orthanc_url,
            "orthanc_user": "lookalike",
            "orthanc_password": self.service_password,
            "redis_url": f"redis://:{self.redis_password}@127.0.0.1:{self.redis_port}/0",
            "index_dir": str(self.state_dir / "index"),
            "weights": dict(self.weights),
            "audit_log": str(self.logs / "audit.jsonl"),
            "query_host": "127.0.0.1",
            "query_port": self.query_port,
            "query_allowed": {aet: ["127.0.0.1"] for aet in QUERY_CALLERS},
            "lookup_socket": str(self.state_dir / "lookup.sock"),
            "lookup_secret": self.lookup_secret,
            "components_file": str(self.components_file),
            **self.extra_settings,
        })

    def orthanc_config(self) -> dict:
        """Orthanc's configuration: authentication on, loopback only, the two plugins, our section."""
        plugins = [str(PLUGIN_DIR / "libOrthancDicomWeb.so")]
        cfg: dict = {
            "Name": "Lookalike",
            "StorageDirectory": str(self.state_dir / "orthanc-storage"),
            "IndexDirectory": str(self.state_dir / "orthanc-storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AET,
            "DicomCheckCalledAet": True,
            # Orthanc cannot bind to loopback: both ports listen on every interface. A DICOM peer is let in only
            # as one of DicomModalities, from that modality's host (loopback unless a site adds its own under
            # `modalities`); an HTTP client only from loopback (`"extra_orthanc": {"RemoteAccessAllowed": true}`
            # opens it to password holders elsewhere).
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowFindWorklist": False,
            "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": self.dicom_modalities(),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {"admin": self.admin_password, "lookalike": self.service_password},
            "StableAge": self.stable_age,
            "HttpTimeout": 30,
            # A re-sent instance replaces the stored one and is indexed again (in place: one entry)
            "OverwriteInstances": True,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "Plugins": plugins,
        }
        if self.orthanc_index == "postgresql":
            plugins.append(str(POSTGRES_PLUGIN))
            # Only the index moves to PostgreSQL (EnableStorage false: the DICOM files stay in StorageDirectory).
            # Several connections let Orthanc answer several workers' reads at once (plugin 4.0, Orthanc >= 1.9.2).
            cfg["PostgreSQL"] = {
                "EnableIndex": True, "EnableStorage": False, "Host": "127.0.0.1", "Port": self.postgres_port,
                "Database": ORTHANC_DB, "Username": ORTHANC_DB, "Password": self.postgres_password,
                "Lock": True, "EnableSsl": False, "IndexConnectionsCount": 4,
            }
        elif self.orthanc_index != "sqlite":
            raise ValueError(f"orthanc_index {self.orthanc_index!r}: 'sqlite' or 'postgresql'")
        if self.with_plugin:
            plugins.insert(0, str(PLUGIN_DIR / "libOrthancPython.so"))
            cfg["PythonScript"] = str(PLUGIN_SCRIPT)
            cfg["PythonVerbose"] = False
            # The plugin calls Orthanc in-process: the worker's Orthanc credentials stay out of its section.
            section = {k: v for k, v in self.settings().to_dict().items() if k not in ("orthanc_user", "orthanc_password")}
            cfg["Lookalike"] = {
                **section,
                "site_packages": sysconfig.get_paths()["purelib"],
                "source_root": str(SOURCE_ROOT),
            }
        cfg.update(self.extra_orthanc)
        return cfg


def redis_conf(cfg: StackConfig) -> str:
    """Redis's configuration: loopback (and ``redis_bind``), a password, an append-only file so queued tasks survive
    a restart."""
    return "\n".join([
        f"bind {' '.join(cfg.redis_bind)}", f"port {cfg.redis_port}", f"dir {cfg.state_dir / 'redis'}",
        "appendonly yes", 'save ""',
        f"logfile {cfg.logs / 'redis.log'}", f"requirepass {cfg.redis_password}", "",
    ])


@functools.cache
def postgres_program(name: str) -> str:
    """A PostgreSQL server program (``initdb``, ``postgres``, ``pg_isready``) of the newest version installed."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                   key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if not found:
        raise FileNotFoundError(f"no PostgreSQL {name} under /usr/lib/postgresql: run `make install`")
    return str(found[-1])


def _postgres_account() -> pwd.struct_passwd:
    """Who runs the stack's PostgreSQL cluster: the caller, or Debian's ``postgres`` user when the caller is root."""
    return pwd.getpwnam(POSTGRES_SYSTEM_USER) if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())


def as_postgres_account(argv: list[str]) -> list[str]:
    """``argv`` run as :func:`_postgres_account`: ``setpriv`` drops root and execs, so the process we hold (and
    signal) is PostgreSQL itself."""
    if os.geteuid() != 0:
        return argv
    account = _postgres_account()
    return ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--init-groups", "--", *argv]


def _let_postgres_reach(state_dir: Path, account: pwd.struct_passwd) -> None:
    """Root's stack: the cluster's user must pass through the state folder (o+x: it lists and reads nothing there,
    every file being owner-only) and every folder above it; say which folder stops it."""
    state_dir.chmod(state_dir.stat().st_mode & 0o777 | 0o001)
    groups = set(os.getgrouplist(account.pw_name, account.pw_gid))
    for folder in state_dir.resolve().parents:
        st = folder.stat()
        if not (st.st_mode & 0o001 or (st.st_uid == account.pw_uid and st.st_mode & 0o100)
                or (st.st_gid in groups and st.st_mode & 0o010)):
            raise RuntimeError(f"PostgreSQL runs as user {account.pw_name}, which cannot pass through {folder} to"
                               f" {state_dir}: choose a state folder it can reach, or give {folder} o+x")


def init_postgres(cfg: StackConfig) -> None:
    """The stack's PostgreSQL cluster: created once (Orthanc's role and database), its settings written every time.

    The cluster listens on 127.0.0.1 only, at ``postgres_port``, with no Unix socket, and lets in Orthanc's role
    alone, to its database, with its password (SCRAM): no client logs in as the superuser. Orthanc's role gets
    its password through the standard input of PostgreSQL's single-user mode, never a command line.
    """
    account = _postgres_account()
    root = cfg.postgres_dir.parent
    if os.geteuid() == 0:
        _let_postgres_reach(cfg.state_dir, account)
    root.mkdir(mode=0o700, exist_ok=True)
    os.chown(root, account.pw_uid, account.pw_gid)
    root.chmod(0o700)
    if not (cfg.postgres_dir / "PG_VERSION").exists():
        # Built aside, then renamed: a failed creation leaves no half-made cluster that a restart would take as done.
        fresh = root / "init"
        shutil.rmtree(fresh, ignore_errors=True)
        # initdb wants some authentication for the superuser; pg_hba.conf is replaced below all the same.
        _run_as_postgres([postgres_program("initdb"), "-D", str(fresh), "-U", "postgres", "--auth-local=peer",
                          "--auth-host=reject", "-E", "UTF8", "--locale=C"], root)
        _write_postgres_conf(cfg, fresh, account)
        with open(fresh / "postgresql.conf", "a") as fh:
            fh.write("include 'lookalike.conf'\n")
        # Who may log in: Orthanc's role, to its database, from loopback, with its password; no one else.
        (fresh / "pg_hba.conf").write_text(f"host {ORTHANC_DB} {ORTHANC_DB} 127.0.0.1/32 scram-sha-256\n")
        password = cfg.postgres_password.replace("'", "''")
        sql = (f"CREATE ROLE {ORTHANC_DB} LOGIN PASSWORD '{password}';\n"
               f"CREATE DATABASE {ORTHANC_DB} OWNER {ORTHANC_DB};\n")
        _run_as_postgres([postgres_program("postgres"), "--single", "-D", str(fresh), "postgres"], root, sql)
        fresh.rename(cfg.postgres_dir)
    _write_postgres_conf(cfg, cfg.postgres_dir, account)


def _run_as_postgres(argv: list[str], cwd: Path, stdin: str = "") -> None:
    """Run a PostgreSQL program to its end as the cluster's user; its error output in the exception if it fails
    (single-user mode reports a failed statement with ERROR and still exits 0)."""
    done = subprocess.run(as_postgres_account(argv), cwd=cwd, input=stdin, capture_output=True, text=True,
                          umask=0o077, timeout=120)
    if done.returncode != 0 or "ERROR:" in done.stderr:
        raise RuntimeError(f"{Path(argv[0]).name} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")


def _write_postgres_conf(cfg: StackConfig, data: Path, account: pwd.struct_passwd) -> None:
    conf = data / "lookalike.conf"
    conf.write_text("\n".join([
        "# Written by Lookalike at every start (its stack.json holds the port).", "listen_addresses = '127.0.0.1'",
        f"port = {cfg.postgres_port}", "unix_socket_directories = ''", "password_encryption = 'scram-sha-256'", "",
    ]))
    os.chown(conf, account.pw_uid, account.pw_gid)
    conf.chmod(0o600)


def open_owner_only(path: Path, mode: str = "ab"):
    """``open(path, mode)`` on a file only its owner may read or write, whatever the caller's umask (an existing
    file of an older version is closed to others too): logs and settings may hold PHI or secrets."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC), 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, mode)


def write_owner_only(path: Path, text: str) -> None:
    """Replace ``path``'s content by ``text``, owner-only (:func:`open_owner_only`)."""
    with open_owner_only(path, "w") as fh:
        fh.write(text)


def write_configs(cfg: StackConfig) -> tuple[Path, Path, Path]:
    """Write the folders and the three configuration files of a stack (owner-only): Lookalike's settings,
    Orthanc's configuration and Redis's; with ``orthanc_index`` "postgresql", the PostgreSQL cluster too.
    ``lookalike run`` starts from them; the service units in ``deploy/systemd`` read the same files, written by
    ``lookalike configure``."""
    cfg.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Others may not list or write the state folder (o+x stays where root's stack lets PostgreSQL's user through).
    cfg.state_dir.chmod(cfg.state_dir.stat().st_mode & 0o711)
    for sub in ("logs", "orthanc-storage", "index", "redis"):
        (cfg.state_dir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        (cfg.state_dir / sub).chmod(0o700)
    for log in cfg.logs.iterdir():  # logs an older version left readable by others (they may quote PHI)
        if log.is_file() and not log.is_symlink():
            log.chmod(log.stat().st_mode & 0o700)
    paths = (cfg.state_dir / "lookalike.json", cfg.state_dir / "orthanc.json", cfg.state_dir / "redis.conf")
    texts = (json.dumps(cfg.settings().to_dict(), indent=2), json.dumps(cfg.orthanc_config(), indent=2),
             redis_conf(cfg))
    for path, text in zip(paths, texts):
        write_owner_only(path, text)
    if cfg.orthanc_index == "postgresql":
        init_postgres(cfg)
    return paths


@dataclass
class Component:
    """What the supervisor knows of one process of the stack; :meth:`report` is what ``/lookalike/status`` shows."""

    #: "starting", "ready", "restarting" (waiting out its back-off) or "failing" (FAILING_AFTER exits in a row).
    state: str = "starting"
    restarts: int = 0
    exits_in_a_row: int = 0
    last_exit_status: int | None = None
    #: Wall-clock time of the last change of state (for a reader); monotonic times of the last start and next one.
    since: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    next_start: float = 0.0

    def report(self) -> dict:
        data = asdict(self)
        data["since"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since))
        return {k: v for k, v in data.items() if k not in ("started", "next_start")}


class Stack:
    """The running processes of one :class:`StackConfig`; a context manager that stops all it started.

    With ``supervise`` (``lookalike run``) a thread restarts every process that exits, with back-off, from the
    moment it is started: Orthanc is never stopped because another process failed, before or after it was ready.
    Without it (the tests, which kill and restart processes themselves) a process that fails at start is an error.
    """

    def __init__(self, config: StackConfig, *, worker: bool = True, supervise: bool = False) -> None:
        self.config = config
        self.with_worker = worker
        self.supervised = supervise
        self.procs: dict[str, subprocess.Popen] = {}
        self.components: dict[str, Component] = {}
        self._argv: dict[str, list[str]] = {}
        self._workers: dict[str, int] = {}  # worker name -> first line of its log written by the current process
        self._lock = threading.RLock()  # the supervisor thread and the caller both start and stop processes
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported: dict = {}

    # -- start -------------------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0, attempts: int = 3) -> "Stack":
        """Start every process and wait until each answers.

        A port is only known to be ours once our process has bound it: a port another program holds (now, or
        taken between this check and our process's bind) is replaced by a free one and the start tried again.
        ``config.moved_ports`` then names what changed, for the caller to save.
        """
        self.config.move_taken_ports()
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once(timeout)
            except RuntimeError:
                if attempt == attempts or not self.config.move_taken_ports():
                    raise
        return self

    def _start_once(self, timeout: float) -> "Stack":
        cfg = self.config
        settings_path, orthanc_json, self._redis_conf = write_configs(cfg)
        self.env = {**dcmtk_env(), "LOOKALIKE_CONFIG": str(settings_path)}
        self._stopping.clear()
        deadline = time.monotonic() + timeout
        try:
            self._start_redis()
            if cfg.orthanc_index == "postgresql":
                # Orthanc's index must answer before Orthanc starts (else its plugin waits 5 s between attempts).
                self._start_postgres()
                self._wait(self._postgres_ready, deadline, "postgres")
            self._start_orthanc(orthanc_json)
            if self.supervised:  # the PACS answers: from here on, no other process's failure stops it
                self._wait(self._orthanc_ready, deadline, "orthanc")
            if cfg.with_plugin:
                self._start_query_scp(settings_path)
            if self.with_worker:
                self.start_worker()
            if not self.supervised:
                self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        if self.supervised:
            self._thread = threading.Thread(target=self._supervise_loop, name="lookalike-supervisor", daemon=True)
            self._thread.start()
            self._await_components(deadline)
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        # Owner-only whatever the caller's umask: a process's output holds tracebacks, which may quote PHI.
        with open_owner_only(self.config.logs / f"{name}.out") as log:
            # A session of its own: Ctrl-C in the terminal reaches `lookalike run`, which stops the children in
            # order. umask 077: Orthanc's storage, the catalogue, Redis's files and the logs hold PHI, owner only.
            self.procs[name] = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.config.state_dir,
                start_new_session=True, umask=0o077,
            )
        self._argv[name] = argv
        component = self.components.setdefault(name, Component())
        component.started, component.next_start = time.monotonic(), 0.0

    def _respawn(self, name: str) -> None:
        """Start ``name`` again with the command line it was first started with (a worker keeps its queues)."""
        if name in self._workers:
            self._mark_worker_log(name)
        self._spawn(name, self._argv[name])

    def restart(self, name: str, timeout: float = 60.0) -> None:
        """Start one process again (it crashed, or a test stopped it); the others keep running."""
        with self._lock:
            self._terminate(name, 20.0)
            self._respawn(name)
        self._wait(lambda: self._ready(name), time.monotonic() + timeout, name)

    def _ready(self, name: str) -> bool:
        """``name`` answers (a worker: has said "ready." in its log since it was last started)."""
        if name in self._workers:
            return self.worker_ready(name)
        return {"redis": self._redis_ping, "query-scp": self._query_scp_ready, "postgres": self._postgres_ready,
                "orthanc": self._orthanc_ready}[name]()

    # -- supervision (``supervise=True``) ------------------------------------------------------------------
    def _supervise_loop(self) -> None:
        while not self._stopping.wait(0.5):
            try:
                self.supervise()
            except Exception as exc:  # the supervisor itself must not die: Orthanc would lose its guard
                self._report(f"supervisor: {type(exc).__name__}: {exc}")

    def supervise(self) -> None:
        """One pass: restart what exited once its back-off is over, note what became ready, save the report.

        A process that exits is started again after BACKOFF[n] seconds, n its exits in a row (counted anew after
        STABLE_AFTER seconds of running); after FAILING_AFTER in a row it is reported as failing, and still
        retried. Nothing else is stopped.
        """
        with self._lock:
            if self._stopping.is_set():
                return
            now = time.monotonic()
            for name in list(self._argv):
                component = self.components.setdefault(name, Component())
                proc = self.procs.get(name)
                if proc is not None and proc.poll() is not None:
                    self.procs.pop(name)
                    self._exited(name, component, proc.returncode, now)
                elif proc is None and component.next_start and now >= component.next_start:
                    self._respawn(name)
                    component.restarts += 1
                    self._set_state(component, "starting" if component.state != "failing" else "failing")
                elif proc is not None and component.state != "ready" and self._probe(name):
                    if component.restarts:
                        self._report(f"{name} is back (restart {component.restarts})")
                    self._set_state(component, "ready")
            self._save_components()

    def _exited(self, name: str, component: Component, status: int, now: float) -> None:
        component.exits_in_a_row = 1 if now - component.started >= STABLE_AFTER else component.exits_in_a_row + 1
        component.last_exit_status = status
        delay = BACKOFF[min(component.exits_in_a_row, len(BACKOFF)) - 1]
        component.next_start = now + delay
        failing = component.exits_in_a_row >= FAILING_AFTER
        self._set_state(component, "failing" if failing else "restarting")
        self._report(f"{name} exited with status {status}; restarting it in {delay:.0f} s"
                     + (f"; it keeps failing ({component.exits_in_a_row} exits in a row), see {name}.out and its"
                        f" log in {self.config.logs}" if failing else "")
                     + ("; Orthanc keeps running" if name not in ESSENTIAL else ""))

    def _probe(self, name: str) -> bool:
        try:
            return bool(self._ready(name))
        except (OSError, requests.RequestException):
            return False

    @staticmethod
    def _set_state(component: Component, state: str) -> None:
        if component.state != state:
            component.state, component.since = state, time.time()

    def _await_components(self, deadline: float) -> None:
        """Wait until every process is ready, or the deadline; one still not ready is reported, not fatal."""
        while time.monotonic() < deadline:
            with self._lock:
                if all(c.state == "ready" for c in self.components.values()):
                    return
            time.sleep(0.2)
        with self._lock:
            late = [name for name, c in self.components.items() if c.state != "ready"]
        if late:
            self._report(f"{', '.join(late)} not ready at the end of the start; Orthanc runs, and they are"
                         " restarted until they are")

    def _report(self, message: str) -> None:
        """A line in ``<logs>/supervisor.log`` (owner-only) and on standard error."""
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        with open_owner_only(self.config.logs / "supervisor.log") as fh:
            fh.write(f"{line}\n".encode())
        print(f"lookalike: {message}", file=sys.stderr, flush=True)

    def _save_components(self) -> None:
        """Write the report ``/lookalike/status`` shows, when it changed (replaced whole: a reader sees no half)."""
        report = {name: c.report() for name, c in self.components.items()}
        if report == self._reported:
            return
        path = self.config.components_file
        write_owner_only(path.with_suffix(".tmp"), json.dumps(report, indent=2))
        os.replace(path.with_suffix(".tmp"), path)
        self._reported = report

    def crashed(self) -> list[str]:
        """The processes that have exited on their own."""
        return [name for name, proc in self.procs.items() if proc.poll() is not None]

    def _start_redis(self) -> None:
        # The password lives in the 0600 file, not on the command line that every local user can read with ps.
        self._spawn("redis", [shutil.which("redis-server") or "redis-server", str(self._redis_conf)])

    def _start_postgres(self) -> None:
        """The stack's PostgreSQL cluster (made by ``write_configs``), as its own user; settings in its data folder."""
        argv = [postgres_program("postgres"), "-D", str(self.config.postgres_dir)]
        self._spawn("postgres", as_postgres_account(argv))

    def _start_orthanc(self, config_path: Path) -> None:
        orthanc = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        self._spawn(
            "orthanc",
            [orthanc, "--verbose-plugins", f"--logdir={self.config.logs}", str(config_path)],
        )

    def _start_query_scp(self, settings_path: Path) -> None:
        """The DICOM query endpoint, a process of its own beside Orthanc that also answers the REST routes' lookups
        (see ``lookalike.query.query_scp``); its secret is read from the settings file, never the command line."""
        self._spawn(
            "query-scp",
            [sys.executable, "-m", "lookalike.cli", "--config", str(settings_path), "query-scp",
             "--logfile", str(self.config.logs / "query-scp.log")],
        )

    def start_worker(self, name: str = "worker", queues: tuple[str, ...] = (QUEUE, EMBED_QUEUE, WRITE_QUEUE)) -> None:
        """A Celery worker of one pool process (the model loaded once); more than one share the index's write lock.

        ``name`` names the process, its log (``<name>.log``) and its Celery node, so that a site can run several.
        By default it does every stage (see :mod:`lookalike.worker.tasks`); with ``remote_embedding`` in the
        settings, ``(QUEUE, WRITE_QUEUE)`` makes the index's writer and ``(EMBED_QUEUE,)`` an embedding worker.
        """
        log = self.config.logs / f"{name}.log"
        self._mark_worker_log(name)
        self._spawn(
            name,
            [
                sys.executable, "-m", "celery", "-A", "lookalike.worker.celery_app", "worker",
                "-Q", ",".join(queues), "--concurrency", "1", "--loglevel", "INFO",
                "-n", f"lookalike-{name}-{self.config.redis_port}@%h", "--logfile", str(log),
            ],
        )

    def _mark_worker_log(self, name: str) -> None:
        """Note where the worker's log ends: "ready." counts only after this start."""
        log = self.config.logs / f"{name}.log"
        self._workers[name] = len(log.read_text(errors="replace").splitlines()) if log.exists() else 0

    def worker_ready(self, name: str = "worker") -> bool:
        """The worker process ``name`` has said "ready." in its log (a restarted one, after its own start)."""
        log = self.config.logs / f"{name}.log"
        if not log.exists() or name not in self.procs:
            return False
        lines = log.read_text(errors="replace").splitlines()[self._workers.get(name, 0):]
        return any("ready." in line for line in lines)

    def stop_worker(self, timeout: float = 20.0) -> None:
        self._terminate("worker", timeout)

    def stop_process(self, name: str, timeout: float = 20.0) -> None:
        """Stop one process cleanly (``restart`` starts it again with the same command line)."""
        self._terminate(name, timeout)

    # -- readiness ---------------------------------------------------------------------------------------
    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for name in ("redis", "postgres", "orthanc", "worker", "query-scp"):
            if name in self.procs:
                self._wait(lambda: self._ready(name), deadline, name)

    def _wait(self, probe, deadline: float, name: str) -> None:
        while time.monotonic() < deadline:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode}; see {self.config.logs}")
            try:
                if probe():
                    return
            except (OSError, requests.RequestException):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{name} not ready; see {self.config.logs}")

    def _orthanc_ready(self) -> bool:
        return self.http().get(f"{self.config.orthanc_url}/system", timeout=2).ok

    def _redis_ping(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.config.settings().redis_url, socket_timeout=1,
                                             socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    def _postgres_ready(self) -> bool:
        """PostgreSQL accepts connections (``pg_isready``: it asks for no password)."""
        probe = [postgres_program("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.config.postgres_port),
                 "-U", ORTHANC_DB, "-d", ORTHANC_DB]
        return subprocess.run(probe, timeout=10).returncode == 0

    def _query_scp_ready(self) -> bool:
        """The query endpoint answers on its DICOM port and on its lookup socket (it listens once its index is
        loaded)."""
        settings = self.config.settings()
        # Where a site opened the endpoint to workstations (query_host), it is reached there; 0.0.0.0 on loopback.
        host = "127.0.0.1" if settings.query_host in ("", "0.0.0.0") else settings.query_host
        with socket.create_connection((host, settings.query_port), timeout=1):
            pass
        try:
            LookupClient(settings.lookup_socket, settings.lookup_secret, 2.0).ping()
        except LookupUnavailable:
            return False
        return True

    def http(self, user: str = "admin") -> requests.Session:
        """An HTTP session on Orthanc with the named user's credentials."""
        s = requests.Session()
        password = self.config.admin_password if user == "admin" else self.config.service_password
        s.auth = (user, password)
        return s

    # -- stop --------------------------------------------------------------------------------------------
    def _terminate(self, name: str, timeout: float) -> None:
        with self._lock:
            proc = self.procs.pop(name, None)
            if name in self.components:
                self.components[name].next_start = 0.0  # stopped on purpose: not to be restarted
        if proc is None or proc.poll() is not None:
            return
        # SIGTERM to the leader alone: Celery's main process then stops its pool child itself (warm shutdown).
        # PostgreSQL gets SIGINT, its fast shutdown (SIGTERM would wait for every client to leave).
        proc.send_signal(signal.SIGINT if name == "postgres" else signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
        except ProcessLookupError:
            pass
        proc.wait()

    def stop(self) -> None:
        """The supervisor, the query endpoint, the workers (each finishes its task), then Orthanc, its PostgreSQL,
        then Redis."""
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        for name in ("query-scp", *sorted(self._workers), "orthanc", "postgres", "redis"):
            self._terminate(name, 20.0)
        if self._thread is not None:  # no report outlives the supervisor (a later systemd stack has none)
            self.config.components_file.unlink(missing_ok=True)
        self._thread = None

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def child_pids(pid: int) -> list[int]:
    """The running processes ``pid`` started, from any of its threads (Orthanc starts the plugin's relay from one,
    a Celery worker its pool processes): what tests and benchmarks look for below a stack's process."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # the thread or the process ended meanwhile
            continue
    return found


def storescu(config: StackConfig, files: list[Path], aet: str = "STORESCU", timeout: float = 120) -> subprocess.CompletedProcess:
    """Send files with DCMTK's ``storescu``, as a modality would."""
    argv = ["storescu", "-aet", aet, "-aec", ORTHANC_AET, "127.0.0.1", str(config.dicom_port), *map(str, files)]
    return subprocess.run(argv, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout)
