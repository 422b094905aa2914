"""Evaluation reports: merge per-video results, tables in the paper's layout (Tables 1-2), CSV / JSON, pictures.

``merge(out, protocol)`` reads every ``<out>/<id>/eval/<protocol>.json`` (written by ``protocol.evaluate``, one per
video, possibly by different shards) and aggregates them: each metric's overall value is the mean over all scored
frames of all videos (frame-weighted, as evaluation scripts that score every generated frame do); the mean of the
per-video means is kept in the JSON too. A metric that has no number for any video is reported as
"n/a (reason)", never as a number.

Pictures are drawn with Pillow only (no matplotlib): a side-by-side strip per video (source | driving | ours for a
few frames) and a per-frame line plot (PSNR for self-reenactment, CSIM for cross-identity).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..store import atomic_path, read_json, write_json

LABELS = {"psnr": "PSNR", "ssim": "SSIM", "lpips": "LPIPS", "csim": "CSIM", "akd": "AKD", "aed": "AED", "apd": "APD"}
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "csim": True, "akd": False, "aed": False,
                    "apd": False}
# Digits as printed in the paper's tables (PSNR 23.24, SSIM 0.7995, AKD 2.798 / 20.78, APD 0.8660).
FORMATS = {"psnr": ".2f", "ssim": ".4f", "lpips": ".4f", "csim": ".4f", "akd": ".4g", "aed": ".4f", "apd": ".4f"}
COLUMNS = {"self": ("psnr", "ssim", "lpips", "csim", "akd", "aed", "apd"), "cross": ("csim", "aed", "apd")}
TITLES = {"self": "Self-reenactment", "cross": "Cross-identity reenactment"}
METHOD_LABELS = {"network": "Ours (FHAvatar network)", "unproject": "Ours (unproject baseline, no network)",
                 "template": "Template avatar (no image)"}
SUBSTITUTES = {"csim": "CSIM (dlib instead of ArcFace)", "aed": "AED (MediaPipe mesh instead of SMIRK)",
               "akd": "AKD (when FAN weights are not cached: MediaPipe mesh points instead of FAN)"}


def substitute_note(columns: tuple[str, ...]) -> str:
    names = [SUBSTITUTES[m] for m in columns if m in SUBSTITUTES]
    return (", ".join(names) + " use substitute models: compare these numbers between runs of this tool, not with "
            "the paper's tables.")


def header(metric: str) -> str:
    return f"{LABELS[metric]}{'↑' if HIGHER_IS_BETTER[metric] else '↓'}"


def format_value(metric: str, value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(value, FORMATS[metric])


# ---------------------------------------------------------------------------------------------------- aggregation
@dataclass
class Report:
    """The overall evaluation of one protocol.

    videos: per-video records as written by the evaluation (``per_frame`` included), sorted by item id.
    overall: metric -> {mean (frame-weighted), mean_over_videos, n_frames (scored), n_videos (with a number)}.
    unavailable: metric -> reason, for the protocol's metrics with no number at all.
    models: metric -> the distinct model descriptions behind the numbers.
    missing: item id -> why it has no (usable) result.
    """

    protocol: str
    settings: dict
    settings_hash: str
    videos: list[dict]
    overall: dict[str, dict] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    models: dict[str, list[str]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)

    @property
    def columns(self) -> tuple[str, ...]:
        return COLUMNS[self.protocol]

    @property
    def method(self) -> str:
        return (self.settings.get("reconstruct") or {}).get("method", "?")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["columns"] = list(self.columns)
        d["n_videos"] = len(self.videos)
        d["n_frames"] = sum(int(v["n_frames"]) for v in self.videos)
        return d


def load_results(out: Path, protocol: str) -> list[dict]:
    """Every per-video result ``<out>/*/eval/<protocol>.json``, sorted by item id."""
    records = []
    for p in sorted(Path(out).glob(f"*/eval/{protocol}.json")):
        try:
            rec = read_json(p)
        except (OSError, json.JSONDecodeError):
            continue  # a half-copied file: reported as missing below when expected
        if rec.get("protocol") == protocol:
            records.append(rec)
    return sorted(records, key=lambda r: r["item_id"])


