"""Prometheus metrics: HTTP requests of this process, and job-store numbers read at scrape time.

Job counts, durations and queue depth come from the job table (the source of truth), so
every API replica reports the same values whichever worker ran the jobs.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import case, func, select

from app.db import JOB_STATES, TERMINAL_STATES, Job, WebhookDelivery

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400)


class JobCollector:
    def __init__(self, services):
        self.services = services

    def _duration(self, dialect: str):
        if dialect == "sqlite":
            return (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86400.0
        return func.extract("epoch", Job.finished_at - Job.started_at)

    def collect(self):
        svc = self.services
        with svc.db.read() as s:
            counts = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            dur = self._duration(svc.db.engine.dialect.name)
            cols = [func.sum(case((dur <= b, 1), else_=0)) for b in DURATION_BUCKETS]
            rows = s.execute(select(Job.state, func.count(), func.sum(dur), *cols)
                             .where(Job.state.in_(TERMINAL_STATES), Job.started_at.is_not(None))
                             .group_by(Job.state)).all()
            pending_hooks = s.scalar(select(func.count()).select_from(WebhookDelivery).where(
                WebhookDelivery.delivered_at.is_(None), WebhookDelivery.failed_at.is_(None)))
        jobs = GaugeMetricFamily("ligo_jobs", "Jobs in the job store by state", labels=["state"])
        for state in JOB_STATES:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        hist = HistogramMetricFamily("ligo_job_duration_seconds", "Run time of finished jobs (start to end)",
                                     labels=["state"])
        for state, count, total, *buckets in rows:
            points = [(str(float(b)), int(n or 0)) for b, n in zip(DURATION_BUCKETS, buckets)]
            points.append(("+Inf", int(count)))
            hist.add_metric([state], points, float(total or 0.0))
        yield hist
        depth = GaugeMetricFamily("ligo_queue_depth", "Jobs queued and waiting for a GPU worker")
        depth.add_metric([], counts.get("queued", 0))
        yield depth
        broker = svc.dispatcher.queue_depth()
        if broker is not None:
            msgs = GaugeMetricFamily("ligo_broker_queue_messages", "Messages in the broker's gpu queue")
            msgs.add_metric([], broker)
            yield msgs
        hooks = GaugeMetricFamily("ligo_webhooks_pending", "Webhook deliveries not yet made")
        hooks.add_metric([], pending_hooks or 0)
        yield hooks


class Metrics:
    def __init__(self, services):
        self.registry = CollectorRegistry()
        self.requests = Counter("ligo_http_requests", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("ligo_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
                                 registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60))
        self.registry.register(JobCollector(services))


class MetricsMiddleware:
    """Counts and times every request by its route template (pure ASGI: cheap, streams untouched)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, path, str(status[0])).inc()
            self.metrics.latency.labels(method, path).observe(time.perf_counter() - start)
