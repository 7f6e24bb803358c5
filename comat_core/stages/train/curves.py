"""The training curves as one PNG (``curves.png`` beside ``metrics.parquet``), drawn with Pillow.

One panel per loss (the total and each term) on a log scale, so a term of 1e-4 next to one of 10 is
a curve, not a flat line at zero; then the gradient norms (log), the discriminator's loss and mean
logits on real and generated latents (linear: logits change sign) and the seconds per step (linear).
Each panel has its own y axis with tick labels (decades, and 2 and 5 within a short log range) and
step ticks on the x axis; points a log axis cannot show (zero or negative) are left out and the
panel says how many. Pillow only, so the stage needs no plotting library.
"""

from __future__ import annotations

import math
from typing import Iterable

GROUPS = (
    ("grad norms", lambda k: k.startswith("grad_norm"), "log"),
    ("discriminator", lambda k: k in ("d_loss", "d_real_logit", "d_fake_logit"), "linear"),
    ("seconds per step", lambda k: k == "step_seconds", "linear"),
)
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127)]
W, H, LEFT, RIGHT, TOP, BOTTOM = 420, 230, 56, 12, 22, 48


def is_loss(key: str) -> bool:
    return key == "loss" or (key.endswith("_loss") and key != "d_loss")


def _series(rows: list[dict], select) -> dict[str, list[tuple[float, float]]]:
    keys = sorted({k for r in rows for k in r if select(k)}, key=lambda k: (k != "loss", k))
    out = {}
    for k in keys:
        pts = [(float(r.get("step", i + 1)), float(r[k])) for i, r in enumerate(rows)
               if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
        if pts:
            out[k] = pts
    return out


def curve_panels(rows: Iterable[dict]) -> list[tuple[str, dict[str, list[tuple[float, float]]], str]]:
    """``(title, {series: [(step, value)]}, "log" | "linear")`` per panel: one per loss, then the groups."""
    rows = list(rows)
    losses = _series(rows, is_loss)
    panels = [(f"{name} (log scale)", {name: pts}, "log") for name, pts in losses.items()]
    if not panels:
        panels = [("losses (log scale)", {}, "log")]
    return panels + [(title + (" (log scale)" if scale == "log" else ""), _series(rows, select), scale)
                     for title, select, scale in GROUPS]


def _nice_step(span: float) -> float:
    raw = span / 4 or 1.0
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def linear_ticks(lo: float, hi: float) -> list[float]:
    """About five round values covering ``[lo, hi]``."""
    step = _nice_step(hi - lo)
    start = math.floor(lo / step) * step
    return [start + k * step for k in range(int(math.ceil((hi - start) / step - 1e-9)) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Decades covering ``[lo, hi]`` (both > 0); with 2 and 5 between them when the range is short."""
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if last == first:
        last += 1
    mantissas = (1, 2, 5) if last - first <= 2 else (1,)
    return [m * 10.0 ** e for e in range(first, last + 1) for m in mantissas if m * 10.0 ** e <= 10.0 ** last]


def _panel(title: str, series: dict[str, list[tuple[float, float]]], scale: str):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = LEFT, TOP, W - RIGHT, H - BOTTOM
    dropped = 0
    if scale == "log":
        kept = {k: [p for p in pts if p[1] > 0] for k, pts in series.items()}
        dropped = sum(len(pts) - len(kept[k]) for k, pts in series.items())
        series = {k: pts for k, pts in kept.items() if pts}
    d.text((6, 5), title + (f" ({dropped} points <= 0 left out)" if dropped else ""), fill="black")
    d.rectangle((x0, y0, x1, y1), outline=(180, 180, 180))
    points = [p for pts in series.values() for p in pts]
    if not points:
        d.text((x0 + 10, (y0 + y1) // 2), "no data", fill=(120, 120, 120))
        return img
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xmin, xmax = min(xs), max(xs)
    if scale == "log":
        ticks = log_ticks(min(ys), max(ys))
        f = math.log10
    else:
        ticks = linear_ticks(min(ys), max(ys)) if max(ys) > min(ys) else [min(ys) - 1, min(ys), min(ys) + 1]
        f = float
    lo, hi = f(ticks[0]), f(ticks[-1])
    yspan, xspan = (hi - lo) or 1.0, (xmax - xmin) or 1.0

    def to_y(v: float) -> float:
        return y1 - (f(v) - lo) / yspan * (y1 - y0)

    def to_x(v: float) -> float:
        return x0 + (v - xmin) / xspan * (x1 - x0)

    for t in ticks:
        y = to_y(t)
        d.line((x0, y, x1, y), fill=(230, 230, 230))
        d.line((x0 - 4, y, x0, y), fill="black")
        d.text((2, y - 5), f"{t:.3g}", fill="black")
    for t in (linear_ticks(xmin, xmax) if xmax > xmin else [xmin]):
        if xmin <= t <= xmax:
            x = to_x(t)
            d.line((x, y1, x, y1 + 4), fill="black")
            d.text((x - 8, y1 + 5), f"{t:g}", fill="black")
    d.text((x1 - 24, y1 + 5 + 11), "step", fill=(90, 90, 90))
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        xy = [(to_x(x), to_y(y)) for x, y in pts]
        if len(xy) > 1:
            d.line(xy, fill=color, width=2)
        for x, y in xy[-1:] if len(xy) > 1 else xy:
            d.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
        if len(series) > 1:
            lx, ly = x0 + (i % 3) * 110, y1 + 27
            d.rectangle((lx, ly + 3, lx + 8, ly + 9), fill=color)
            d.text((lx + 11, ly), name[:16], fill="black")
    return img


def curves_image(rows: Iterable[dict]):
    """The panels of ``curve_panels`` two per row (see the module docstring), from the metrics rows."""
    from PIL import Image

    panels = curve_panels(rows)
    grid = Image.new("RGB", (2 * W, -(-len(panels) // 2) * H), "white")
    for i, (title, series, scale) in enumerate(panels):
        grid.paste(_panel(title, series, scale), ((i % 2) * W, (i // 2) * H))
    return grid
