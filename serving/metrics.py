"""Prometheus metrics of the step engine, served with BentoML's own at ``/metrics``.

Created in the model service's worker after BentoML has set ``PROMETHEUS_MULTIPROC_DIR`` (so they
land in the multiprocess files that every service's ``/metrics`` reads):

- ``t2i_engine_step_rows``: UNet rows per engine step (the running set's size), a histogram;
- ``t2i_engine_step_requests``: requests per engine step, a histogram;
- ``t2i_engine_step_seconds``: time of one UNet call, a histogram;
- ``t2i_engine_queue_rows``: UNet rows waiting to join the running set, a gauge;
- ``t2i_engine_time_to_first_step_seconds``: from a request's arrival to its first step, a histogram.
"""
from __future__ import annotations

from core.stepper import EngineObserver

ROW_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
TIME_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)


class EngineMetrics(EngineObserver):
    def __init__(self) -> None:
        import prometheus_client as p

        self.rows = p.Histogram("t2i_engine_step_rows", "UNet rows per engine step (the running set's size)",
                                buckets=ROW_BUCKETS)
        self.requests = p.Histogram("t2i_engine_step_requests", "Requests per engine step", buckets=ROW_BUCKETS)
        self.seconds = p.Histogram("t2i_engine_step_seconds", "Seconds per UNet call of the engine",
                                   buckets=TIME_BUCKETS)
        self.queued = p.Gauge("t2i_engine_queue_rows", "UNet rows waiting to join the running set",
                              multiprocess_mode="livemax")
        self.first = p.Histogram("t2i_engine_time_to_first_step_seconds",
                                 "Seconds from a request's arrival to its first denoising step", buckets=TIME_BUCKETS)

    def step(self, rows: int, requests: int, seconds: float) -> None:
        self.rows.observe(rows)
        self.requests.observe(requests)
        self.seconds.observe(seconds)

    def queue(self, rows: int) -> None:
        self.queued.set(rows)

    def first_step(self, seconds: float) -> None:
        self.first.observe(seconds)
