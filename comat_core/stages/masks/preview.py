"""``overlay.png``: a few ground-truth images with their entity masks overlaid and labelled.

The first ``PREVIEW_IMAGES`` images (a prompt and a sample) of the first shard that have a detected
entity (else the first images), side by side; each detected entity's mask is tinted in its own colour and labelled with
its noun at the mask's top-left corner; undetected nouns are listed under the image. Images smaller
than ``MIN_SIDE`` pixels (the tiny preset) are enlarged so the labels stay readable.
"""

from __future__ import annotations

import io

import numpy as np

from comat_core.stages.masks.encoding import decode_mask

PREVIEW_IMAGES = 4
MIN_SIDE = 192
COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
OVERLAY = "overlay.png"


def _image(row: dict) -> tuple[str, int]:
    return row["prompt_id"], int(row.get("sample") or 0)


def pick_images(rows: list[dict], count: int = PREVIEW_IMAGES) -> list[tuple[str, int]]:
    """(prompt id, sample) in shard order, those with a detected entity first, at most ``count``."""
    order = list(dict.fromkeys(_image(r) for r in rows))
    detected = {_image(r) for r in rows if r["detected"]}
    return ([i for i in order if i in detected] + [i for i in order if i not in detected])[:count]


def overlay(image: np.ndarray, rows: list[dict]):
    """``image`` ``[H, W, 3]`` uint8 with each row's mask tinted and labelled (a PIL image)."""
    from PIL import Image, ImageDraw

    h, w = image.shape[:2]
    scale = max(1, -(-MIN_SIDE // max(h, w)))
    out = Image.fromarray(image).resize((w * scale, h * scale), Image.NEAREST)
    canvas = np.asarray(out).astype(np.float32)
    labels, missing = [], []
    for i, r in enumerate(rows):
        if not r["detected"] or r["mask"] is None:
            missing.append(r["noun"])
            continue
        res = int(r["mask_resolution"])
        mask = decode_mask(r["mask"], (res, res), r["encoding"])
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(out.size, Image.NEAREST)) > 127
        color = np.array(COLORS[i % len(COLORS)], dtype=np.float32)
        canvas[mask] = 0.55 * canvas[mask] + 0.45 * color
        ys, xs = np.nonzero(mask)
        if len(xs):
            labels.append((int(xs.min()), int(ys.min()), r["noun"], COLORS[i % len(COLORS)]))
    img = Image.new("RGB", (out.width, out.height + 14), "white")
    img.paste(Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(img)
    for x, y, noun, color in labels:
        draw.rectangle((x, y, x + 6 * len(noun) + 4, y + 11), fill=color)
        draw.text((x + 2, y), noun, fill="white")
    draw.text((2, out.height + 1), ("not found: " + ", ".join(missing)) if missing else "all nouns found", fill="black")
    return img


def write_overlay(ctx, gt, decode_images, first_shard: str) -> str | None:
    """Write ``overlay.png`` from the committed ``first_shard`` masks file; returns its name (None if empty).

    ``decode_images([(prompt_id, sample), ...]) -> [B, 3, H, W]`` in [0, 1] gives the ground-truth images."""
    import pyarrow.parquet as pq
    from PIL import Image

    rows = pq.read_table(io.BytesIO(ctx.store.read_bytes(ctx.writer.path(first_shard)))).to_pylist()
    chosen = pick_images(rows)
    if not chosen:
        return None
    images = (decode_images(chosen).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    tiles = [overlay(img, [r for r in rows if _image(r) == which]) for which, img in zip(chosen, images)]
    sheet = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), max(t.height for t in tiles)), "white")
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, 0))
        x += tile.width + 4
    ctx.writer.put_image(OVERLAY, sheet)
    return OVERLAY
