"""Risk timelines as PNGs (Pillow, as the customer-service timeline; matplotlib is not a dependency),
and the reads of ``iiot_risk_scores``, alerts and maintenance records they draw.

- :func:`render_asset_timeline`: an asset's P(failure within the horizon) over time (top panel,
  0–1, one series per scoring tier) and its remaining useful life (bottom panel, hours); each
  alert a shaded span (red while open, amber once acknowledged, ending when resolved) and each
  maintenance record a vertical line with its kind's initial (F failure, R repair, P preventive,
  I inspection).
- :func:`render_line_timeline`: the fog view. The line risk (thick black; see
  :mod:`services.iiot.fog`) over its assets' risks (thin, one colour each), and under it a strip
  coloured by the asset driving the line risk at each time, with a legend of who drove it and
  for how long.
- :func:`render_message`: a frame saying why there is nothing to draw (no scores yet).

Time runs left to right over the range asked; tick labels are in the plant's time zone, named
on the axis.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt
import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from services.iiot.db import RESOLVED, Alert, Asset, Line, MaintenanceRecord, Plant, RiskScore
from services.iiot.fog import AssetScore, LineTimeline
from shared.errors import NotFound

WIDTH = 1000
LEFT, RIGHT, TOP = 64, 24, 30
BACKGROUND, AXIS, GRID, TEXT, MUTED = (255, 255, 255), (60, 60, 60), (228, 228, 228), (30, 30, 30), (140, 140, 140)
TIER_COLOURS = {"cloud": (40, 90, 200), "edge": (20, 150, 150), "fog": (120, 60, 170)}
RUL_COLOUR = (60, 140, 60)
OTHER_ASSETS = (200, 200, 200)
RISK_TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)
LINE_RISK = (0, 0, 0)
ALERT_OPEN, ALERT_ACKNOWLEDGED = (255, 218, 218), (255, 236, 200)
ALERT_EDGE, ALERT_RESOLVED = (210, 40, 40), (40, 150, 60)
MAINTENANCE_COLOURS = {"failure": (170, 0, 0), "repair": (130, 60, 170), "preventive": (30, 130, 60),
                       "inspection": (110, 110, 110)}
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (188, 189, 34), (23, 190, 207), (127, 127, 127))
MAX_COLOURED_ASSETS = len(PALETTE)
"""A line with more assets draws its riskiest ones in colour, the others grey."""
STRIP_TOP = 334
"""Where the fog view's driver strip starts (12 px high), under the risk panel's time axis."""
TICK_STEPS = tuple(timedelta(hours=h) for h in (1, 2, 3, 6, 12, 24, 48, 96, 168, 336, 720))


# --- what is drawn ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AlertSpan:
    """An alert's life on the plot: opened, maybe acknowledged, maybe resolved."""

    opened_at: datetime
    acknowledged_at: datetime | None
    resolved_at: datetime | None
    severity: str = "warning"


@dataclass(frozen=True, slots=True)
class MaintenanceMark:
    """A maintenance record on the plot."""

    occurred_at: datetime
    kind: str


@dataclass
class AssetHistory:
    """An asset's scores, alerts and maintenance in a time range."""

    asset_id: str
    line_id: str
    timezone: str
    scores: pd.DataFrame
    """``window_end`` (UTC), ``p_failure``, ``rul_hours``, ``tier``; by time."""
    alerts: list[AlertSpan] = field(default_factory=list)
    maintenance: list[MaintenanceMark] = field(default_factory=list)


@dataclass
class LineScores:
    """A line's assets and their scores in a time range (and just before it, to carry into it)."""

    line_id: str
    plant_id: str
    timezone: str
    asset_ids: list[str]
    scores: pd.DataFrame
    """``asset_id``, ``window_end`` (UTC), ``p_failure``, ``rul_hours``, ``tier``; by time."""


# --- reading -----------------------------------------------------------------------------------------

SCORE_COLUMNS = ["window_end", "p_failure", "rul_hours", "tier"]


