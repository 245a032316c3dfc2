"""The OCI runtime spec a container in the VM gets (drafter.blueprint.container)."""

from __future__ import annotations

from drafter.blueprint import container


def test_runtime_spec_shares_the_vm_network() -> None:
    spec = {
        "process": {"terminal": True, "args": ["x"]},
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "mount"}]},
    }
    container.adapt_runtime_spec(spec)
    assert [ns["type"] for ns in spec["linux"]["namespaces"]] == ["pid", "mount"]
    assert spec["process"]["terminal"] is False
    assert "CAP_CHOWN" in spec["process"]["capabilities"]["effective"]
    assert "/etc/hosts" in [m["destination"] for m in spec["mounts"]]
