"""Training data over preprocess artifacts (paper section 3.5, "Training Strategy").

An *item* is one preprocessed clip: a folder with ``tracking.npz`` and ``frames/%06d.{png,jpg}`` +
``mattes/%06d.png`` (the layout ``fhavatar preprocess`` writes under ``<item>/preprocess/``, and that
``tools/pack_training_data.py`` packs). Only frames whose tracking status is ``tracked`` are used.

A training sample is two frames of one clip: the source image and the target (driving) frame whose tracked motion
the avatar must reproduce. Two modes, switched at random (``DataConfig.recon_prob``) as the paper does after
Portrait4D:

* animation mode: source and target are two different frames of the clip;
* 3D reconstruction mode: the target frame is its own source. With the paper's PanoHead prior this mode also adds
  2 inverted novel views as targets; PanoHead and its inversion are not available here, so that part is skipped
  (only the frame itself is supervised).

Augmentations: a horizontal flip of both images with mirrored tracking (``mirror.HeadMirror``; skipped for head
models that are not mirror-symmetric), and colour jitter (brightness, contrast, saturation) applied identically to
source and target, on the foreground only (the white background stays white, as the renderer's background).

Sampling is a pure function of ``(seed, step, index in the global batch)`` (:func:`sample_plan`), so the data
position of a resumed run is just its step: resuming reproduces the exact batches of an uninterrupted run. Under
``torchrun`` process ``rank`` takes elements ``rank * B .. rank * B + B - 1`` of the step's global batch
(:func:`rank_plans`), so N processes of batch B see exactly the samples of one process of batch N * B.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..head.base import HeadParams
from ..tracking.result import TRACKED, TrackingResult, load_tracking
from .config import DataConfig
from .mirror import HeadMirror, mirror_c2w

FRAME_EXTS = (".jpg", ".jpeg", ".png")


# --------------------------------------------------------------------------------------------------------- items
def find_items(paths: list[str | Path]) -> list[Path]:
    """Preprocessed item folders (each holding ``tracking.npz``) under the given paths, sorted by name.

    A path may be an item folder, an item's parent (``<item>/preprocess``), or a folder of items.
    """
    found: list[Path] = []
    for spec in paths:
        p = Path(spec)
        if not p.is_dir():
            raise InputError(f"training data '{p}' is not a folder", "pass folders made by `fhavatar preprocess`")
        direct = [c for c in (p, p / "preprocess") if (c / "tracking.npz").is_file()]
        if direct:
            found.append(direct[0])
            continue
        subs = sorted(d for d in p.iterdir() if d.is_dir())
        items = [c for d in subs for c in (d, d / "preprocess") if (c / "tracking.npz").is_file()]
        if not items:
            raise InputError(f"training data '{p}' holds no preprocessed clips (no tracking.npz found)",
                             "run `fhavatar preprocess` on the clips first, or pack them with tools/pack_training_data.py")
        found.extend(items)
    return sorted(set(found), key=lambda d: (item_name(d), str(d)))


def item_name(folder: Path) -> str:
    """The item's name: its folder (or the folder above ``preprocess/``)."""
    folder = Path(folder)
    return folder.parent.name if folder.name == "preprocess" else folder.name


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """True when ``name`` equals a pattern or is ``<pattern>-<hash>`` (a preprocess item id)."""
    return any(name == p or name.startswith(p + "-") for p in patterns)


def split_items(items: list[Path], val_patterns: tuple[str, ...]) -> tuple[list[Path], list[Path]]:
    """(training items, validation items): the named items are held out of training entirely."""
    val = [d for d in items if matches(item_name(d), val_patterns)]
    train = [d for d in items if d not in val]
    missing = [p for p in val_patterns if not any(matches(item_name(d), (p,)) for d in val)]
    if missing:
        raise InputError(f"validation item(s) {missing} not found among the data folders",
                         "fix data.val_items or add the held-out clips' preprocessed folders")
    return train, val


def _frame_file(folder: Path, kind: str, t: int) -> Path:
    for ext in FRAME_EXTS if kind == "frames" else (".png",):
        f = folder / kind / f"{t:06d}{ext}"
        if f.is_file():
            return f
    raise InputError(f"{kind[:-1]} {t} missing in '{folder}'", "re-run preprocess (or re-pack the data)")


def _read_image(path: Path, size: int, mode: str) -> np.ndarray:
    """(size, size[, C]) uint8 in PIL ``mode`` ("RGB" or "L"), resized with antialiasing when needed."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert(mode)
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.LANCZOS)
        return np.asarray(im, dtype=np.uint8).copy()


def read_rgb(path: Path, size: int) -> np.ndarray:
    """(size, size, 3) uint8."""
    return _read_image(path, size, "RGB")


def read_matte(path: Path, size: int) -> np.ndarray:
    """(size, size) uint8."""
    return _read_image(path, size, "L")


PACKED_VIDEOS = ("frames.mp4", "mattes.mp4")  # a packed item's frames and mattes as videos (see train/pack.py)


def read_video_frames(path: Path, size: int, grey: bool = False) -> list[np.ndarray]:
    """All frames of a packed video, resized to ``size``: (size, size, 3) RGB or (size, size) uint8 each.

    OpenCV decodes it (it is on the GPU machines, where the packed data is meant to be read).
    """
    import cv2

    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        if bgr.shape[:2] != (size, size):
            bgr = cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)
        out.append(bgr[..., 1].copy() if grey else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    if not out:
        raise InputError(f"'{path}' has no readable frames", "re-pack the data (tools/pack_training_data.py)")
    return out


class Clip:
    """One preprocessed clip at a fixed image size: tracking, the usable (tracked) frames, cached pixels.

    Frames come from ``frames/``/``mattes/`` images, or from a packed item's ``frames.mp4``/``mattes.mp4`` (frame
    t of the tracking is frame t of the videos; always preloaded).
    """

    def __init__(self, folder: Path, size: int, preload: bool = True) -> None:
        self.folder = Path(folder)
        self.name = item_name(self.folder)
        self.size = size
        self.tracking: TrackingResult = load_tracking(self.folder / "tracking.npz")
        self.frames = np.nonzero(np.asarray(self.tracking.status) == TRACKED)[0]
        self.params = self.tracking.head_params()
        self.K = torch.as_tensor(np.asarray(self.tracking.K), dtype=torch.float32)
        self.c2w = torch.as_tensor(np.asarray(self.tracking.c2w), dtype=torch.float32)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if (self.folder / PACKED_VIDEOS[0]).is_file():
            rgb = read_video_frames(self.folder / PACKED_VIDEOS[0], size)
            matte = read_video_frames(self.folder / PACKED_VIDEOS[1], size, grey=True)
            T = len(self.tracking.status)
            if len(rgb) != T or len(matte) != T:
                raise InputError(f"'{self.folder}': {len(rgb)} frames / {len(matte)} mattes for {T} tracked frames",
                                 "re-pack the data (tools/pack_training_data.py)")
            self._cache = {int(t): (rgb[t], matte[t]) for t in self.frames}
        elif preload:
            for t in self.frames:
                self.pixels(int(t))

    def __len__(self) -> int:
        return len(self.frames)

    def pixels(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (H, W, 3) uint8, matte (H, W) uint8) of frame ``t``."""
        if t not in self._cache:
            img = read_rgb(_frame_file(self.folder, "frames", t), self.size)
            mat = read_matte(_frame_file(self.folder, "mattes", t), self.size)
            self._cache[t] = (img, mat)
        return self._cache[t]


def load_clips(folders: list[Path], size: int, preload: bool = True, min_frames: int = 1) -> list[Clip]:
    clips = [Clip(f, size, preload) for f in folders]
    usable = [c for c in clips if len(c) >= min_frames]
    if not usable:
        raise InputError(f"none of {len(clips)} clip(s) has {min_frames}+ tracked frames",
                         "check the tracking status of the preprocessed clips")
    return usable


# ------------------------------------------------------------------------------------------------------ sampling
@dataclass
class SamplePlan:
    """What one batch element is: clip, source frame, target frame, mode, flip, jitter factors."""

    clip: int
    source: int
    target: int
    recon: bool
    flip: bool
    jitter: tuple[float, float, float]  # brightness, contrast, saturation factors


