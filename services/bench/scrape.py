"""Prometheus samples of a running service, and what changed between two scrapes (means of histograms)."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

Key = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted labels)


@dataclass(frozen=True)
class Scrape:
    """Every sample of one /metrics page: counters, gauges, and histograms' _sum and _count."""

    samples: dict[Key, float]

    @classmethod
    def of(cls, url: str, timeout_s: float = 5.0) -> Scrape:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode()
        samples: dict[Key, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return cls(samples)

    def value(self, name: str, **labels: str) -> float:
        """The sum over samples called `name` whose labels include `labels` (0 when there are none)."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= set(ls))


@dataclass(frozen=True)
class Change:
    """What happened between two scrapes of the same service."""

    before: Scrape
    after: Scrape

    def count(self, name: str, **labels: str) -> float:
        """Growth of a counter, or of a histogram's observations (pass its name without _count)."""
        suffix = "" if name.endswith("_total") else "_count"
        return self.after.value(name + suffix, **labels) - self.before.value(name + suffix, **labels)

    def total(self, name: str, **labels: str) -> float:
        """Growth of a histogram's or summary's _sum."""
        return self.after.value(name + "_sum", **labels) - self.before.value(name + "_sum", **labels)

    def mean(self, name: str, **labels: str) -> float | None:
        """Mean of the observations made in between; None when there were none."""
        count = self.count(name, **labels)
        return self.total(name, **labels) / count if count > 0 else None

    def label_values(self, name: str, label: str) -> list[str]:
        """The values `label` takes on samples of `name` (e.g. every node of a per-node summary)."""
        found = {dict(ls).get(label) for (n, ls) in self.after.samples if n.startswith(name)}
        return sorted(value for value in found if value is not None)