def asset_history(session: Session, tenant_id: str, asset_id: str, start: datetime, end: datetime) -> AssetHistory:
    """The asset's risk scores with ``start <= window_end <= end``, the alerts alive in the range
    and the maintenance records in it; NotFound for an asset not the tenant's."""
    row = session.execute(select(Asset.id, Line.line_id, Plant.timezone).join(Line, Line.id == Asset.line_pk)
                          .join(Plant, Plant.id == Line.plant_pk)
                          .where(Asset.tenant_id == tenant_id, Asset.asset_id == asset_id)).first()
    if row is None:
        raise NotFound(f"asset '{asset_id}' does not exist for this tenant")
    asset_pk, line_id, timezone = row
    scores = session.execute(select(RiskScore.window_end, RiskScore.p_failure, RiskScore.rul_hours, RiskScore.tier)
                             .where(RiskScore.asset_pk == asset_pk, RiskScore.window_end >= start,
                                    RiskScore.window_end <= end).order_by(RiskScore.window_end, RiskScore.id)).all()
    alerts = session.scalars(select(Alert).where(
        Alert.asset_pk == asset_pk, Alert.opened_at <= end,
        (Alert.resolved_at.is_(None)) | (Alert.resolved_at >= start)).order_by(Alert.opened_at)).all()
    maintenance = session.scalars(select(MaintenanceRecord).where(
        MaintenanceRecord.asset_pk == asset_pk, MaintenanceRecord.occurred_at >= start,
        MaintenanceRecord.occurred_at <= end).order_by(MaintenanceRecord.occurred_at)).all()
    return AssetHistory(
        asset_id, line_id, timezone, _frame(scores, SCORE_COLUMNS),
        [AlertSpan(a.opened_at, a.acknowledged_at, a.resolved_at if a.state == RESOLVED else None, a.severity)
         for a in alerts],
        [MaintenanceMark(m.occurred_at, m.kind) for m in maintenance])


def line_scores(session: Session, tenant_id: str, line_id: str, start: datetime, end: datetime) -> LineScores:
    """The line's assets and their risk scores with ``start <= window_end <= end`` (pass a start
    early enough to carry scores into the range); NotFound for a line not the tenant's."""
    row = session.execute(select(Line.id, Plant.plant_id, Plant.timezone).join(Plant, Plant.id == Line.plant_pk)
                          .where(Line.tenant_id == tenant_id, Line.line_id == line_id)).first()
    if row is None:
        raise NotFound(f"line '{line_id}' does not exist for this tenant")
    line_pk, plant_id, timezone = row
    assets = session.execute(select(Asset.id, Asset.asset_id).where(Asset.line_pk == line_pk)
                             .order_by(Asset.asset_id)).all()
    ids = {pk: asset_id for pk, asset_id in assets}
    scores = session.execute(
        select(RiskScore.asset_pk, RiskScore.window_end, RiskScore.p_failure, RiskScore.rul_hours, RiskScore.tier)
        .join(Asset, Asset.id == RiskScore.asset_pk)
        .where(Asset.line_pk == line_pk, RiskScore.window_end >= start, RiskScore.window_end <= end)
        .order_by(RiskScore.window_end, RiskScore.id)).all()
    frame = _frame([(ids[pk], *rest) for pk, *rest in scores], ["asset_id", *SCORE_COLUMNS])
    return LineScores(line_id, plant_id, timezone, list(ids.values()), frame)


def latest_line_scores(session: Session, tenant_id: str, line_id: str) -> tuple[str, list[str], list[AssetScore]]:
    """The line's plant, its asset ids, and each scored asset's latest score (one index seek per
    asset); NotFound for a line not the tenant's."""
    row = session.execute(select(Line.id, Plant.plant_id).join(Plant, Plant.id == Line.plant_pk)
                          .where(Line.tenant_id == tenant_id, Line.line_id == line_id)).first()
    if row is None:
        raise NotFound(f"line '{line_id}' does not exist for this tenant")
    line_pk, plant_id = row
    own = aliased(RiskScore)
    newest = (select(own.id).where(own.asset_pk == Asset.id).order_by(own.window_end.desc(), own.id.desc())
              .limit(1).correlate(Asset).scalar_subquery())
    scores = session.execute(
        select(Asset.asset_id, RiskScore.p_failure, RiskScore.rul_hours, RiskScore.window_end, RiskScore.tier)
        .select_from(Asset).outerjoin(RiskScore, RiskScore.id == newest)
        .where(Asset.line_pk == line_pk).order_by(Asset.asset_id)).all()
    return plant_id, [s.asset_id for s in scores], [
        AssetScore(s.asset_id, s.p_failure, s.rul_hours, s.window_end, s.tier)
        for s in scores if s.p_failure is not None]


