"""What ``make run`` says about DICOM access to Orthanc is what Orthanc does: the calling AE titles it names may
echo, any other (``echoscu``'s default ECHOSCU) is refused, and a peer added in the stack's configuration is let in."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from lookalike.ops.stack import ORTHANC_AET, Stack, StackConfig, dcmtk_env

pytestmark = pytest.mark.stack


def echo(stack: Stack, aet: str | None) -> subprocess.CompletedProcess:
    argv = ["echoscu", *(["-aet", aet] if aet else []), "-aec", ORTHANC_AET, "127.0.0.1", str(stack.config.dicom_port)]
    return subprocess.run(argv, env=dcmtk_env(), capture_output=True, text=True, timeout=60)


def test_the_named_ae_titles_may_echo_and_the_default_is_refused(stack: Stack, tmp_path: Path) -> None:
    summary = stack.config.dicom_access(tmp_path / "stack.json")
    named = re.findall(r"(\w+) from 127\.0\.0\.1", summary)
    assert named
    for aet in named:
        result = echo(stack, aet)
        assert result.returncode == 0, (aet, result.stderr)
    refused = echo(stack, None)
    assert refused.returncode != 0 and "ECHOSCU" not in named
    assert str(tmp_path / "stack.json") in summary and '"modalities"' in summary


def test_a_peer_added_in_the_stack_configuration_is_allowed(tmp_path: Path) -> None:
    config = StackConfig.create(tmp_path, modalities={"WS1": ["WS1AE", "10.0.0.5", 11112]})
    assert config.orthanc_config()["DicomModalities"]["WS1"] == ["WS1AE", "10.0.0.5", 11112]
    assert "WS1AE from 10.0.0.5" in config.dicom_access(tmp_path / "stack.json")
    assert {"STORESCU", "FINDSCU"} <= {aet for aet, *_ in config.orthanc_config()["DicomModalities"].values()}
