"""The dashboard's charts: SVG rendered on the server by pygal, with no script in them.

pygal draws the axes, series and points; the alert thresholds are shaded with pygal's own projection (its
``view``) through its documented extension point, an XML filter run on the finished tree. The same filter
strips what a static image does not need and the page's policy would refuse: pygal's configuration
``<script>`` (emitted even with ``js=[]``) and the tooltip's ``style`` attribute. What remains is one
``<style>`` element, allowed by its hash in the image's own Content-Security-Policy (``Chart.csp``).

Points are ``circle.dot`` elements, one per plotted value (the browser tests count them).
"""

from __future__ import annotations

import base64
import hashlib
import math
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import pygal
from pygal.style import Style

from warehouse.glucose import RANGE_HIGH_MG_DL, RANGE_LOW_MG_DL, VERY_HIGH_MG_DL, VERY_LOW_MG_DL

FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"
# A series denser than this over the window is drawn as each day's lowest, mean and highest value (a CGM's
# 96 readings a day would otherwise be 2,880 points a month; its shape is the glucose profile's job).
DENSE_READINGS = 400

LABELS = {
    "blood_pressure": "Blood pressure", "heart_rate": "Heart rate", "spo2": "SpO\u2082",
    "respiratory_rate": "Respiratory rate", "body_temperature": "Temperature", "body_weight": "Weight",
    "blood_glucose": "Glucose",
}
UNITS = {"mm[Hg]": "mmHg", "/min": "/min", "%": "%", "Cel": "\u00b0C", "kg": "kg", "mg/dL": "mg/dL"}

_CSS = """
.band{stroke:none}
.band.severe{fill:#dc2626;fill-opacity:.13}
.band.warning{fill:#f59e0b;fill-opacity:.16}
.band.target{fill:#16a34a;fill-opacity:.09}
.band-label{font-size:11px;fill:#4b5563;text-anchor:end;font-family:FONT;
  paint-order:stroke;stroke:#fff;stroke-width:3px;stroke-linejoin:round}
.threshold{stroke:#b45309;stroke-width:1.2;stroke-dasharray:5,4;fill:none}
.axis .guide.line{stroke:#e3e8ee !important;stroke-dasharray:none !important}
.series .line{stroke-width:1.6}
""".replace("FONT", FONT)


def _style(*colors: str, **extra: Any) -> Style:
    """The dashboard's look (its fonts and greys) with these series colours; ``extra`` overrides."""
    return Style(**{
        "background": "transparent", "plot_background": "#ffffff", "foreground": "#3c4856",
        "foreground_strong": "#1d2733", "foreground_subtle": "#5b6675", "font_family": FONT,
        "label_font_size": 11, "major_label_font_size": 11, "legend_font_size": 12, "value_font_size": 11,
        "guide_stroke_color": "#e3e8ee", "major_guide_stroke_color": "#d3dae3", "opacity": ".9",
        "opacity_hover": ".9", "stroke_opacity": "1", "stroke_opacity_hover": "1", "stroke_width": "1.6",
        "stroke_width_hover": "1.6", "transition": "0ms", "colors": colors, **extra})


@dataclass(frozen=True)
class Band:
    """A shaded range of values (``low``/``high`` None: to the edge of the plot)."""
    low: float | None
    high: float | None
    tone: str    # severe | warning | target
    label: str


@dataclass(frozen=True)
class Line:
    """A dashed threshold across the plot (a threshold of a second series drawn on the same axes)."""
    value: float
    label: str


@dataclass(frozen=True)
class Chart:
    svg: str
    csp: str     # this image's own policy: no script at all, its one style element by hash
    points: int  # circle.dot elements drawn


