"""A real Prometheus server (Debian's `prometheus`) scrapes a real tweed agent in the lab.

Two hosts run tweed with the default health/metrics address (127.0.0.1:8475: each host
namespace has its own loopback, so they do not clash). Prometheus runs inside host 1's
namespace, scrapes 127.0.0.1:8475 every second and listens on 127.0.0.1 there; the test
asks its HTTP API from inside the namespace. Its data dir is a temp dir, removed after;
the process is stopped by its PID, also on failure.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest

from agent import __version__
from tests.lab.agents import bring_up, put_config, routes, subnet_key, wait_for
from tests.support.netns import Namespace, stop_processes

pytestmark = pytest.mark.lab

DEFAULT_METRICS = "127.0.0.1:8475"
PROM_ADDR = "127.0.0.1:9090"  # inside host 1's namespace
DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"

_FETCH = (
    "import sys, urllib.request\n"
    "with urllib.request.urlopen(sys.argv[1], timeout=5) as r:\n"
    " sys.stdout.write(r.read().decode())\n"
)


def api(host: Namespace, path: str, **params: str) -> dict:
    """GET Prometheus' API at `path` from inside `host`'s namespace; the decoded JSON."""
    url = f"http://{PROM_ADDR}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    out = host.exec([sys.executable, "-c", _FETCH, url], timeout=15).stdout
    return json.loads(out)


def query(host: Namespace, expr: str) -> list[dict]:
    """An instant query's result vector (a list of {"metric": ..., "value": [t, "v"]})."""
    doc = api(host, "/api/v1/query", query=expr)
    assert doc["status"] == "success", (expr, doc)
    assert doc["data"]["resultType"] == "vector", (expr, doc)
    return doc["data"]["result"]


def value(host: Namespace, expr: str) -> float | None:
    """The single value of `expr`, or None while it has no result."""
    result = query(host, expr)
    if not result:
        return None
    assert len(result) == 1, (expr, result)
    return float(result[0]["value"][1])


def target_up(host: Namespace) -> dict | None:
    try:
        doc = api(host, "/api/v1/targets")
    except subprocess.CalledProcessError:
        return None  # not listening yet
    targets = doc["data"]["activeTargets"]
    return next((t for t in targets if t["health"] == "up"), None)


def test_prometheus_scrapes_an_agent_and_reads_its_series(lab, tmp_path):
    prometheus = shutil.which("prometheus")
    assert prometheus, "the Debian package prometheus is not installed (make packages)"
    etcd = lab.start_etcd()
    put_config(etcd)
    # Neither agent is given --healthz-port: both serve on the default port, each in its
    # own namespace.
    h1, a1, _c1 = bring_up(lab, etcd, tmp_path, 1)
    _h2, a2, _c2 = bring_up(lab, etcd, tmp_path, 2)
    wait_for(lambda: "via 192.168.100.2" in routes(h1, a2.subnet), what="route h1->h2")

    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: tweed\n    static_configs:\n"
        f"      - targets: ['{DEFAULT_METRICS}']\n"
    )
    with tempfile.TemporaryDirectory(prefix="tweed-prometheus-") as data, \
            open(tmp_path / "prometheus.log", "wb") as log:
        proc = h1.popen([
            prometheus, f"--config.file={config}", f"--storage.tsdb.path={data}",
            f"--web.listen-address={PROM_ADDR}", "--log.level=warn",
        ], stdout=log, stderr=subprocess.STDOUT)
        try:
            _check_prometheus(h1, a1, etcd, proc, tmp_path / "prometheus.log")
        finally:
            stop_processes([proc], timeout=10)
        assert proc.poll() is not None


def _check_prometheus(h1, a1, etcd, proc, log_path: Path) -> None:
    def up() -> dict | None:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{log_path.read_text(errors='replace')}")
        return target_up(h1)

    target = wait_for(up, timeout=30, step=0.25, what="the tweed target is up in Prometheus")
    assert target["labels"]["job"] == "tweed"
    assert target["scrapeUrl"] == f"http://{DEFAULT_METRICS}/metrics"
    assert target["lastError"] == ""

    sel = '{job="tweed"}'
    assert value(h1, f"up{sel}") == 1
    assert value(h1, f"tweed_ready{sel}") == 1
    assert value(h1, 'tweed_peers{job="tweed",backend="host-gw"}') == 1
    build = query(h1, f"tweed_build_info{sel}")
    assert build[0]["metric"]["version"] == __version__
    assert value(h1, f'tweed_lease_info{{job="tweed",subnet="{a1.subnet}"}}') == 1
    left = value(h1, f"tweed_lease_expiry_timestamp_seconds{sel} - time()")
    assert left is not None and 86400 - 120 < left <= 86400 + 5  # the default 24 h TTL
    assert value(h1, f"tweed_event_to_kernel_seconds_count{sel}") >= 1
    assert value(h1, 'tweed_kernel_operations_total{job="tweed",kind="route",'
                     'op="replace",result="ok"}') >= 1
    assert value(h1, 'tweed_etcd_requests_total{job="tweed",operation="create_subnet",'
                     'result="ok"}') == 1
    assert value(h1, f"tweed_etcd_reachable{sel}") == 1
    assert value(h1, f"process_resident_memory_bytes{sel}") > 0

    # A new peer lease in etcd shows in Prometheus within a few scrapes.
    etcd.put(subnet_key("10.5.250.0/24"),
             '{"PublicIP":"192.168.100.9","PublicIPv6":null,"BackendType":"host-gw"}')
    wait_for(lambda: value(h1, 'tweed_peers{job="tweed",backend="host-gw"}') == 2,
             timeout=20, step=0.25, what="tweed_peers 2 in Prometheus")
    wait_for(lambda: (value(h1, f"tweed_event_to_kernel_seconds_count{sel}") or 0) >= 2,
             timeout=20, step=0.25, what="a second event-to-kernel observation")
    p99 = value(h1, "histogram_quantile(0.99, sum by (le) "
                    "(rate(tweed_event_to_kernel_seconds_bucket[1m])))")
    assert p99 is not None and 0 < p99 < 10

    # Every query of the Grafana dashboard is valid PromQL on this Prometheus.
    exprs = _dashboard_exprs()
    assert len(exprs) >= 20
    start = time.monotonic()
    for expr in exprs:
        concrete = (expr.replace("$__rate_interval", "1m").replace("$job", ".*")
                    .replace("$instance", ".*"))
        assert "$" not in concrete, expr
        query(h1, concrete)
    assert time.monotonic() - start < 30
    assert value(h1, 'sum(tweed_ready{job=~".*",instance=~".*"})') == 1


def _dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    # The template variables' queries are label_values() (Grafana's, not PromQL): their
    # selector must name an exported metric.
    for var in doc["templating"]["list"]:
        assert re.fullmatch(r"label_values\(tweed_build_info(\{[^}]*\})?, \w+\)",
                            var["query"]["query"]), var
    return exprs
