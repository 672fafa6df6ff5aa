"""Each stage's figures for the Ray dashboard and Prometheus, through `ray.util.metrics`.

Ray's metrics agent on every node serves what any process of the node records, in Prometheus format, on the
node's metrics export port; the dashboard's Metrics view and clusters/grafana-dashboard.json read it from
Prometheus. Every name is prefixed `humor_ray_` and every series is tagged with the run and the stage.
`HUMOR_RAY_METRICS=0` turns the export off (the overhead benchmark compares the two).
"""

from __future__ import annotations

import os

PREFIX = "humor_ray_"
TAGS = ("run", "stage")

# One Ray metric object per name and process: Ray keys its series by name, and a second object of the
# same name with other tag keys would be rejected.
_metrics: dict[str, object] = {}


def enabled() -> bool:
    import ray

    return os.environ.get("HUMOR_RAY_METRICS", "1") != "0" and ray.is_initialized()


class StageMetrics:
    """The figures of one run of one stage: `count` adds to a counter, `gauge` sets a current value;
    extra tags (a reason, a split) are keyword arguments."""

    def __init__(self, run: str, stage: str):
        self.tags = {"run": run, "stage": stage}

    def count(self, name: str, value: float, description: str, **tags: str) -> None:
        # Ray counters take only positive increments; a zero changes nothing anyway.
        if value > 0 and enabled():
            self._get("Counter", name, description, tags).inc(value, tags={**self.tags, **tags})

    def gauge(self, name: str, value: float, description: str, **tags: str) -> None:
        if enabled():
            self._get("Gauge", name, description, tags).set(value, tags={**self.tags, **tags})

    @staticmethod
    def _get(kind: str, name: str, description: str, tags: dict):
        from ray.util import metrics

        if name not in _metrics:
            _metrics[name] = getattr(metrics, kind)(PREFIX + name, description=description,
                                                    tag_keys=TAGS + tuple(sorted(tags)))
        return _metrics[name]