def _static(chart: Any, name: str, bands: Sequence[Band],
            lines: Sequence[Line]) -> Callable[[ET.Element], ET.Element]:
    """The XML filter: thresholds shaded with the chart's projection, scripts and inline styles removed."""

    def apply(root: ET.Element) -> ET.Element:
        ns = "{http://www.w3.org/2000/svg}"
        for parent in list(root.iter()):
            for child in list(parent):
                tag = child.tag.replace(ns, "") if isinstance(child.tag, str) else ""
                if tag == "script" or "tooltip-overlay" in (child.get("class") or ""):
                    parent.remove(child)
        for el in root.iter():
            el.attrib.pop("style", None)
        root.set("role", "img")
        root.set("aria-label", name)
        for el in root:
            if el.tag in ("title", ns + "title"):
                el.text = name
        view, box = chart.view, chart._box
        plot = next(el for el in root.iter() if (el.get("class") or "").split() == ["plot"])
        at = 1  # after the plot's background rectangle
        for band in bands:
            top = view.y(min(band.high if band.high is not None else box.ymax, box.ymax))
            bottom = view.y(max(band.low if band.low is not None else box.ymin, box.ymin))
            if bottom - top <= 0:
                continue
            rect = ET.Element("rect", {"x": "0", "y": f"{top:.2f}", "width": f"{view.width:.2f}",
                                       "height": f"{bottom - top:.2f}", "class": f"band {band.tone}"})
            plot.insert(at, rect)
            at += 1
            # inside the band: near its top when it is tall, on its middle line when it is narrow
            label = ET.Element("text", {"x": f"{view.width - 6:.2f}",
                                        "y": f"{top + min(14.0, (bottom - top) / 2 + 4):.2f}",
                                        "class": "band-label"})
            label.text = band.label
            plot.insert(at, label)
            at += 1
        for line in lines:
            if not box.ymin <= line.value <= box.ymax:
                continue
            y = view.y(line.value)
            plot.insert(at, ET.Element("path", {"d": f"M0 {y:.2f} h{view.width:.2f}", "class": "threshold"}))
            label = ET.Element("text", {"x": f"{view.width - 6:.2f}", "y": f"{y - 4:.2f}", "class": "band-label"})
            label.text = line.label
            plot.insert(at + 1, label)
            at += 2
        return root

    return apply


def _render(chart: Any, name: str, bands: Sequence[Band] = (), lines: Sequence[Line] = ()) -> Chart:
    chart.add_xml_filter(_static(chart, name, bands, lines))
    svg = chart.render(is_unicode=True)
    root = ET.fromstring(svg)
    styles = [el.text or "" for el in root.iter("{http://www.w3.org/2000/svg}style")]
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
                      for s in styles) or "'none'"
    csp = f"default-src 'none'; style-src {hashes}; frame-ancestors 'self'"
    points = sum(1 for el in root.iter("{http://www.w3.org/2000/svg}circle") if "dot" in (el.get("class") or ""))
    return Chart(svg, csp, points)


def _ts(t: datetime) -> float:
    """pygal's abscissa for a naive patient-local time (pygal reads naive datetimes as UTC: shown as is)."""
    return (t - datetime(1970, 1, 1)).total_seconds()


def thresholds_of(metric: str, t: dict[str, float]) -> tuple[list[Band], list[Line]]:
    """The shading of one vital's chart from the patient's alert thresholds (``rule.param`` -> value)."""
    if metric == "blood_pressure":
        s2, sev = t.get("bp_stage2.systolic"), t.get("bp_severe.systolic")
        bands = []
        if s2 is not None:
            bands.append(Band(s2, sev, "warning", f"stage 2 \u2265 {s2:.0f} systolic"))
        if sev is not None:
            bands.append(Band(sev, None, "severe", f"severe \u2265 {sev:.0f} systolic"))
        lines = [Line(v, f"diastolic {v:.0f}") for v in
                 (t.get("bp_stage2.diastolic"), t.get("bp_severe.diastolic")) if v is not None]
        return bands, lines
    if metric == "blood_glucose":
        l2, l1, h2 = (t.get("glucose_level2_low.mg_dl", VERY_LOW_MG_DL),
                      t.get("glucose_level1_low.mg_dl", RANGE_LOW_MG_DL),
                      t.get("glucose_level2_high.mg_dl", VERY_HIGH_MG_DL))
        return [Band(None, l2, "severe", f"very low < {l2:.0f}"), Band(l2, l1, "warning", f"low < {l1:.0f}"),
                Band(RANGE_LOW_MG_DL, RANGE_HIGH_MG_DL, "target",
                     f"target {RANGE_LOW_MG_DL:.0f}\u2013{RANGE_HIGH_MG_DL:.0f}"),
                Band(h2, None, "warning", f"very high > {h2:.0f}")], []
    if metric == "spo2":
        u, lo = t.get("spo2_urgent.percent"), t.get("spo2_low.percent")
        return [b for b in (Band(None, u, "severe", f"urgent < {u:.0f} %") if u else None,
                            Band(u, lo, "warning", f"low < {lo:.0f} %") if lo else None) if b], []
    if metric == "heart_rate":
        lo, hi = t.get("hr_low.per_min"), t.get("hr_high.per_min")
        return [b for b in (Band(None, lo, "severe", f"< {lo:.0f} /min") if lo else None,
                            Band(hi, None, "severe", f"> {hi:.0f} /min") if hi else None) if b], []
    if metric == "body_temperature":
        f = t.get("fever.cel")
        return ([Band(f, None, "warning", f"fever \u2265 {f:.1f} \u00b0C")] if f else []), []
    return [], []


