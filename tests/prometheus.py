"""Reading Ray's Prometheus endpoints in tests."""

from __future__ import annotations

import time

import httpx2 as httpx


def scrape(urls: list[str]) -> dict[str, float]:
    """Prometheus text format of every node's metrics endpoint -> {'name{labels}': value}, summed over nodes."""
    samples: dict[str, float] = {}
    for url in urls:
        for line in httpx.get(url, timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = samples.get(key, 0.0) + float(value)
    return samples


def metric(samples: dict[str, float], name: str, **labels) -> float:
    """Sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def settled_scrape(urls: list[str], timeout: float = 30) -> dict[str, float]:
    """A scrape once the request and token counters stop moving (Ray exports with a lag of seconds)."""
    deadline = time.time() + timeout
    last = scrape(urls)
    while time.time() < deadline:
        time.sleep(2)
        now = scrape(urls)
        if all(metric(now, name) == metric(last, name) for name in (
                "ray_latentmoe_requests_total", "ray_latentmoe_generation_tokens_total")):
            return now
        last = now
    return last
