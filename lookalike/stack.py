"""Start and stop the whole stack on this machine: Redis, Orthanc with the plugin, and a Celery worker.

``lookalike run`` (behind ``make run``) and the end-to-end tests use the same code, so what the tests start is
what an administrator runs. Every process listens on loopback; every log goes to ``<state>/logs``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from lookalike.config import QUEUE, Settings

PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
#: The script Orthanc's Python plugin loads; it only puts the project on ``sys.path`` and registers callbacks.
PLUGIN_SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "orthanc" / "lookalike_plugin.py"
SOURCE_ROOT = PLUGIN_SCRIPT.parent.parent.parent
ORTHANC_AET = "ORTHANC"
#: AE titles allowed to talk DICOM to this Orthanc (DCMTK's defaults, on loopback).
KNOWN_MODALITIES = {"STORESCU": "STORESCU", "FINDSCU": "FINDSCU"}
#: Calling AE titles the DICOM query endpoint answers (DCMTK's findscu and movescu defaults, on loopback).
QUERY_CALLERS = ("FINDSCU", "MOVESCU")


def free_port(preferred: int = 0) -> int:
    """A TCP port on loopback that nothing listens on right now: ``preferred`` if it is free.

    Probed as the servers bind (SO_REUSEADDR), so a port of ours that only has connections closing (TIME_WAIT)
    after a restart still counts as free and keeps its number.
    """
    for port in (preferred, 0) if preferred else (0,):
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
    stable_age: int = 2
    with_plugin: bool = True
    #: Encoder name -> checkpoint path, replacing the shipped weights (a hospital's own model).
    weights: dict[str, str] = field(default_factory=dict)
    extra_orthanc: dict = field(default_factory=dict)
    #: The site's own DICOM peers, beside KNOWN_MODALITIES: name -> [calling AE title, host, port].
    modalities: dict[str, list] = field(default_factory=dict)
    #: Settings fields that differ from the defaults (e.g. a short ``catch_up_interval`` in tests).
    extra_settings: dict = field(default_factory=dict)
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
            admin_password=secrets.token_urlsafe(12),
            service_password=secrets.token_urlsafe(18),
            **kw,
        )

    @classmethod
    def load_or_create(cls, path: Path, state_dir: Path) -> "StackConfig":
        if path.exists():
            data = json.loads(path.read_text())
            data["state_dir"] = Path(data["state_dir"])
            cfg = cls(**data)
            if cfg.query_port:
                return cfg
            cfg.query_port = free_port(11112)  # kept from now on, so that workstations keep finding it
        else:
            # The usual ports of Orthanc, Redis and a DICOM query SCP where they are free: viewers find them.
            cfg = cls.create(state_dir, http_port=free_port(8042), dicom_port=free_port(4242),
                             redis_port=free_port(6379), query_port=free_port(11112))
        cfg.save(path)
        return cfg

    def save(self, path: Path) -> None:
        """Keep the ports and credentials (owner-only), so that a restart finds the same stack."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.chmod(0o600)
        data = {k: v for k, v in self.__dict__.items() if k != "moved_ports"}
        path.write_text(json.dumps({**data, "state_dir": str(self.state_dir)}, indent=2))

    def move_taken_ports(self) -> list[str]:
        """Replace each port that another program holds by a free one; the names of those moved."""
        moved = []
        for name in ("http_port", "dicom_port", "redis_port", "query_port"):
            port = getattr(self, name)
            if port and free_port(port) != port:
                setattr(self, name, free_port())
                moved.append(name)
        self.moved_ports.extend(moved)
        return moved

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

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

    def settings(self) -> Settings:
        """What the worker, the plugin and the command line need to find each other."""
        return Settings(
            orthanc_url=self.orthanc_url,
            orthanc_user="lookalike",
            orthanc_password=self.service_password,
            redis_url=f"redis://:{self.redis_password}@127.0.0.1:{self.redis_port}/0",
            index_dir=str(self.state_dir / "index"),
            weights=dict(self.weights),
            audit_log=str(self.logs / "audit.jsonl"),
            query_host="127.0.0.1",
            query_port=self.query_port,
            query_allowed={aet: ["127.0.0.1"] for aet in QUERY_CALLERS},
            **self.extra_settings,
        )

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
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowEcho": False,
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
    """Redis's configuration: loopback only, a password, an append-only file so queued tasks survive a restart."""
    return "\n".join([
        "bind 127.0.0.1", f"port {cfg.redis_port}", f"dir {cfg.state_dir / 'redis'}", "appendonly yes", 'save ""',
        f"logfile {cfg.logs / 'redis.log'}", f"requirepass {cfg.redis_password}", "",
    ])


