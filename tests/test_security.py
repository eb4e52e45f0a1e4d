"""What another local user or process can reach on a running stack: Redis, the files holding PHI, credentials."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
import redis

from lookalike.config import QUEUE, TASK_FORGET
from lookalike.indexer.catalogue import CATALOGUE_FILE
from lookalike.stack import Stack
from tests.conftest import wait_for

pytestmark = pytest.mark.stack


def _indexed_total(stack: Stack) -> int:
    status = stack.http().get(f"{stack.config.orthanc_url}/lookalike/status", timeout=10).json()
    return sum(c["instances"] for c in status["indexed"])


class TestRedis:
    def test_a_client_without_the_password_cannot_queue_a_forget(self, stack: Stack) -> None:
        anonymous = redis.Redis(host="127.0.0.1", port=stack.config.redis_port, socket_timeout=5)
        with pytest.raises(redis.AuthenticationError):
            anonymous.lpush(QUEUE, json.dumps({"task": TASK_FORGET}))
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=stack.config.redis_port, password="guess").ping()

    def test_redis_listens_on_loopback_only(self, stack: Stack) -> None:
        # /proc/net/tcp: "local_address" as little-endian hex IPv4:port, state 0A = LISTEN
        listening = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, port = local.rsplit(":", 1)
                if state == "0A" and int(port, 16) == stack.config.redis_port:
                    listening.add(address)
        assert listening == {"0100007F"}, f"Redis listens on {listening}, not 127.0.0.1 alone"


class TestFilesHoldingPhi:
    def test_catalogue_and_orthanc_storage_are_owner_only(self, stack: Stack, tmp_path: Path) -> None:
        from tests.test_stack import _sample_pixels, _study
        from lookalike.stack import storescu

        # Turned upside down: no near copy of an image the shared stack's lookup tests rank.
        pixels = np.ascontiguousarray(np.rot90(_sample_pixels("US", 9)[8], 2))
        path, _ = _study(pixels, "US", "PPERMS0001", tmp_path, "perms")
        before = _indexed_total(stack)
        assert storescu(stack.config, [path]).returncode == 0
        wait_for(lambda: _indexed_total(stack) > before, timeout=90, what="indexing")
        state = stack.config.state_dir
        files = [state / "index" / CATALOGUE_FILE, *[p for p in (state / "orthanc-storage").rglob("*") if p.is_file()]]
        assert len(files) > 2
        for f in files:
            mode = stat.S_IMODE(f.stat().st_mode)
            assert mode & 0o077 == 0, f"{f} is readable by others: {oct(mode)}"
        for d in (state / "index", state / "orthanc-storage", state / "logs"):
            assert stat.S_IMODE(d.stat().st_mode) & 0o077 == 0, f"{d} is open to others"


class TestCredentials:
    def test_plugin_configuration_carries_no_orthanc_credential(self, stack: Stack) -> None:
        section = stack.config.orthanc_config()["Lookalike"]
        assert stack.config.service_password not in json.dumps(section)
        assert "orthanc_password" not in section

    def test_no_password_in_orthancs_log(self, stack: Stack) -> None:
        logs = "".join(p.read_text(errors="replace") for p in stack.config.logs.glob("Orthanc*"))
        assert logs, "Orthanc wrote no log"
        for secret in (stack.config.redis_password, stack.config.service_password, stack.config.admin_password):
            assert secret not in logs

    def test_no_password_on_any_command_line(self, stack: Stack) -> None:
        """Every local user can read every process's command line (ps): no secret may be there."""
        lines = []
        for proc in Path("/proc").iterdir():
            try:
                lines.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
        assert any(str(stack.config.state_dir) in line for line in lines), "the stack's processes were not found"
        for secret in (stack.config.redis_password, stack.config.service_password, stack.config.admin_password):
            assert not [line for line in lines if secret in line]
