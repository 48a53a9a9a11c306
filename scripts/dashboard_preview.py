"""Draw the Grafana dashboard's panels from a live Prometheus, without Grafana.

    python scripts/dashboard_preview.py --prometheus http://127.0.0.1:9090 --minutes 10 --out preview.png

Each panel of deploy/grafana/dashboards/softmux.json is drawn where its gridPos puts it, with its title,
unit and legend, from its own expressions over the last --minutes (query_range at the dashboard's
15 s scrape step). It is a preview of what the dashboard plots, made where Grafana cannot run
(`make compose-test PREVIEW=...`); Grafana's own look (colours, tooltips, thresholds) is not copied.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import httpx
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.ticker import FuncFormatter, PercentFormatter  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.dashboard_queries import DASHBOARD, concrete, panels  # noqa: E402

GRID_COLUMNS = 24  # Grafana's grid: gridPos.w of 24 is the full width
STEP_SECONDS = 15
Series = tuple[str, list[float], list[float]]  # (legend, unix times, values)


def legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's legendFormat: {{label}} replaced by the series' label value."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template) or str(labels)


def query_range(client: httpx.Client, expr: str, start: float, end: float) -> list[dict]:
    params = {"query": concrete(expr), "start": start, "end": end, "step": STEP_SECONDS}
    body = client.get("/api/v1/query_range", params=params).json()
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {concrete(expr)!r}: {body.get('error')}")
    return body["data"]["result"]


def panel_series(client: httpx.Client, panel: dict, start: float, end: float) -> list[Series]:
    out = []
    for target in panel.get("targets", []):
        for result in query_range(client, target["expr"], start, end):
            times = [float(t) for t, _ in result["values"]]
            values = [float(v) for _, v in result["values"]]  # "NaN" parses to nan: a gap
            out.append((legend(target.get("legendFormat", ""), result["metric"]), times, values))
    return out


def draw_panel(ax: Axes, panel: dict, series: list[Series], start: float, end: float) -> None:
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
    ax.set_title(panel["title"], fontsize=9, loc="left")
    for name, times, values in sorted(series):
        ax.plot([(t - start) / 60 for t in times], values, linewidth=1.2, label=name)
    if unit == "percentunit":
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    elif unit == "s":
        ax.yaxis.set_major_formatter(
            FuncFormatter(lambda v, _: f"{v * 1000:.0f} ms" if v < 1 else f"{v:.1f} s")
        )
    elif unit == "reqps":
        ax.set_ylabel("req/s", fontsize=7)
    ax.set_xlim(0, (end - start) / 60)
    ax.set_ylim(bottom=0)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=6, loc="upper left", ncol=2, frameon=False)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")


def sections(dashboard: dict) -> list[tuple[str, list[list[dict]]]]:
    """(row title, the row's panels in lines by gridPos.y, each line ordered by x), in dashboard order."""
    out: list[tuple[str, list[dict]]] = []
    for panel in sorted(panels(dashboard["panels"]), key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        if panel["type"] == "row":
            out.append((panel["title"], []))
        elif out:
            out[-1][1].append(panel)
        else:
            out.append(("", [panel]))
    return [
        (
            title,
            [
                [p for p in members if p["gridPos"]["y"] == y]
                for y in sorted({p["gridPos"]["y"] for p in members})
            ],
        )
        for title, members in out
    ]


def draw(dashboard: dict, client: httpx.Client, start: float, end: float, out: Path, caption: str) -> int:
    """Draw every panel, one band per dashboard row; returns how many panels had data."""
    bands = sections(dashboard)
    lines = sum(len(band_lines) for _, band_lines in bands)
    fig = plt.figure(figsize=(16, 3.3 * lines + 0.5), layout="constrained")
    fig.suptitle(caption, fontsize=10, x=0.01, ha="left")
    with_data = 0
    for sub, (title, band_lines) in zip(
        np.atleast_1d(fig.subfigures(len(bands), 1, height_ratios=[len(b[1]) for b in bands])), bands
    ):
        sub.suptitle(title, fontsize=12, weight="bold", x=0.01, ha="left")
        grid = sub.add_gridspec(len(band_lines), GRID_COLUMNS)
        for line_index, line in enumerate(band_lines):
            for panel in line:
                x, w = panel["gridPos"]["x"], panel["gridPos"]["w"]
                ax = sub.add_subplot(grid[line_index, x : x + w])
                series = panel_series(client, panel, start, end)
                with_data += bool(series)
                draw_panel(ax, panel, series, start, end)
                ax.set_xlabel("minutes", fontsize=7)
    fig.savefig(out, dpi=90)
    return with_data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    parser.add_argument("--minutes", type=float, default=15, help="the window drawn, ending now")
    parser.add_argument("--caption", default="softmux dashboard panels (preview drawn from Prometheus)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    dashboard = json.loads(args.dashboard.read_text())
    end = time.time()
    with httpx.Client(base_url=args.prometheus, timeout=30) as client:
        with_data = draw(dashboard, client, end - args.minutes * 60, end, args.out, args.caption)
    print(f"{args.out}: {with_data} panels with data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
