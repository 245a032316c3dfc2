"""Our commands' own checks of their command line: ``--help``, and bad flags refused in
one line before anything runs (no root and no network needed to see them)."""

from __future__ import annotations

import pytest

from support.common import assert_one_line_error, run_command


@pytest.mark.parametrize(
    "name",
    [
        "drafter-blueprint",
        "drafter-daemon",
        "drafter-forwarder",
        "drafter-packager",
        "drafter-runner",
        "drafter-agent",
        "drafter-liveness",
    ],
)
def test_every_command_has_help(name: str) -> None:
    result = run_command(name, "--help")
    assert result.returncode == 0
    assert "usage:" in result.stdout


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--handover-timeout", "0"),
        ("--handover-timeout", "-1"),
        ("--handover-timeout", "nan"),
        ("--handover-timeout", "inf"),
        ("--handover-timeout", "1e9"),
        ("--handover-timeout", "soon"),
        ("--rescue-timeout", "-1"),
        ("--rescue-timeout", "nan"),
        ("--rescue-timeout", "86401"),
        ("--offer-timeout", "0"),
        ("--retry-timeout", "-5"),
        ("--resume-timeout", "nan"),
        ("--resume-threshold", "1.5"),
        ("--precopy-rounds", "-1"),
        ("--precopy-rounds", "1e3"),
        ("--precopy-threshold", "nan"),
        ("--pull-workers", "0"),
    ],
)
def test_drafter_peer_refuses_bad_numbers_in_one_line(flag: str, value: str) -> None:
    """Checked before anything runs (no root, no network needed to see them)."""
    result = run_command("drafter-peer", "--raddr", "127.0.0.1:1", flag, value)
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result, flag)
