"""Prometheus metrics: a private registry, collectors over live daemon data, a tiny HTTP endpoint.

What it owns: the metric names and the local scrape endpoint (``broker.metrics_socket``,
a unix socket, and/or ``broker.metrics_port`` on 127.0.0.1). What it must not do:
keep its own copy of state the manager already has. Gauges and counters are read
from the manager, runner, attach hub and audit log at scrape time; only the
time-to-shell histogram is observed here, because nothing else measures it.

No global registry: every daemon (and every test) gets its own.
"""

from __future__ import annotations

import asyncio
import grp
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric,
                                   SummaryMetricFamily)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from . import log as _log
from .server import bind_unix
from .session import State

#: Seconds from an ``ensure`` request to its ready reply. Cold starts include sbatch,
#: scheduling and the instance start; warm ones are a lookup.
SHELL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0,
                 60.0, 120.0, 300.0)
REQUEST_LIMIT = 8192
REQUEST_TIMEOUT = 5.0


class LiveCollector:
    """Reads the daemon's live objects at scrape time (a prometheus-client custom collector)."""

    def __init__(self, manager: Any, hub: Any = None, ops: Any = None, owner: Metrics | None = None,
                 agents: Any = None) -> None:
        self.manager = manager
        self.hub = hub
        self.ops = ops
        self.owner = owner
        self.agents = agents

    def collect(self) -> Iterator[Metric]:
        m = self.manager
        by_state = GaugeMetricFamily("sbroker_sessions", "Sessions known to the broker, by state "
                                     "(ended and failed: since the daemon started)", labels=["state"])
        counts = {s.value: m.finished.get(s.value, 0) for s in State}
        for session in list(m.sessions.values()):
            counts[session.state.value] += 1
        for state, n in counts.items():
            by_state.add_metric([state], n)
        yield by_state

        by_profile = GaugeMetricFamily("sbroker_live_sessions_by_profile", "Live sessions by profile "
                                       "(broker.toml [profiles]; \"unknown\": a job whose tag names none)",
                                       labels=["profile"])
        live_profiles: dict[str, int] = {p.name: 0 for p in m.config.profiles}
        for session in list(m.sessions.values()):
            if session.live:
                name = session.profile or "unknown"
                live_profiles[name] = live_profiles.get(name, 0) + 1
        for name, n in sorted(live_profiles.items()):
            by_profile.add_metric([name], n)
        yield by_profile

        failures = CounterMetricFamily("sbroker_session_failures", "Sessions that failed, by reason class",
                                       labels=["reason"])
        for reason, n in sorted(m.failures.items()):
            failures.add_metric([reason], n)
        yield failures

        calls = CounterMetricFamily("sbroker_scheduler_calls", "Commands run through the SLURM runner, "
                                    "by command name", labels=["command"])
        for command, n in sorted(m.runner.calls.items()):
            calls.add_metric([command], n)
        yield calls

        poll = SummaryMetricFamily("sbroker_poll_cycle_seconds", "Duration of the batched squeue poll cycles",
                                   count_value=m.poll_cycles, sum_value=m.poll_seconds)
        yield poll

        ready = m.time_to_ready
        yield SummaryMetricFamily("sbroker_submit_to_ready_seconds", "From sbatch to INSTANCE_READY",
                                  count_value=len(ready), sum_value=float(sum(ready)))

        yield GaugeMetricFamily("sbroker_controller_up", "1 if the last SLURM query reached the controller",
                                value=1 if m.controller_ok else 0)
        yield CounterMetricFamily("sbroker_audit_write_failures", "Audit log lines that could not be written",
                                  value=m.audit.failures)

        if self.hub is not None:
            yield CounterMetricFamily("sbroker_attaches", "Terminals handed out to the session agents (logins, sbroker attach)",
                                      value=self.hub.attach_count)
        if self.agents is not None:
            attached = self.agents.attached_sessions()
            yield GaugeMetricFamily("sbroker_attached_sessions", "Sessions whose agent last reported an attached terminal "
                                    "(status files, read at most every 10 s)",
                                    value=attached)
        if self.ops is not None:
            policy = CounterMetricFamily("sbroker_policy_actions", "Idle warnings and idle ends", labels=["action"])
            for action, n in sorted(self.ops.counts.items()):
                policy.add_metric([action], n)
            yield policy
            reaped = CounterMetricFamily("sbroker_reaped", "Leftovers removed by the reaper", labels=["kind"])
            for kind, n in sorted(self.ops.reaper.totals.items()):
                reaped.add_metric([kind], n)
            yield reaped
            yield from _looplag(getattr(self.ops, "looplag", None))
        if self.owner is not None:
            yield CounterMetricFamily("sbroker_bad_scrapes", "Metrics requests refused as malformed",
                                      value=self.owner.bad_requests)


