"""Evaluate every PromQL expression of the Grafana dashboard against a live Prometheus.

    python scripts/dashboard_queries.py --prometheus http://127.0.0.1:9090

Grafana is not needed: its range variables are replaced by a fixed window, as Grafana would at a
15 s scrape interval. Prints each expression with the number of series it returned; exits 1 when
Prometheus refuses one (a PromQL error) or when one returned nothing, except on the panels that only
count failures (empty there means nothing failed). Run it after some load, so that rates have samples.
`tests/test_dashboard.py` checks the names statically; this checks them against a real Prometheus.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "dashboards" / "softmux.json"
# Grafana's built-in range variables, at a 15 s scrape interval (its $__rate_interval is at least 4
# scrapes).
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}
# Panels whose series exist only once something failed or was refused: empty is a healthy answer.
FAILURE_PANELS = {"Errors/s by kind", "Queue refusals/s by task", "Preemptions/s by task"}


def panels(items: list[dict]) -> Iterator[dict]:
    """Every panel, including those inside collapsed rows."""
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def expressions(dashboard: dict) -> list[str]:
    """The PromQL of every panel target and of every query variable."""
    exprs = [t["expr"] for p in panels(dashboard["panels"]) for t in p.get("targets", []) if t.get("expr")]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if variable.get("type") == "query" and query:
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def concrete(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def evaluate(client: httpx.Client, expr: str) -> tuple[int | None, str]:
    """(series returned, "") or (None, Prometheus's error)."""
    r = client.get("/api/v1/query", params={"query": concrete(expr)})
    body = r.json()
    if body.get("status") != "success":
        return None, f"{body.get('errorType')}: {body.get('error')}"
    return len(body["data"]["result"]), ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    args = parser.parse_args()

    dashboard = json.loads(args.dashboard.read_text())
    failures, empty, total = 0, 0, 0
    with httpx.Client(base_url=args.prometheus, timeout=10) as client:
        for panel in panels(dashboard["panels"]):
            for target in panel.get("targets", []):
                if not target.get("expr"):
                    continue
                total += 1
                series, error = evaluate(client, target["expr"])
                if series is None:
                    failures += 1
                    status = f"ERROR {error}"
                elif series == 0 and panel["title"] in FAILURE_PANELS:
                    status = "empty (nothing failed)"
                elif series == 0:
                    empty += 1
                    status = "EMPTY"
                else:
                    status = f"{series} series"
                print(f"{panel['title']:<60} {status:<24} {concrete(target['expr'])}")
    print(f"{total} expressions: {total - failures - empty} answered, {empty} empty, {failures} refused")
    return 1 if failures or empty else 0


if __name__ == "__main__":
    sys.exit(main())
