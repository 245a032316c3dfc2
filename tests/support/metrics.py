"""Reading a /metrics endpoint as Prometheus would."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

PHASES = "drafter_migration_phase_seconds_count"  # one sample per phase observed


class Samples:
    """One scrape of a /metrics endpoint, parsed with prometheus_client's own parser."""

    def __init__(self, addr: str) -> None:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as response:
            text = response.read().decode()
        self.samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of every sample called ``name`` that has these labels (0 if none)."""
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )
