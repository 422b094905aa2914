"""Loss curves as a PNG, drawn with PIL and numpy (matplotlib is not a dependency)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (90, 90, 200)]


def read_log(path: str | Path) -> dict[str, np.ndarray]:
    """Columns of a CSV log as float arrays (empty cells -> NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    out = {}
    for k in rows[0]:
        vals = []
        for r in rows:
            try:
                vals.append(float(r[k]))
            except (TypeError, ValueError):
                vals.append(np.nan)
        out[k] = np.asarray(vals)
    return out


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Moving average over ``window`` points (NaN-aware), same length."""
    if window <= 1 or len(y) < 2:
        return y
    window = min(window, len(y))  # np.convolve 'same' returns max(len(y), window) points
    ok = np.isfinite(y)
    k = np.ones(window)
    num = np.convolve(np.where(ok, y, 0.0), k, mode="same")
    den = np.convolve(ok.astype(float), k, mode="same")
    return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def plot_losses(log: dict[str, np.ndarray], keys: list[str], path: str | Path, title: str = "training losses",
                size: tuple[int, int] = (1100, 650), log_y: bool = True, smooth_window: int = 9) -> None:
    """Draw ``keys`` of ``log`` against its ``step`` column (log y axis by default) into a PNG."""
    from PIL import Image, ImageDraw

    W, H = size
    left, right, top, bottom = 80, 190, 40, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    x = log.get("step", np.arange(len(next(iter(log.values())))))
    series = []
    for k in keys:
        if k not in log:
            continue
        y = smooth(log[k], smooth_window)
        ok = np.isfinite(y) & ((y > 0) if log_y else True)
        if ok.sum() >= 2:
            series.append((k, x[ok], np.log10(y[ok]) if log_y else y[ok]))
    d.text((left, 12), title, fill="black")
    if not series:
        d.text((left, H // 2), "no data", fill="black")
        img.save(path)
        return
    x0, x1 = float(np.min(x)), float(max(np.max(x), np.min(x) + 1))
    y0 = min(float(s[2].min()) for s in series)
    y1 = max(float(s[2].max()) for s in series)
    if y1 - y0 < 1e-6:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pw, ph = W - left - right, H - top - bottom

    def px(xv, yv):
        return left + (np.asarray(xv) - x0) / (x1 - x0) * pw, top + (1 - (np.asarray(yv) - y0) / (y1 - y0)) * ph

    d.rectangle([left, top, left + pw, top + ph], outline="black")
    for t in np.linspace(y0, y1, 6):  # y ticks
        _, yy = px(x0, t)
        d.line([left - 4, float(yy), left, float(yy)], fill="black")
        d.line([left, float(yy), left + pw, float(yy)], fill=(230, 230, 230))
        d.text((5, float(yy) - 6), f"{10 ** t:.3g}" if log_y else f"{t:.3g}", fill="black")
    for t in np.linspace(x0, x1, 6):  # x ticks
        xx, _ = px(t, y0)
        d.line([float(xx), top + ph, float(xx), top + ph + 4], fill="black")
        d.text((float(xx) - 12, top + ph + 8), f"{int(round(t))}", fill="black")
    d.text((left + pw // 2 - 10, H - 20), "step", fill="black")
    for i, (k, xs, ys) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        xx, yy = px(xs, ys)
        d.line(list(zip(xx.tolist(), yy.tolist())), fill=color, width=2)
        ly = top + 8 + 18 * i
        d.line([left + pw + 12, ly + 6, left + pw + 36, ly + 6], fill=color, width=3)
        d.text((left + pw + 42, ly), k, fill="black")
    img.save(path)