def _range(metric: str, values: list[float], bands: list[Band], lines: list[Line]) -> tuple[float, float]:
    """The value axis: the data and every threshold in view, with a margin."""
    marks = [v for b in bands for v in (b.low, b.high) if v is not None] + [ln.value for ln in lines]
    floor = {"blood_pressure": 40.0, "blood_glucose": 0.0, "spo2": 80.0, "heart_rate": 30.0}.get(metric)
    lo, hi = min(values + marks), max(values + marks)
    pad = max((hi - lo) * 0.08, 1.0)
    lo = max(lo - pad, floor) if floor is not None else lo - pad
    if metric == "spo2":
        hi = min(hi + pad, 100.0)
    else:
        hi = hi + pad
    return lo, hi


def vital_chart(series: dict, start: date, end: date) -> Chart:
    """One vital over the window [start, end] (patient-local days), thresholds shaded."""
    metric, readings = series["metric"], series["readings"]
    unit = UNITS.get(readings[0]["unit"], readings[0]["unit"]) if readings else ""
    bands, lines = thresholds_of(metric, series["thresholds"])
    chart = pygal.DateTimeLine(
        js=[], css=["file://style.css", "file://graph.css", "inline:" + _CSS], style=_style(
            "#1f5fbf", "#0f8a7e", "#7c3aed"),
        width=960, height=300, margin=12, spacing=8, show_legend=len(readings) > 0, legend_at_bottom=True,
        legend_box_size=10, dots_size=2.6, show_x_guides=False, truncate_label=-1,
        x_value_formatter=lambda d: d.strftime("%b %-d"), value_formatter=lambda v: f"{v:g}",
        x_labels=[datetime.combine(start + timedelta(days=n), datetime.min.time())
                  for n in range(0, (end - start).days + 1, 5)],
        xrange=(_ts(datetime.combine(start, datetime.min.time())),
                _ts(datetime.combine(end + timedelta(days=1), datetime.min.time()))),
        y_title=unit, no_data_text="No readings in this period", disable_xml_declaration=True)
    values: list[float] = []
    if len(readings) > DENSE_READINGS:
        days: dict[date, list[float]] = {}
        for r in readings:
            days.setdefault(r["measured_local"].date(), []).append(r["value"])
        noon = [(datetime.combine(d, datetime.min.time()) + timedelta(hours=12), v) for d, v in sorted(days.items())]
        chart.add("Daily highest", [(t, max(v)) for t, v in noon])
        chart.add("Daily mean", [(t, round(sum(v) / len(v), 1)) for t, v in noon])
        chart.add("Daily lowest", [(t, min(v)) for t, v in noon])
        values = [x for _, v in noon for x in (min(v), max(v))]
    elif metric == "blood_pressure":
        chart.add("Systolic", [(r["measured_local"], r["value"]) for r in readings])
        chart.add("Diastolic", [(r["measured_local"], r["diastolic"]) for r in readings
                                if r["diastolic"] is not None])
        values = [r["value"] for r in readings] + [r["diastolic"] for r in readings if r["diastolic"] is not None]
    else:
        chart.add(LABELS.get(metric, metric), [(r["measured_local"], r["value"]) for r in readings])
        values = [r["value"] for r in readings]
    # one legend row (pygal reserves room for too few rows when a row has more columns than series)
    chart.config.legend_at_bottom_columns = max(len(chart.raw_series), 1)
    if values:
        chart.config.range = _range(metric, values, bands, lines)
    else:
        bands, lines = [], []
    name = f"{LABELS.get(metric, metric)}, {start:%b %-d} to {end:%b %-d}"
    return _render(chart, name, bands, lines)