def _looplag(lag: Any) -> Iterator[Metric]:
    """The event loop's lateness (:mod:`broker.looplag`): p50/p99/max over its recent window."""
    if lag is None:
        return
    summary = lag.summary()
    gauge = GaugeMetricFamily("sbroker_event_loop_lag_seconds", "How late the daemon's 100 ms timer fired "
                              "(the event loop was busy), over the last 5 minutes", labels=["quantile"])
    for label, value in (("0.5", summary.p50), ("0.99", summary.p99), ("1", summary.max)):
        gauge.add_metric([label], value)
    yield gauge
    yield GaugeMetricFamily("sbroker_event_loop_lag_max_seconds", "The latest timer tick over the last 5 minutes",
                            value=summary.max)
    yield CounterMetricFamily("sbroker_event_loop_late_ticks", "Timer ticks more than 250 ms late (each logged)",
                              value=summary.late)
    from .looplag import BUCKETS

    hist = HistogramMetricFamily("sbroker_event_loop_tick_lateness", "Lateness of every 100 ms timer tick since start "
                                 "(difference two scrapes for an interval's distribution)", unit="seconds")
    hist.add_metric([], [*((f"{b:g}", lag.buckets[i]) for i, b in enumerate(BUCKETS)), ("+Inf", lag.buckets[-1])],
                    sum_value=lag.total)
    yield hist


class Metrics:
    """The registry and the scrape endpoint(s)."""

    def __init__(self, manager: Any, hub: Any = None, ops: Any = None, agents: Any = None) -> None:
        self.manager = manager
        self.config = manager.config
        self.log = _log.get("sbroker.metrics")
        self.registry = CollectorRegistry(auto_describe=True)
        self.time_to_shell = Histogram("sbroker_time_to_shell_seconds",
                                       "From an ensure request to the ready session (cold: submitted a job; "
                                       "warm: the session was already ready)", ["path"],
                                       buckets=SHELL_BUCKETS, registry=self.registry)
        for path in ("cold", "warm"):
            self.time_to_shell.labels(path)
        self.servers: list[asyncio.base_events.Server] = []
        self.bad_requests = 0
        self.scrapes = 0
        self.registry.register(LiveCollector(manager, hub, ops, self, agents))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ endpoint

    async def start(self) -> None:
        cfg = self.config
        if cfg.metrics_socket:
            path = Path(cfg.metrics_socket)
            sock = bind_unix(path, "broker.metrics_socket", umask=0o177)
            # Root and the admin group may scrape (a local Prometheus agent in that group).
            try:
                os.chown(path, 0, grp.getgrnam(cfg.admin_group).gr_gid)
                os.chmod(path, 0o660)
            except (KeyError, PermissionError):
                pass
            self.servers.append(await asyncio.start_unix_server(self._handle, sock=sock))
            self.log.info("metrics_listening", socket=str(path))
        if cfg.metrics_port:
            server = await asyncio.start_server(self._handle, "127.0.0.1", cfg.metrics_port, reuse_address=True)
            self.servers.append(server)
            self.log.info("metrics_listening", address=f"127.0.0.1:{cfg.metrics_port}")

    async def close(self) -> None:
        for server in self.servers:
            server.close()
            await server.wait_closed()
        if self.config.metrics_socket and self.servers:
            try:
                Path(self.config.metrics_socket).unlink()
            except OSError:
                pass

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body, ctype = await asyncio.wait_for(self._answer(reader), REQUEST_TIMEOUT)
        except (asyncio.TimeoutError, asyncio.LimitOverrunError, ValueError, ConnectionError,
                asyncio.IncompleteReadError):
            self.bad_requests += 1
            status, body, ctype = "400 Bad Request", b"bad request: expected 'GET /metrics HTTP/1.x'\n", "text/plain"
        except Exception:  # a bug in a collector must not take the daemon down
            self.log.exception("metrics_failed")
            status, body, ctype = "500 Internal Server Error", b"metrics collection failed\n", "text/plain"
        head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        try:
            writer.write(head + body)
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, bytes, str]:
        """Parse one HTTP/1.x request head; only ``GET /metrics`` (or ``/``) is served."""
        head = b""
        while not head.endswith(b"\r\n\r\n") and not head.endswith(b"\n\n"):
            chunk = await reader.read(REQUEST_LIMIT)
            if not chunk:
                break
            head += chunk
            if len(head) > REQUEST_LIMIT:
                raise ValueError("request head too large")
        line = head.split(b"\n", 1)[0].strip()
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            raise ValueError(f"malformed request line {line[:80]!r}")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            self.bad_requests += 1
            return "405 Method Not Allowed", b"only GET is supported\n", "text/plain"
        if target not in (b"/metrics", b"/"):
            self.bad_requests += 1
            return "404 Not Found", b"try /metrics\n", "text/plain"
        self.scrapes += 1
        body = self.render()
        return "200 OK", (b"" if method == b"HEAD" else body), CONTENT_TYPE_LATEST