def sample_plan(clips: list[Clip], cfg: DataConfig, seed: int, step: int, index: int, can_flip: bool) -> SamplePlan:
    """Element ``index`` of the global batch of ``step`` (all processes together): a pure function of its arguments."""
    # The 0 is where the process rank used to be (each rank drew its own samples): keeping it keeps the batches of
    # single-process runs made before, so that they still resume exactly.
    rng = np.random.default_rng([seed, step, 0, index])
    c = int(rng.integers(len(clips)))
    frames = clips[c].frames
    recon = bool(rng.random() < cfg.recon_prob) or len(frames) < 2
    i = int(rng.integers(len(frames)))
    j = i if recon else int((i + 1 + rng.integers(len(frames) - 1)) % len(frames))  # j != i
    flip = bool(rng.random() < cfg.flip_prob) and can_flip
    jit = tuple(float(1.0 + rng.uniform(-a, a)) for a in (cfg.brightness, cfg.contrast, cfg.saturation))
    return SamplePlan(c, int(frames[j]), int(frames[i]), recon, flip, jit)  # type: ignore[arg-type]


def rank_plans(clips: list[Clip], cfg: DataConfig, seed: int, step: int, rank: int, batch_size: int,
               can_flip: bool) -> list[SamplePlan]:
    """Process ``rank``'s ``batch_size`` elements of the global batch of ``step``: its disjoint, contiguous share."""
    return [sample_plan(clips, cfg, seed, step, rank * batch_size + b, can_flip) for b in range(batch_size)]


@dataclass
class Batch:
    """A training batch on one device. Images (B, 3, H, W) in [0, 1] on the white background, mattes (B, 1, H, W);
    params HeadParams (B, ...); c2w (B, 4, 4); K (B, 3, 3) normalized; recon/flip (B,) bool."""

    src_img: torch.Tensor
    src_matte: torch.Tensor
    tgt_img: torch.Tensor
    tgt_matte: torch.Tensor
    src_params: HeadParams
    tgt_params: HeadParams
    src_c2w: torch.Tensor
    tgt_c2w: torch.Tensor
    K: torch.Tensor
    recon: torch.Tensor
    flip: torch.Tensor

    @property
    def size(self) -> int:
        return self.src_img.shape[0]


def jitter_colors(img: torch.Tensor, matte: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness/contrast/saturation jitter of the foreground, re-composited on white.

    img (B, 3, H, W) composited on white, matte (B, 1, H, W), factors (B, 3); the same factors for source and
    target keep their colours consistent.
    """
    b, c, s = (factors[:, k].view(-1, 1, 1, 1) for k in range(3))
    x = img * b
    mean = (x * matte).sum((1, 2, 3), keepdim=True) / (3 * matte.sum((1, 2, 3), keepdim=True)).clamp_min(1.0)
    x = (x - mean) * c + mean
    gray = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - gray) * s + gray
    return (x.clamp(0, 1) * matte + (1 - matte)).clamp(0, 1)


def _stack(clips: list[Clip], items: list[tuple[int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    imgs = np.stack([clips[c].pixels(t)[0] for c, t in items])
    mats = np.stack([clips[c].pixels(t)[1] for c, t in items])
    img = torch.from_numpy(imgs).to(device).permute(0, 3, 1, 2).float() / 255.0
    mat = torch.from_numpy(mats).to(device)[:, None].float() / 255.0
    return img, mat


def _params(clips: list[Clip], items: list[tuple[int, int]], device) -> HeadParams:
    ps = [clips[c].params.index(slice(t, t + 1)) for c, t in items]
    return HeadParams(**{k: torch.cat([getattr(p, k) for p in ps]).to(device) for k in ps[0].to_dict()})


def make_batch(clips: list[Clip], plans: list[SamplePlan], device, mirror: HeadMirror | None = None) -> Batch:
    """Gather, flip and jitter the planned samples into one ``Batch`` on ``device``."""
    src = [(p.clip, p.source) for p in plans]
    tgt = [(p.clip, p.target) for p in plans]
    src_img, src_matte = _stack(clips, src, device)
    tgt_img, tgt_matte = _stack(clips, tgt, device)
    src_params, tgt_params = _params(clips, src, device), _params(clips, tgt, device)
    src_c2w = torch.stack([clips[c].c2w[t] for c, t in src]).to(device)
    tgt_c2w = torch.stack([clips[c].c2w[t] for c, t in tgt]).to(device)
    K = torch.stack([clips[c].K for c, _ in src]).to(device)
    flip = torch.tensor([p.flip for p in plans], device=device)
    if flip.any():
        if mirror is None:
            raise ValueError("a flip was planned but the head model has no mirror maps")
        f4 = flip.view(-1, 1, 1, 1)
        src_img, src_matte = torch.where(f4, src_img.flip(-1), src_img), torch.where(f4, src_matte.flip(-1), src_matte)
        tgt_img, tgt_matte = torch.where(f4, tgt_img.flip(-1), tgt_img), torch.where(f4, tgt_matte.flip(-1), tgt_matte)
        src_params, tgt_params = (_where_params(flip, mirror.params(p), p) for p in (src_params, tgt_params))
        f3 = flip.view(-1, 1, 1)
        src_c2w, tgt_c2w = torch.where(f3, mirror_c2w(src_c2w), src_c2w), torch.where(f3, mirror_c2w(tgt_c2w), tgt_c2w)
    factors = torch.tensor([p.jitter for p in plans], device=device, dtype=torch.float32)
    src_img = jitter_colors(src_img, src_matte, factors)
    tgt_img = jitter_colors(tgt_img, tgt_matte, factors)
    recon = torch.tensor([p.recon for p in plans], device=device)
    return Batch(src_img, src_matte, tgt_img, tgt_matte, src_params, tgt_params, src_c2w, tgt_c2w, K, recon, flip)


def _where_params(cond: torch.Tensor, a: HeadParams, b: HeadParams) -> HeadParams:
    c = cond.view(-1, 1)
    return HeadParams(**{k: torch.where(c, getattr(a, k), getattr(b, k)) for k in a.to_dict()})


# ---------------------------------------------------------------------------------------------------- validation
@dataclass
class ValClip:
    """Self-reenactment on a held-out clip: the first tracked frame is the source, the next ones the targets.

    src_img (1, 3, H, W), src_matte (1, 1, H, W), src_params (1, ...), src_c2w (1, 4, 4), K (1, 3, 3);
    tgt_img (T, 3, H, W), tgt_matte (T, 1, H, W), tgt_params (T, ...), tgt_c2w (T, 4, 4).
    """

    name: str
    src_img: torch.Tensor
    src_matte: torch.Tensor
    src_params: HeadParams
    src_c2w: torch.Tensor
    K: torch.Tensor
    tgt_img: torch.Tensor
    tgt_matte: torch.Tensor
    tgt_params: HeadParams
    tgt_c2w: torch.Tensor
    frames: list[int]

    def to(self, device) -> "ValClip":
        kw = {k: (v.to(device) if isinstance(v, (torch.Tensor, HeadParams)) else v) for k, v in self.__dict__.items()}
        return ValClip(**kw)


def load_val_clip(clip: Clip, max_targets: int) -> ValClip:
    if len(clip) < 2:
        raise InputError(f"validation clip '{clip.name}' has fewer than 2 tracked frames")
    src_t = int(clip.frames[0])
    tgts = [int(t) for t in clip.frames[1 : 1 + max_targets]]
    clips = [clip]
    si, sm = _stack(clips, [(0, src_t)], "cpu")
    ti, tm = _stack(clips, [(0, t) for t in tgts], "cpu")
    return ValClip(
        name=clip.name, src_img=si, src_matte=sm, src_params=_params(clips, [(0, src_t)], "cpu"),
        src_c2w=clip.c2w[src_t : src_t + 1], K=clip.K[None], tgt_img=ti, tgt_matte=tm,
        tgt_params=_params(clips, [(0, t) for t in tgts], "cpu"), tgt_c2w=clip.c2w[tgts], frames=[src_t] + tgts,
    )


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size), antialiased (no-op at the same size)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