# The consensus colours of the time-in-ranges bar, from very low to very high.
TIR_COLOURS = ("#a3141c", "#e0402f", "#2e9e5b", "#f2b632", "#e5771e")


def glucose_profile_chart(profile: dict, thresholds: dict[str, float]) -> Chart:
    """The ambulatory glucose profile: the median of each hour of the day with the 25-75 % (dark) and
    5-95 % (light) ranges, over the consensus target range.

    The ranges are pygal's stacked areas (the 5th percentile, then each range's height on top, the first
    area left transparent); the median is a secondary series on the same scale, drawn over them."""
    hours = profile["hours"]
    p = [h["percentiles"] for h in hours]
    # a whole number of 20 mg/dL steps, so pygal keeps the range as given and both scales are one
    top = 20 * math.ceil(max([q[4] + 10 for q in p] + [VERY_HIGH_MG_DL + 20]) / 20)
    chart = pygal.StackedLine(
        js=[], css=["file://style.css", "file://graph.css", "inline:" + _CSS + """
.series .line{stroke-width:0}
.series.serie-5 .line{stroke:#0b3d91;stroke-width:2.6}
.axis.y2 text{display:none}
"""], style=_style("transparent", "#b6d0ee", "#5b8fcf", "#5b8fcf", "#b6d0ee", "#0b3d91"),
        fill=True, show_dots=False, width=960, height=340, margin=12, spacing=8, show_legend=False,
        x_labels=[f"{h['hour']:02d}:00" for h in hours], x_labels_major_every=3, show_minor_x_labels=False,
        truncate_label=-1, y_title="mg/dL", value_formatter=lambda v: f"{v:.0f}", range=(0, top),
        secondary_range=(0, top), no_data_text="No CGM data in this period", disable_xml_declaration=True)
    chart.add("5th percentile", [q[0] for q in p])
    chart.add("5th-25th", [q[1] - q[0] for q in p])
    chart.add("25th-median", [q[2] - q[1] for q in p])
    chart.add("Median-75th", [q[3] - q[2] for q in p])
    chart.add("75th-95th", [q[4] - q[3] for q in p])
    chart.add("Median", [q[2] for q in p], secondary=True, fill=False, show_dots=True, dots_size=2.6)
    bands, _ = thresholds_of("blood_glucose", thresholds)
    return _render(chart, f"Glucose profile by hour of day, last {profile['days']} days", bands if p else [])


def time_in_ranges_chart(summary: dict) -> Chart:
    """The consensus time-in-ranges bar: very low, low, in range, high, very high (% of readings)."""
    tbr54, tbr70 = summary.get("tbr_below_54") or 0.0, summary.get("tbr_below_70") or 0.0
    tar250, tar180 = summary.get("tar_above_250") or 0.0, summary.get("tar_above_180") or 0.0
    parts = [("Very low < 54", tbr54), ("Low 54\u201369", max(tbr70 - tbr54, 0.0)),
             ("In range 70\u2013180", summary.get("tir_70_180") or 0.0),
             ("High 181\u2013250", max(tar180 - tar250, 0.0)), ("Very high > 250", tar250)]
    chart = pygal.StackedBar(
        js=[], css=["file://style.css", "file://graph.css", "inline:" + _CSS],
        style=_style(*TIR_COLOURS, legend_font_size=14, value_font_size=14),
        width=340, height=340, margin=10, spacing=8, show_y_labels=False, show_x_labels=False,
        show_y_guides=False, legend_at_bottom=False, legend_box_size=12, truncate_legend=-1,
        print_values=True, range=(0, 100), value_formatter=lambda v: f"{v:.0f} %" if v >= 4 else "",
        disable_xml_declaration=True, rounded_bars=0)
    for label, value in parts:
        chart.add(f"{label}: {value:.0f} %", [value])
    return _render(chart, "Time in ranges: " + ", ".join(f"{label} {value:.1f} %" for label, value in parts))
