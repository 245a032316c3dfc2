"""drafter-liveness (drafter.guest.liveness) against a fake OCI runtime."""

from __future__ import annotations

from pathlib import Path

import pytest

from drafter.guest import liveness


def test_liveness_waits_until_the_container_runs(workdir: Path) -> None:
    """drafter-liveness --wait-container polls the OCI runtime's state."""
    runtime = workdir / "fake-crun"
    count = workdir / "count"
    runtime.write_text(
        "#!/bin/sh\n"
        f"n=$(cat {count} 2>/dev/null || echo 0); echo $((n + 1)) > {count}\n"
        '[ "$n" -ge 3 ] && status=running || status=created\n'
        'echo "{\\"id\\": \\"$2\\", \\"status\\": \\"$status\\"}"\n'
    )
    runtime.chmod(0o755)
    liveness.wait_for_container("drafter", str(runtime), timeout=10)
    assert int(count.read_text()) == 4
    count.write_text("-1000")
    with pytest.raises(TimeoutError, match="last status: created"):
        liveness.wait_for_container("drafter", str(runtime), timeout=0.5)
