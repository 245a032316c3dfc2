"""Helpers shared by the test modules of both tiers (``tests/unit``, ``tests/vm``).

Test modules import from here, never from another test module or a conftest. The
tests directory is on ``sys.path`` (``pythonpath`` in pyproject's pytest options), so
``from support.common import command`` works from any test file.

- :mod:`support.common`: paths, the session's names, running our commands and
  stopping what a test started.
- :mod:`support.net`: free loopback ports and a TCP proxy that can cut its connections.
- :mod:`support.packages`: a small synthetic package.
- :mod:`support.vms`: runners, registries, peers and Redis clients around real VMs.
- :mod:`support.wire`: a synthetic package, servers over it and hand-driven wire clients.
- :mod:`support.oci_images`: container images built for the OCI tests.
"""
