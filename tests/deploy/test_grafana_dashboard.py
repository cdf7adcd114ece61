"""deploy/grafana/edge-agent.json asks only for series a real agent exposes on /metrics."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import AgentProcess

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "edge-agent.json"
SERIES = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[{\[]")


def test_every_series_the_dashboard_queries_is_on_a_real_agents_metrics(serving_v1: AgentProcess) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs and all("$instance" in e for e in exprs)  # every panel follows the device picker
    wanted = {name for e in exprs for name in SERIES.findall(e)}
    assert "edge_agent_request_latency_seconds_bucket" in wanted  # the extraction finds what it must

    for _ in range(3):  # traffic, so the request and latency series exist
        assert serving_v1.predict(["turn on the lights"])[0] == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{serving_v1.http_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    exposed = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    assert wanted <= exposed, f"the dashboard queries series the agent does not expose: {sorted(wanted - exposed)}"
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "instance")
    assert "edge_agent_build_info" in variable["definition"] and "edge_agent_build_info" in exposed
