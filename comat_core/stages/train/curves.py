"""The training curves as one PNG (``curves.png`` beside ``metrics.parquet``), drawn with Pillow.

Four panels over the steps: the total loss and each loss term, the gradient norms (generator and
discriminator), the discriminator's mean logits on real and generated latents, and the seconds per
step. Each series is scaled to its own panel's range (printed on the axis); a panel with no data
says so. Pillow only, so the stage needs no plotting library.
"""

from __future__ import annotations

import math
from typing import Iterable

PANELS = (
    ("losses", lambda k: k == "loss" or (k.endswith("_loss") and k != "d_loss")),
    ("grad norms", lambda k: k.startswith("grad_norm")),
    ("discriminator", lambda k: k in ("d_loss", "d_real_logit", "d_fake_logit")),
    ("seconds per step", lambda k: k == "step_seconds"),
)
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127)]
W, H, PAD = 420, 230, 36


def _series(rows: list[dict], select) -> dict[str, list[tuple[float, float]]]:
    keys = sorted({k for r in rows for k in r if select(k)}, key=lambda k: (k != "loss", k))
    out = {}
    for k in keys:
        pts = [(float(r.get("step", i + 1)), float(r[k])) for i, r in enumerate(rows)
               if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
        if pts:
            out[k] = pts
    return out


def _panel(title: str, series: dict[str, list[tuple[float, float]]]):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((PAD, 6), title, fill="black")
    x0, y0, x1, y1 = PAD, 22, W - 10, H - 48
    d.rectangle((x0, y0, x1, y1), outline=(180, 180, 180))
    points = [p for pts in series.values() for p in pts]
    if not points:
        d.text((x0 + 10, (y0 + y1) // 2), "no data", fill=(120, 120, 120))
        return img
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xmin, xmax, ymin, ymax = min(xs), max(xs), min(ys), max(ys)
    xspan, yspan = (xmax - xmin) or 1.0, (ymax - ymin) or (abs(ymax) or 1.0)
    d.text((2, y0), f"{ymax:.3g}", fill="black")
    d.text((2, y1 - 10), f"{ymin:.3g}", fill="black")
    d.text((x0, y1 + 3), f"step {xmin:g}", fill="black")
    d.text((x1 - 70, y1 + 3), f"step {xmax:g}", fill="black")
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        xy = [(x0 + (x - xmin) / xspan * (x1 - x0), y1 - (y - ymin) / yspan * (y1 - y0)) for x, y in pts]
        if len(xy) > 1:
            d.line(xy, fill=color, width=2)
        for x, y in xy[-1:] if len(xy) > 1 else xy:
            d.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
        lx, ly = x0 + (i % 3) * 125, y1 + 16 + (i // 3) * 12
        d.rectangle((lx, ly + 3, lx + 8, ly + 9), fill=color)
        d.text((lx + 11, ly), name[:18], fill="black")
    return img


def curves_image(rows: Iterable[dict]):
    """A 2 x 2 grid of panels (see the module docstring) from the metrics rows, one per step."""
    from PIL import Image

    rows = list(rows)
    grid = Image.new("RGB", (2 * W, 2 * H), "white")
    for i, (title, select) in enumerate(PANELS):
        grid.paste(_panel(title, _series(rows, select)), ((i % 2) * W, (i // 2) * H))
    return grid
