"""Counters, gauges and histograms rendered in Prometheus' text exposition format (version 0.0.4).

Written here rather than taken from prometheus_client: a dozen series need no dependency.
"""

from __future__ import annotations

import math
import threading
from typing import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768)


class Metrics:
    """Thread-safe series, declared once with their type and help text, rendered by `render()`."""

    def __init__(self, prefix: str = "embedft_"):
        self.prefix = prefix
        self._lock = threading.Lock()
        self._meta: dict[str, tuple[str, str, tuple[float, ...]]] = {}  # name -> (type, help, buckets)
        self._values: dict[str, dict[tuple, float]] = {}  # counters: labels -> value
        self._hist: dict[str, dict[tuple, list[float]]] = {}  # labels -> bucket counts + [sum, count]
        self._gauges: dict[str, Callable[[], float]] = {}

    def counter(self, name: str, help: str) -> None:
        self._meta[name] = ("counter", help, ())
        self._values[name] = {}

    def histogram(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self._meta[name] = ("histogram", help, tuple(buckets))
        self._hist[name] = {}

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        """A gauge whose value is read when the metrics are rendered."""
        self._meta[name] = ("gauge", help, ())
        self._gauges[name] = read

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        buckets = self._meta[name][2]
        key = tuple(sorted(labels.items()))
        with self._lock:
            h = self._hist[name].setdefault(key, [0.0] * (len(buckets) + 2))
            for i, le in enumerate(buckets):
                if value <= le:
                    h[i] += 1
            h[-2] += value
            h[-1] += 1

    def value(self, name: str, sum: bool = False, **labels: str) -> float:
        """A counter's value, or a histogram's count (its sum with sum=True); 0 when never touched."""
        key = tuple(sorted(labels.items()))
        with self._lock:
            if name in self._values:
                return self._values[name].get(key, 0.0)
            h = self._hist[name].get(key)
            return 0.0 if h is None else h[-2] if sum else h[-1]

    def render(self) -> str:
        """The text format Prometheus scrapes."""
        lines: list[str] = []
        gauges = {name: read() for name, read in self._gauges.items()}  # read outside the lock: they take their own
        with self._lock:
            for name, (kind, help, buckets) in self._meta.items():
                full = self.prefix + name
                lines += [f"# HELP {full} {help}", f"# TYPE {full} {kind}"]
                if kind == "counter":
                    for key, v in sorted(self._values[name].items()):
                        lines.append(f"{full}{_labels(key)} {_num(v)}")
                elif kind == "gauge":
                    lines.append(f"{full} {_num(gauges[name])}")
                else:
                    for key, h in sorted(self._hist[name].items()):
                        for le, n in zip(buckets, h):
                            lines.append(f"{full}_bucket{_labels(key + (('le', _num(le)),))} {_num(n)}")
                        lines.append(f"{full}_bucket{_labels(key + (('le', '+Inf'),))} {_num(h[-1])}")
                        lines.append(f"{full}_sum{_labels(key)} {_num(h[-2])}")
                        lines.append(f"{full}_count{_labels(key)} {_num(h[-1])}")
        return "\n".join(lines) + "\n"


def _labels(key: tuple) -> str:
    if not key:
        return ""
    esc = (str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for _, v in key)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(key, esc)) + "}"


def _num(v: float) -> str:
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return "+Inf" if v > 0 else ("-Inf" if v < 0 else "NaN")
    return repr(int(v)) if float(v).is_integer() else repr(float(v))
