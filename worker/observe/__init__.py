"""Observability, three concerns in three files: :mod:`~worker.observe.logs` (structlog and
scrubbing), :mod:`~worker.observe.metrics` (Prometheus series from outcomes) and
:mod:`~worker.observe.http` (``/metrics``, ``/livez``, ``/readyz``).

Trace propagation lives in :mod:`worker.tracing` (the client needs it without these imports).
"""
