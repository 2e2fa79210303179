"""Scraped metrics for tests, read with prometheus_client's own exposition parser: {sample name: Family}."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Family:
    name: str   # the sample name (a counter's ends in _total)
    type: str
    help: str
    samples: dict[tuple[tuple[str, str], ...], float] = field(default_factory=dict)

    def value(self, **labels: str) -> float:
        return self.samples[tuple(sorted(labels.items()))]


def parse(text: str) -> dict[str, Family]:
    out: dict[str, Family] = {}
    for fam in text_string_to_metric_families(text):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        family = out.setdefault(name, Family(name, fam.type, fam.documentation))
        for sample in fam.samples:
            if sample.name == name:  # not a counter's _created
                family.samples[tuple(sorted(sample.labels.items()))] = sample.value
    return out
