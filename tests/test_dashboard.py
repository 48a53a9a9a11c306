"""The Grafana dashboard (deploy/grafana/) against the server and docker-compose.yml, so that it cannot
rot unnoticed: every metric its PromQL names is one a live app exports on /metrics, every panel uses
the provisioned datasource, Grafana's own schema reads it as written (tests/grafana_schema.py), and
compose mounts the provisioning files that exist where Grafana reads them."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from scripts.dashboard_queries import FAILURE_PANELS, concrete, expressions, panels
from server.api.app import create_app
from tests.api_support import make_store, open_client, settings_for
from tests.grafana_schema import schema_problems

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "softmux.json"
PROVISIONING = GRAFANA / "provisioning"

# ---- PromQL: the metric names an expression reads ----------------------------------------------------
_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")  # label matchers (strings already gone)
_RANGES = re.compile(r"\[[^\]]*\]")  # range and subquery selectors: [5m], [$__rate_interval]
_GROUPINGS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE)
# a whole identifier that is not a function call, a $variable or part of a number
_IDENTIFIER = re.compile(r"(?<![\w$.:])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = set("and or unless bool offset by without on ignoring group_left group_right inf nan".split())


def metric_names(expr: str) -> set[str]:
    bare = _STRINGS.sub('""', expr)
    for pattern in (_MATCHERS, _RANGES, _GROUPINGS):
        bare = pattern.sub(" ", bare)
    return {name for name in _IDENTIFIER.findall(bare) if name.lower() not in _KEYWORDS}


def test_metric_names_parse_promql():
    expr = (
        "histogram_quantile(0.95, sum by (le, task) "
        '(rate(a_seconds_bucket{outcome=~"x|y", task!="z"}[$__rate_interval])))'
        " / on(task) group_left(weight) b_total offset 5m > bool 1e3"
        " and c unless sum without (phase) (d:rule)"
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c", "d:rule"}
    assert metric_names("rate(requests_total[1m]) * $scale") == {"requests_total"}


# ---- the dashboard -------------------------------------------------------------------------------------
def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def exported_series(text: str) -> dict[str, tuple[str, str]]:
    """Each series name /metrics can carry -> (its family, the family's type): a counter's `_total`, a
    histogram's `_bucket`, `_sum` and `_count`, so that `softmux_request_count_total` resolves to the
    counter, not to a histogram named `softmux_request`."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
    }
    out = {}
    for family in text_string_to_metric_families(text):
        for suffix in suffixes.get(family.type, ("",)):
            out[family.name + suffix] = (family.name, family.type)
    return out


@pytest.fixture(scope="module")
def metrics_text(lm, tmp_path_factory) -> str:
    """/metrics of a live app on the tiny model after one request (torch ops: the metrics do not
    depend on the native kernels, and building them would cost minutes whenever their source changed)."""
    store = tmp_path_factory.mktemp("dashboard-store")
    make_store(store, lm.hidden_size, broken=False)
    app = create_app(settings_for(store, native_kernels=False), loader=lambda: lm, wait=True)

    async def scrape() -> str:
        text = ""
        async for client in open_client(app):  # runs the lifespan: start, then drain and stop
            request = {"task": "alpha", "inputs": "one request", "parameters": {"max_new_tokens": 4}}
            r = await client.post("/generate", json=request)
            assert r.status_code == 200, r.text
            text = (await client.get("/metrics")).text
        return text

    return asyncio.run(scrape())


def test_every_metric_the_dashboard_reads_is_exported(metrics_text):
    series = exported_series(metrics_text)
    exprs = expressions(load_dashboard())
    assert len(exprs) >= 15
    used = {name: expr for expr in exprs for name in metric_names(expr)}
    missing = {name: expr for name, expr in used.items() if name not in series}
    assert not missing, f"the dashboard reads metrics /metrics does not export: {missing}"
    for name in used:  # buckets only under histogram_quantile, aggregated keeping `le`
        if name.endswith("_bucket") and series[name][1] == "histogram":
            bucket_exprs = [e for e in exprs if name in metric_names(e)]
            assert all(
                "histogram_quantile" in e and re.search(r"by \([^)]*\ble\b", e) for e in bucket_exprs
            ), name
    # the dashboard covers what issue 25 asked for
    families = {series[n][0] for n in used}
    for family in (
        "softmux_task_generated_tokens",
        "softmux_request_time_to_first_token_seconds",
        "softmux_request_duration_seconds",
        "softmux_task_queue_size",
        "softmux_batch_forward_size",
        "softmux_kv_cache_blocks_used",
        "softmux_prefix_cache_hit_requests",
        "softmux_request_count",
    ):
        assert family in families, family


def test_grafanas_own_schema_reads_the_dashboard_as_written():
    assert schema_problems(load_dashboard()) == []