def write_configs(cfg: StackConfig) -> tuple[Path, Path, Path]:
    """Write the folders and the three configuration files of a stack (owner-only): Lookalike's settings,
    Orthanc's configuration and Redis's. ``lookalike run`` starts from them; the service units in
    ``deploy/systemd`` read the same files, written by ``lookalike configure``."""
    for sub in ("logs", "orthanc-storage", "index", "redis"):
        (cfg.state_dir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        (cfg.state_dir / sub).chmod(0o700)
    paths = (cfg.state_dir / "lookalike.json", cfg.state_dir / "orthanc.json", cfg.state_dir / "redis.conf")
    texts = (json.dumps(cfg.settings().to_dict(), indent=2), json.dumps(cfg.orthanc_config(), indent=2),
             redis_conf(cfg))
    for path, text in zip(paths, texts):
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(text)
    return paths


class Stack:
    """The running processes of one :class:`StackConfig`; a context manager that stops all it started."""

    def __init__(self, config: StackConfig, *, worker: bool = True) -> None:
        self.config = config
        self.with_worker = worker
        self.procs: dict[str, subprocess.Popen] = {}
        self._argv: dict[str, list[str]] = {}
        self._workers: dict[str, int] = {}  # worker name -> first line of its log written by the current process

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
        try:
            self._start_redis()
            self._start_orthanc(orthanc_json)
            if cfg.with_plugin:
                self._start_query_scp(settings_path)
            if self.with_worker:
                self.start_worker()
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.config.logs / f"{name}.out", "ab")
        # A session of its own: Ctrl-C in the terminal reaches `lookalike run`, which stops the children in order.
        # umask 077: Orthanc's storage, the catalogue, Redis's files and the logs hold PHI, readable by owner only.
        self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.config.state_dir, start_new_session=True,
            umask=0o077,
        )
        self._argv[name] = argv

    def restart(self, name: str, timeout: float = 60.0) -> None:
        """Start one process again (it crashed, or a test stopped it); the others keep running."""
        self._terminate(name, 20.0)
        if name in self._workers:
            self.start_worker(name)
            ready = lambda: self.worker_ready(name)  # noqa: E731
        else:
            self._spawn(name, self._argv[name])
            ready = {"redis": self._redis_ping, "query-scp": self._query_scp_ready,
                     "orthanc": lambda: self.http().get(f"{self.config.orthanc_url}/system", timeout=2).ok}[name]
        self._wait(ready, time.monotonic() + timeout, name)

    def crashed(self) -> list[str]:
        """The processes that have exited on their own."""
        return [name for name, proc in self.procs.items() if proc.poll() is not None]

    def _start_redis(self) -> None:
        # The password lives in the 0600 file, not on the command line that every local user can read with ps.
        self._spawn("redis", [shutil.which("redis-server") or "redis-server", str(self._redis_conf)])

    def _start_orthanc(self, config_path: Path) -> None:
        orthanc = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        self._spawn(
            "orthanc",
            [orthanc, "--verbose-plugins", f"--logdir={self.config.logs}", str(config_path)],
        )

    def _start_query_scp(self, settings_path: Path) -> None:
        """The DICOM query endpoint, a process of its own beside Orthanc (see ``lookalike.indexer.query_scp``)."""
        self._spawn(
            "query-scp",
            [sys.executable, "-m", "lookalike.cli", "--config", str(settings_path), "query-scp",
             "--logfile", str(self.config.logs / "query-scp.log")],
        )

    def start_worker(self, name: str = "worker") -> None:
        """A Celery worker of one process (the model loaded once); more than one share the index's write lock.

        ``name`` names the process, its log (``<name>.log``) and its Celery node, so that a site can run several.
        """
        log = self.config.logs / f"{name}.log"
        self._workers[name] = len(log.read_text(errors="replace").splitlines()) if log.exists() else 0
        self._spawn(
            name,
            [
                sys.executable, "-m", "celery", "-A", "lookalike.indexer.celery_app", "worker",
                "-Q", QUEUE, "--concurrency", "1", "--loglevel", "INFO",
                "-n", f"lookalike-{name}-{self.config.redis_port}@%h", "--logfile", str(log),
            ],
        )

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
        self._wait(lambda: self._redis_ping(), deadline, "redis")
        self._wait(lambda: self.http().get(f"{self.config.orthanc_url}/system", timeout=2).ok, deadline, "orthanc")
        if "worker" in self.procs:
            self._wait(self.worker_ready, deadline, "worker")
        if "query-scp" in self.procs:
            self._wait(self._query_scp_ready, deadline, "query-scp")

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

    def _redis_ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.config.settings().redis_url, socket_timeout=1,
                                             socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    def _query_scp_ready(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.config.query_port), timeout=1):
            return True

    def http(self, user: str = "admin") -> requests.Session:
        """An HTTP session on Orthanc with the named user's credentials."""
        s = requests.Session()
        password = self.config.admin_password if user == "admin" else self.config.service_password
        s.auth = (user, password)
        return s

    # -- stop --------------------------------------------------------------------------------------------
    def _terminate(self, name: str, timeout: float) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        # SIGTERM to the leader alone: Celery's main process then stops its pool child itself (warm shutdown).
        proc.terminate()
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
        """The query endpoint, the workers (each finishes its task), then Orthanc, then Redis."""
        for name in ("query-scp", *sorted(self._workers), "orthanc", "redis"):
            self._terminate(name, 20.0)

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def storescu(config: StackConfig, files: list[Path], aet: str = "STORESCU", timeout: float = 120) -> subprocess.CompletedProcess:
    """Send files with DCMTK's ``storescu``, as a modality would."""
    argv = ["storescu", "-aet", aet, "-aec", ORTHANC_AET, "127.0.0.1", str(config.dicom_port), *map(str, files)]
    return subprocess.run(argv, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout)
