"""The worker's HTTP side as a scraper sees it: a GET, and a /metrics page parsed."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


async def http_get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


class Scrape:
    """One /metrics scrape, parsed: ``value(name, **labels)`` of a sample (0 when absent)."""

    def __init__(self, text: str):
        self.samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)