def _frame(rows: Sequence[Any], columns: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame([tuple(row) for row in rows], columns=columns)
    frame["window_end"] = pd.to_datetime(frame["window_end"], utc=True)
    frame["p_failure"] = frame["p_failure"].astype(np.float64)
    frame["rul_hours"] = pd.to_numeric(frame["rul_hours"], errors="coerce").astype(np.float64)
    return frame


# --- drawing -----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Frame:
    """Maps times to x and values to y within one panel."""

    start_ns: int
    end_ns: int
    top: int
    bottom: int
    y_max: float

    def x(self, ns: int | float) -> float:
        span = max(self.end_ns - self.start_ns, 1)
        return LEFT + (WIDTH - LEFT - RIGHT) * min(max((ns - self.start_ns) / span, 0.0), 1.0)

    def y(self, value: float) -> float:
        return self.bottom - (self.bottom - self.top) * min(max(value / self.y_max, 0.0), 1.0)


def _font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _ns(moment: datetime | pd.Timestamp) -> int:
    return int(pd.Timestamp(moment).as_unit("ns").value)


def _canvas(height: int, title: str) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (WIDTH, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((LEFT, 8), title[:140], fill=TEXT, font=_font(13))
    return image, draw


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _panel(draw: ImageDraw.ImageDraw, frame: _Frame, ticks: Sequence[float], fmt: str) -> None:
    """Grid lines at ``ticks`` with their labels, and the axes."""
    for value in ticks:
        y = frame.y(value)
        draw.line([(LEFT, y), (WIDTH - RIGHT, y)], fill=GRID)
        draw.text((6, y - 7), fmt.format(value), fill=TEXT, font=_font())
    draw.line([(LEFT, frame.top), (LEFT, frame.bottom)], fill=AXIS)
    draw.line([(LEFT, frame.bottom), (WIDTH - RIGHT, frame.bottom)], fill=AXIS)


def _label(draw: ImageDraw.ImageDraw, frame: _Frame, label: str) -> None:
    """The panel's name in its top left corner, over what was drawn there."""
    font = _font()
    box = draw.textbbox((LEFT + 6, frame.top + 2), label, font=font)
    draw.rectangle([box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1], fill=BACKGROUND)
    draw.text((LEFT + 6, frame.top + 2), label, fill=MUTED, font=font)


def _time_axis(draw: ImageDraw.ImageDraw, frame: _Frame, zone: str) -> None:
    """Ticks under ``frame`` at a round step in ``zone`` (at most about eight)."""
    span = timedelta(microseconds=(frame.end_ns - frame.start_ns) / 1000)
    step = next((s for s in TICK_STEPS if span / s <= 8), TICK_STEPS[-1])
    tz = ZoneInfo(zone)
    start = pd.Timestamp(frame.start_ns, tz="UTC").tz_convert(tz)
    unit = "D" if step >= timedelta(days=1) else f"{int(step.total_seconds() // 3600)}h"
    # a wall-clock hour that happens twice (DST ends) or never (DST starts) floors to its first instant
    first = start.floor(unit, ambiguous=True, nonexistent="shift_forward")
    fmt = "%m-%d" if step >= timedelta(days=1) else "%m-%d %H:%M"
    tick = first
    while _ns(tick) <= frame.end_ns:
        if _ns(tick) >= frame.start_ns:
            x = frame.x(_ns(tick))
            draw.line([(x, frame.bottom), (x, frame.bottom + 4)], fill=AXIS)
            draw.text((x - 18, frame.bottom + 6), tick.strftime(fmt), fill=TEXT, font=_font(11))
        tick = (tick + step).tz_convert(tz)  # wall-clock labels stay round across DST changes only roughly
    draw.text((WIDTH - RIGHT - 120, frame.bottom + 20), f"time ({zone})", fill=MUTED, font=_font(11))


def _series(draw: ImageDraw.ImageDraw, frame: _Frame, times_ns: npt.NDArray[np.int64],
            values: npt.NDArray[np.float64], colour: tuple[int, int, int], width: int = 2) -> None:
    """A polyline through the finite points; NaN breaks it; a lone point is a dot."""
    finite = np.isfinite(values)
    breaks = np.flatnonzero(np.diff(finite.astype(np.int8)) != 0) + 1
    for run in np.split(np.arange(len(values)), breaks):
        if len(run) == 0 or not finite[run[0]]:
            continue
        points = [(frame.x(float(times_ns[i])), frame.y(float(values[i]))) for i in run]
        if len(points) == 1:
            x, y = points[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        else:
            draw.line(points, fill=colour, width=width)


def render_message(title: str, message: str, height: int = 200) -> bytes:
    """A frame with a title and a message in its middle (e.g. no scores yet)."""
    image, draw = _canvas(height, title)
    draw.rectangle([LEFT, TOP + 6, WIDTH - RIGHT, height - 20], outline=GRID)
    draw.text((LEFT + 24, height // 2 - 8), message, fill=TEXT, font=_font(15))
    return _png(image)


def render_asset_timeline(history: AssetHistory, start: datetime, end: datetime, *, title: str) -> bytes:
    """The asset's risk and RUL over ``[start, end]`` with alerts and maintenance marked (see the module doc)."""
    height = 460
    image, draw = _canvas(height, title)
    start_ns, end_ns = _ns(start), _ns(end)
    risk = _Frame(start_ns, end_ns, TOP + 10, 250, 1.0)
    rul_max = _rul_scale(history.scores["rul_hours"].to_numpy())
    rul = _Frame(start_ns, end_ns, 275, height - 75, rul_max)
    _alert_spans(draw, risk, history.alerts)
    _panel(draw, risk, RISK_TICKS, "{:.2f}")
    _panel(draw, rul, np.linspace(0.0, rul_max, 5).tolist(), "{:.0f}")
    times = history.scores["window_end"].to_numpy(dtype="datetime64[ns]").astype(np.int64)
    for tier, colour in TIER_COLOURS.items():
        own = (history.scores["tier"] == tier).to_numpy()
        if own.any():
            _series(draw, risk, times[own], history.scores["p_failure"].to_numpy()[own], colour)
            _series(draw, rul, times[own], history.scores["rul_hours"].to_numpy()[own], RUL_COLOUR)
    _label(draw, risk, "P(failure within the horizon)")
    _label(draw, rul, "remaining useful life (hours)")
    _maintenance_marks(draw, risk.top, rul.bottom, risk, history.maintenance)
    _time_axis(draw, rul, history.timezone)
    tiers = ", ".join(f"{tier}" for tier in TIER_COLOURS if (history.scores["tier"] == tier).any()) or "none"
    draw.text((LEFT, height - 28), f"risk by tier ({tiers}); alerts: red open, amber acknowledged; maintenance: "
              "F failure, R repair, P preventive, I inspection", fill=TEXT, font=_font(11))
    return _png(image)


def _rul_scale(values: npt.NDArray[np.float64]) -> float:
    """A round top for the RUL panel: the largest RUL shown, at least 24 h."""
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if len(finite) else 24.0
    for step in (24, 48, 72, 168, 336, 720, 1440, 2880, 8760):
        if top <= step:
            return float(step)
    return float(np.ceil(top / 8760) * 8760)


def _alert_spans(draw: ImageDraw.ImageDraw, frame: _Frame, alerts: Sequence[AlertSpan]) -> None:
    for alert in alerts:
        opened = frame.x(_ns(alert.opened_at))
        closed = frame.x(_ns(alert.resolved_at)) if alert.resolved_at else frame.x(frame.end_ns)
        acknowledged = frame.x(_ns(alert.acknowledged_at)) if alert.acknowledged_at else closed
        draw.rectangle([opened, frame.top, max(acknowledged, opened + 1), frame.bottom], fill=ALERT_OPEN)
        if acknowledged < closed:
            draw.rectangle([acknowledged, frame.top, closed, frame.bottom], fill=ALERT_ACKNOWLEDGED)
        draw.line([(opened, frame.top), (opened, frame.bottom)], fill=ALERT_EDGE, width=2)
        if alert.resolved_at:
            draw.line([(closed, frame.top), (closed, frame.bottom)], fill=ALERT_RESOLVED, width=2)


def _maintenance_marks(draw: ImageDraw.ImageDraw, top: int, bottom: int, frame: _Frame,
                       marks: Sequence[MaintenanceMark]) -> None:
    for mark in marks:
        x = frame.x(_ns(mark.occurred_at))
        colour = MAINTENANCE_COLOURS.get(mark.kind, MUTED)
        for y in range(top, bottom, 8):  # dashed: it crosses both panels
            draw.line([(x, y), (x, min(y + 4, bottom))], fill=colour, width=2)
        draw.text((x + 3, top - 14), mark.kind[:1].upper(), fill=colour, font=_font(12))


def render_line_timeline(timeline: LineTimeline, start: datetime, end: datetime, *, zone: str, title: str) -> bytes:
    """The fog view of a line over ``[start, end]`` (see the module doc)."""
    shown = _coloured_assets(timeline)
    entries = 1 + len(shown) + (len(timeline.asset_ids) > len(shown))  # line risk, assets, "+N more"
    legend_rows = (entries + 2) // 3
    height = STRIP_TOP + 30 + 18 * legend_rows + 10
    image, draw = _canvas(height, title)
    start_ns, end_ns = _ns(start), _ns(end)
    risk = _Frame(start_ns, end_ns, TOP + 10, 290, 1.0)
    _panel(draw, risk, RISK_TICKS, "{:.2f}")
    times = timeline.times.as_unit("ns").asi8
    for column in range(len(timeline.asset_ids)):
        colour = shown.get(column, OTHER_ASSETS)
        _series(draw, risk, times, timeline.asset_p[:, column], colour, width=1)
    _series(draw, risk, times, timeline.line_p, LINE_RISK, width=3)
    _label(draw, risk, "P(any asset on the line fails within the horizon)")
    _driver_strip(draw, risk, STRIP_TOP, times, timeline, shown)
    _time_axis(draw, risk, zone)
    _legend(draw, STRIP_TOP + 30, timeline, shown)
    return _png(image)


def _coloured_assets(timeline: LineTimeline) -> dict[int, tuple[int, int, int]]:
    """Columns drawn in colour: the assets that ever drive, then the riskiest, up to the palette's size."""
    peak = np.nan_to_num(np.nanmax(np.where(np.isnan(timeline.asset_p), -1.0, timeline.asset_p), axis=0)
                         if timeline.asset_p.size else np.zeros(0), nan=-1.0)
    drives = np.bincount(timeline.driver[timeline.driver >= 0], minlength=len(timeline.asset_ids))
    order = sorted(range(len(timeline.asset_ids)), key=lambda c: (-drives[c], -peak[c], timeline.asset_ids[c]))
    return {column: PALETTE[rank] for rank, column in enumerate(order[:MAX_COLOURED_ASSETS])}


def _driver_strip(draw: ImageDraw.ImageDraw, frame: _Frame, top: int, times: npt.NDArray[np.int64],
                  timeline: LineTimeline, shown: dict[int, tuple[int, int, int]]) -> None:
    draw.text((LEFT, top - 14), "asset driving the line risk", fill=MUTED, font=_font(11))
    for i, column in enumerate(timeline.driver):
        if column < 0:
            continue
        right = times[i + 1] if i + 1 < len(times) else frame.end_ns
        draw.rectangle([frame.x(float(times[i])), top, max(frame.x(float(right)), frame.x(float(times[i])) + 1),
                        top + 12], fill=shown.get(int(column), MUTED))


def _legend(draw: ImageDraw.ImageDraw, top: int, timeline: LineTimeline,
            shown: dict[int, tuple[int, int, int]]) -> None:
    scored = max(int((timeline.driver >= 0).sum()), 1)
    drives = np.bincount(timeline.driver[timeline.driver >= 0], minlength=len(timeline.asset_ids))
    draw.line([(LEFT, top + 6), (LEFT + 18, top + 6)], fill=LINE_RISK, width=3)
    draw.text((LEFT + 24, top), "line risk", fill=TEXT, font=_font(11))
    for rank, (column, colour) in enumerate(shown.items()):
        x = LEFT + 300 * ((rank + 1) % 3)
        y = top + 18 * ((rank + 1) // 3)
        draw.rectangle([x, y + 2, x + 18, y + 10], fill=colour)
        share = 100.0 * drives[column] / scored
        draw.text((x + 24, y), f"{timeline.asset_ids[column][:28]} (drives {share:.0f}%)", fill=TEXT, font=_font(11))
    hidden = len(timeline.asset_ids) - len(shown)
    if hidden > 0:
        slot = len(shown) + 1
        draw.text((LEFT + 300 * (slot % 3), top + 18 * (slot // 3)), f"+{hidden} more assets (grey)", fill=MUTED,
                  font=_font(11))