def merge(out: Path, protocol: str, items: list[str] | None = None, settings_hash: str | None = None) -> Report:
    """Combine the per-video results under ``out`` into the overall report.

    Args:
        items: the item ids expected (None: every result found); those without a result are listed in ``missing``.
        settings_hash: keep only results made with these settings (``protocol.settings_key``); others count as
            missing. Without it, results made with different settings are an error (their numbers do not mix).
    """
    if protocol not in COLUMNS:
        raise ConfigError(f"protocol '{protocol}' is unknown", "use self or cross")
    records = load_results(out, protocol)
    missing: dict[str, str] = {}
    if settings_hash is not None:
        stale = {r["item_id"] for r in records if r.get("settings_hash") != settings_hash}
        missing.update({i: "result made with other settings" for i in stale})
        records = [r for r in records if r.get("settings_hash") == settings_hash]
    else:
        hashes = sorted({r.get("settings_hash") for r in records})
        if len(hashes) > 1:
            raise ConfigError(f"results under '{out}' were made with {len(hashes)} different settings ({protocol})",
                              "merge with the same settings as the evaluation (or evaluate into a fresh --out)")
    if items is not None:
        wanted = set(items)
        found = {r["item_id"] for r in records}
        missing = {i: missing.get(i, "no result yet") for i in sorted(wanted - found)}
        records = [r for r in records if r["item_id"] in wanted]
    settings = records[0]["settings"] if records else {}
    key = records[0]["settings_hash"] if records else (settings_hash or "")
    return aggregate(records, protocol, settings, key, missing)


def aggregate(records: list[dict], protocol: str, settings: dict, settings_hash: str,
              missing: dict[str, str] | None = None) -> Report:
    """The overall values of ``records`` (sorted by item id so that the sums, and their rounding, never depend on
    which shard wrote what)."""
    records = sorted(records, key=lambda r: r["item_id"])
    rep = Report(protocol, settings, settings_hash, records, missing=dict(missing or {}))
    for m in COLUMNS[protocol]:
        scored = [r for r in records if r["mean"].get(m) is not None]
        if not scored:
            if records and all(m in r.get("not_requested", []) for r in records):
                rep.unavailable[m] = "not requested"
            else:
                reasons = sorted({r["unavailable"][m] for r in records if m in r.get("unavailable", {})})
                rep.unavailable[m] = "; ".join(reasons) if reasons else "no result"
            continue
        n = np.array([r["n_valid"][m] for r in scored], dtype=np.float64)
        means = np.array([r["mean"][m] for r in scored], dtype=np.float64)
        rep.overall[m] = {
            "mean": float((means * n).sum() / n.sum()),
            "mean_over_videos": float(means.mean()),
            "n_frames": int(n.sum()),
            "n_videos": len(scored),
        }
        rep.models[m] = sorted({r["models"][m] for r in scored})
    return rep