def _mutated(change) -> dict:
    dashboard = load_dashboard()
    change(dashboard, next(p for p in dashboard["panels"] if p["type"] == "timeseries"))
    return dashboard


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d, p: p["targets"][0].update(legendFormt="{{task}}"), "legendFormt: not a field"),
        (lambda d, p: d.update(refresh_interval="10s"), "refresh_interval: not a field"),
        (lambda d, p: p["options"]["legend"].update(displayMode="lst"), "'lst' is not one of"),
        (lambda d, p: p["fieldConfig"]["defaults"].update(min="0"), "'0' is not a float"),
        (lambda d, p: p["gridPos"].update(w="12"), "'12' is not a int"),
        (lambda d, p: p.update(type="timeseriez"), "no panel plugin of type 'timeseriez'"),
    ],
    ids=["misspelt query field", "unknown top-level field", "enum", "number as string", "int", "panel type"],
)
def test_the_schema_check_finds_what_grafana_would_not_read(change, expected):
    problems = schema_problems(_mutated(change))
    assert any(expected in problem for problem in problems), problems


def test_the_schema_check_reads_the_panels_of_a_collapsed_row():
    dashboard = load_dashboard()
    row, inner = dashboard["panels"][0], dashboard["panels"][1:5]  # a row and the panels under it
    inner[0]["type"] = "timeseriez"
    row.update(collapsed=True, panels=inner)  # Grafana keeps a collapsed row's panels inside it
    dashboard["panels"] = [row, *dashboard["panels"][5:]]
    assert any("no panel plugin of type 'timeseriez'" in p for p in schema_problems(dashboard))


def provisioned_datasources() -> list[dict]:
    files = sorted((PROVISIONING / "datasources").glob("*.y*ml"))
    return [ds for f in files for ds in yaml.safe_load(f.read_text())["datasources"]]


def test_panels_use_the_provisioned_datasource():
    uids = {ds["uid"] for ds in provisioned_datasources()}
    assert len(uids) == 1
    for panel in panels(load_dashboard()["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] in uids, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] in uids, panel["title"]


def test_compose_provisions_grafana_from_the_files_that_exist():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert {"softmux", "prometheus", "grafana"} <= set(services)
    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana-oss")
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"

    mounts = {}  # container path -> host path
    for volume in grafana["volumes"]:
        host, container = volume.split(":")[:2]
        host_path = (ROOT / host).resolve()
        assert host_path.exists(), f"compose mounts {host}, which does not exist"
        mounts[container] = host_path

    def on_host(container_path: str) -> Path:
        for container, host in mounts.items():
            if container_path == container or container_path.startswith(container + "/"):
                return host / Path(container_path).relative_to(container)
        raise AssertionError(f"{container_path} is not mounted into the grafana service")

    # every provisioning folder here is mounted where Grafana reads it
    for folder in sorted(p for p in PROVISIONING.iterdir() if p.is_dir()):
        assert on_host(f"/etc/grafana/provisioning/{folder.name}") == folder.resolve(), folder.name
    # the dashboard provider reads a mounted folder that holds the dashboard; it is also the home page
    providers = [
        p
        for f in (PROVISIONING / "dashboards").glob("*.y*ml")
        for p in yaml.safe_load(f.read_text())["providers"]
    ]
    assert any(on_host(p["options"]["path"]) == DASHBOARD.parent.resolve() for p in providers)
    assert on_host(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]) == DASHBOARD.resolve()
    # the datasource points at compose's Prometheus
    for ds in provisioned_datasources():
        host = re.match(r"https?://([^:/]+)", ds["url"])
        assert host and host.group(1) in services, ds["url"]


def test_the_query_script_names_real_panels_and_leaves_no_grafana_variable():
    """scripts/dashboard_queries.py evaluates the dashboard outside Grafana: every panel it lets stay
    empty must exist, and every expression must be concrete PromQL once Grafana's variables are set."""
    dashboard = load_dashboard()
    titles = {panel.get("title") for panel in panels(dashboard["panels"])}
    assert FAILURE_PANELS <= titles, FAILURE_PANELS - titles
    assert not [e for e in expressions(dashboard) if "$" in concrete(e)]


def test_the_preview_draws_every_panel_under_its_row_with_grafanas_legends():
    from scripts.dashboard_preview import legend, sections

    dashboard = load_dashboard()
    every = list(panels(dashboard["panels"]))
    bands = sections(dashboard)
    assert [title for title, _ in bands] == [p["title"] for p in every if p["type"] == "row"]
    drawn = [p["title"] for _, lines in bands for line in lines for p in line]
    assert sorted(drawn) == sorted(p["title"] for p in every if p["type"] != "row")
    for _, lines in bands:  # each line is one gridPos.y, left to right
        for line in lines:
            assert len({p["gridPos"]["y"] for p in line}) == 1
            assert [p["gridPos"]["x"] for p in line] == sorted(p["gridPos"]["x"] for p in line)
    assert legend("{{task}} {{ phase }}", {"task": "topic", "phase": "decode"}) == "topic decode"
    assert legend("p95", {"le": "1"}) == "p95"