# --------------------------------------------------------------------------------------------------------- tables
def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def markdown_report(rep: Report, title_suffix: str = "") -> str:
    """The overall table in the paper's layout, the per-video table, the models behind each metric and notes."""
    cols = rep.columns
    lines = [f"### {TITLES[rep.protocol]}{title_suffix}", ""]
    if not rep.videos:
        lines.append("No per-video results found.")
        if rep.missing:
            lines += ["", "Missing: " + ", ".join(f"{i} ({_cell(why)})" for i, why in rep.missing.items())]
        return "\n".join(lines) + "\n"
    n_frames = [int(v["n_frames"]) for v in rep.videos]
    s = rep.settings
    how = ("first frame = source, the other frames drive it (absolute motion, driving camera)"
           if rep.protocol == "self" else
           f"video i driven onto the first frame of video i+{s.get('pair_offset', 1)} (relative motion)")
    lines += [
        f"{len(rep.videos)} video(s), {sum(n_frames)} generated frames ({min(n_frames)}-{max(n_frames)} per video); "
        f"{how}; {s.get('size')}x{s.get('size')}; compared on: {s.get('comparison')}.",
        "",
        "| Method | " + " | ".join(header(m) for m in cols) + " |",
        "|:--|" + "--:|" * len(cols),
    ]
    row = []
    for m in cols:
        if m in rep.overall:
            o = rep.overall[m]
            partial = f" ({o['n_videos']}/{len(rep.videos)} videos)" if o["n_videos"] < len(rep.videos) else ""
            row.append(format_value(m, o["mean"]) + partial)
        else:
            row.append(f"n/a ({_cell(rep.unavailable.get(m, 'no result'))})")
    lines.append(f"| {METHOD_LABELS.get(rep.method, rep.method)} | " + " | ".join(row) + " |")

    # Per video: long reasons become numbered notes under the table.
    notes: list[str] = []

    def note(reason: str) -> str:
        if reason not in notes:
            notes.append(reason)
        return f"n/a [{notes.index(reason) + 1}]"

    lines += ["", "Per video:", "", "| Video | Source | Frames | " + " | ".join(header(m) for m in cols) + " |",
              "|:--|:--|--:|" + "--:|" * len(cols)]
    for v in rep.videos:
        cells = []
        for m in cols:
            if v["mean"].get(m) is not None:
                cells.append(format_value(m, v["mean"][m]))
            else:
                why = "not requested" if m in v.get("not_requested", []) else v.get("unavailable", {}).get(m, "no result")
                cells.append(note(_cell(why)))
        src = "(itself)" if v["source"]["item_id"] == v["item_id"] else _cell(v["source"]["name"])
        lines.append(f"| {_cell(v['name'])} | {src} | {v['n_frames']} | " + " | ".join(cells) + " |")
    if notes:
        lines += [""] + [f"[{k + 1}] {r}" for k, r in enumerate(notes)]

    lines += ["", "Metric models:", ""]
    for m in cols:
        if m in rep.models:
            lines.append(f"- {header(m)}: " + " / ".join(_cell(x) for x in rep.models[m]))
        else:
            lines.append(f"- {header(m)}: n/a ({_cell(rep.unavailable.get(m, 'no result'))})")
    lines += ["", f"Note: {substitute_note(cols)}"]
    if rep.missing:
        lines += ["", "Missing: " + ", ".join(f"{i} ({_cell(why)})" for i, why in rep.missing.items())]
    return "\n".join(lines) + "\n"


def _csv_value(metric: str, value) -> str:
    if value is None:
        return "n/a"
    return repr(float(value))


def write_reports(rep: Report, out: Path) -> dict[str, Path]:
    """``<out>/eval-<protocol>.json`` (everything), ``.csv`` (one row per video + the overall rows) and ``.md``."""
    out = Path(out)
    base = out / f"eval-{rep.protocol}"
    paths = {"json": base.with_suffix(".json"), "csv": base.with_suffix(".csv"), "md": base.with_suffix(".md")}
    summary = rep.to_dict()
    for v in summary["videos"]:  # the per-frame values stay in the per-video files
        v.pop("per_frame", None)
        v.pop("details", None)
    write_json(paths["json"], summary)

    cols = rep.columns
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["video", "item_id", "source_item_id", "frames", *cols])
    for v in rep.videos:
        w.writerow([v["name"], v["item_id"], v["source"]["item_id"], v["n_frames"],
                    *[_csv_value(m, v["mean"].get(m)) for m in cols]])
    total = sum(int(v["n_frames"]) for v in rep.videos)
    w.writerow(["overall (mean over frames)", "", "", total,
                *[_csv_value(m, rep.overall[m]["mean"] if m in rep.overall else None) for m in cols]])
    w.writerow(["overall (mean over videos)", "", "", total,
                *[_csv_value(m, rep.overall[m]["mean_over_videos"] if m in rep.overall else None) for m in cols]])
    with atomic_path(paths["csv"]) as tmp:
        tmp.write_text(buf.getvalue())
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(markdown_report(rep))
    return paths


def write_frames_csv(path: Path, record: dict) -> None:
    """Per-frame values of one video: one row per generated frame (empty = not scored, n/a = unavailable)."""
    cols = [m for m in COLUMNS[record["protocol"]] if m not in record.get("not_requested", [])]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["k", "driving_frame", *cols])
    for k, t in enumerate(record["driving_frames"]):
        row = []
        for m in cols:
            if m not in record["per_frame"]:
                row.append("n/a")
            else:
                x = record["per_frame"][m][k]
                row.append("" if x is None else repr(float(x)))
        w.writerow([k, t, *row])
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


# ------------------------------------------------------------------------------------------------------- pictures
def write_png(path: Path, image: np.ndarray) -> None:
    from ..video import write_png as _write

    _write(path, image)


def _font(size: int = 14):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 (scalable when FreeType is available)
    except TypeError:
        return ImageFont.load_default()


def _thumb(img: np.ndarray, side: int):
    """(H, W, 3) float in [0, 1] -> a PIL image ``side`` pixels square."""
    from PIL import Image

    im = Image.fromarray(np.asarray(np.clip(img * 255.0 + 0.5, 0, 255), dtype=np.uint8))
    return im if im.size == (side, side) else im.resize((side, side), Image.LANCZOS)


def _fit(draw, text: str, font, width: float) -> str:
    """``text`` cut with an ellipsis so that it fits in ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def side_by_side(source: np.ndarray, rows: list[tuple[np.ndarray, np.ndarray, str, str]],
                 titles: tuple[str, str, str] = ("source", "driving", "ours"), side: int = 256) -> np.ndarray:
    """A grid: one row per frame, columns source | driving | ours, every tile ``side`` pixels square.

    Args:
        source: (H, W, 3) float in [0, 1].
        rows: (driving (H, W, 3), ours (H, W, 3), label drawn on the driving tile, label drawn on ours).
    Returns:
        (R * side + header, 3 * side, 3) uint8.
    """
    from PIL import Image, ImageDraw

    head = 24
    canvas = Image.new("RGB", (3 * side, head + len(rows) * side), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(14)
    for c, t in enumerate(titles):
        draw.text((c * side + 6, 4), _fit(draw, t, font, side - 12), fill=(0, 0, 0), font=font)
    src = _thumb(source, side)
    for r, (drv, ours, drv_label, ours_label) in enumerate(rows):
        y = head + r * side
        for c, im in enumerate((src, _thumb(drv, side), _thumb(ours, side))):
            canvas.paste(im, (c * side, y))
        for c, label in ((1, drv_label), (2, ours_label)):
            if label:
                x0, y0, x1, y1 = draw.textbbox((c * side + 4, y + 4), label, font=font)
                draw.rectangle((x0 - 2, y0 - 2, x1 + 2, y1 + 2), fill=(0, 0, 0))
                draw.text((c * side + 4, y + 4), label, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def pick_frames(n: int, k: int) -> list[int]:
    """Up to ``k`` evenly spaced indices in [0, n), first and last included."""
    if n <= k:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})


def side_by_side_for(record: dict, pred_dir: Path, driving_pp: Path, source_pp: Path, k: int = 4) -> np.ndarray:
    """The side-by-side picture of one evaluated video (``record`` as written by the evaluation)."""
    from .protocol import _read_rgb

    frames = record["driving_frames"]
    psnr = record["per_frame"].get("psnr")
    rows = []
    for i in pick_frames(len(frames), k):
        drv = _read_rgb(driving_pp / "frames" / f"{frames[i]:06d}.png")
        ours = _read_rgb(pred_dir / f"{i:06d}.png")
        value = psnr[i] if psnr is not None else None
        rows.append((drv, ours, f"frame {frames[i]}", "" if value is None else f"PSNR {format_value('psnr', value)}"))
    drv_title = "driving = ground truth" if record["protocol"] == "self" else f"driving ({record['name']})"
    src_title = f"source ({record['source']['name']}, frame 0)"
    return side_by_side(_read_rgb(source_pp / "frames" / "000000.png"), rows,
                        (src_title, drv_title, f"ours ({record['avatar']['method']})"), 256)


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> np.ndarray:
    """Round tick values (steps of 1, 2, 2.5 or 5 x 10^k; whole numbers with ``integer``) covering [lo, hi]."""
    if not hi > lo:
        pad = abs(lo) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw * (1 - 1e-9))
    if integer:
        step = max(1.0, float(round(step))) if step >= 1 else 1.0
    start, stop = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    return np.arange(round((stop - start) / step) + 1) * step + start


def line_plot(xs: np.ndarray, ys: np.ndarray, title: str, ylabel: str, mean: float | None = None,
              size: tuple[int, int] = (640, 320)) -> np.ndarray:
    """A line plot (H, W, 3) uint8 drawn with Pillow: axes, round ticks, light grid, the values as a line with
    dots (gaps at non-finite values) and an optional dashed mean line."""
    from PIL import Image, ImageDraw

    W, H = size
    left, right, top, bottom = 64, 20, 34, 44
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    font = _font(12)
    xs = np.asarray(xs, dtype=np.float64)
    ys = np.asarray(ys, dtype=np.float64)
    ok = np.isfinite(ys)
    lo, hi = (float(ys[ok].min()), float(ys[ok].max())) if ok.any() else (0.0, 1.0)
    yt = nice_ticks(lo, hi)
    xt = nice_ticks(float(xs.min()), float(xs.max()), integer=True) if len(xs) else np.array([0.0, 1.0])
    xt = xt[(xt >= xs.min() - 1e-9) & (xt <= xs.max() + 1e-9)] if len(xs) > 1 else xt
    x0, x1 = (float(xs.min()), float(xs.max())) if len(xs) > 1 and xs.max() > xs.min() else (xs[0] - 1, xs[0] + 1)
    y0, y1 = float(yt[0]), float(yt[-1])

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (W - left - right), H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom))

    for y in yt:  # grid + y ticks
        _, py = px(x0, y)
        d.line((left, py, W - right, py), fill=(225, 225, 225))
        label = f"{y:g}"
        tw = d.textlength(label, font=font)
        d.text((left - 6 - tw, py - 7), label, fill=(0, 0, 0), font=font)
    for x in xt:  # x ticks
        qx, _ = px(x, y0)
        d.line((qx, H - bottom, qx, H - bottom + 4), fill=(0, 0, 0))
        label = f"{x:g}"
        d.text((qx - d.textlength(label, font=font) / 2, H - bottom + 6), label, fill=(0, 0, 0), font=font)
    d.line((left, top, left, H - bottom), fill=(0, 0, 0))
    d.line((left, H - bottom, W - right, H - bottom), fill=(0, 0, 0))
    d.text((left, 8), title, fill=(0, 0, 0), font=_font(14))
    d.text((left + (W - left - right) / 2 - 40, H - 18), "driving frame", fill=(0, 0, 0), font=font)
    d.text((6, top - 22), ylabel, fill=(0, 0, 0), font=font)
    if mean is not None and math.isfinite(mean):
        _, my = px(x0, mean)
        for sx in range(left, W - right, 12):
            d.line((sx, my, min(sx + 6, W - right), my), fill=(200, 40, 40), width=1)
        d.text((W - right - 90, my - 15), f"mean {mean:.4g}", fill=(200, 40, 40), font=font)
    pts = [px(x, y) if f else None for x, y, f in zip(xs, ys, ok)]
    for a, b in zip(pts[:-1], pts[1:]):
        if a is not None and b is not None:
            d.line((*a, *b), fill=(31, 119, 180), width=2)
    for p in pts:
        if p is not None:
            d.ellipse((p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3), fill=(31, 119, 180))
    return np.asarray(canvas)


def per_frame_plot(record: dict, metric: str = "psnr") -> np.ndarray:
    """The per-frame plot of ``metric`` for one evaluated video."""
    values = np.array([np.nan if v is None else v for v in record["per_frame"][metric]], dtype=np.float64)
    unit = {"psnr": "dB", "csim": "cosine"}.get(metric, "")
    return line_plot(np.asarray(record["driving_frames"], dtype=np.float64), values,
                     f"{LABELS[metric]} per frame: {record['name']}", f"{LABELS[metric]} ({unit})" if unit else
                     LABELS[metric], record["mean"].get(metric))
