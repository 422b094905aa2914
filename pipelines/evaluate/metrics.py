"""The paper's evaluation metrics (section 4.1), computed offline: on the CPU, except CSIM's face-descriptor network,
which runs batched on the GPU when one is present (``MetricsConfig.device``).

Reconstruction (self-reenactment, needs ground-truth frames): PSNR, SSIM, LPIPS.
Identity: CSIM, cosine similarity of face-identity embeddings of each generated frame and the source image.
Motion (against the ground truth, or the driving frames in cross-identity reenactment): AKD (mean distance of 68
facial keypoints, pixels at 512), AED (expression distance) and APD (head-pose distance, degrees).

Which model produced each number is returned with it (``MetricsResult.models``); a metric whose model cannot be
loaded offline is listed in ``MetricsResult.unavailable`` with the reason and has no number. CSIM, AED and APD use
substitutes for the paper's ArcFace and SMIRK (see ``models.py`` and the README), so those numbers are not directly
comparable with the paper's tables; PSNR, SSIM and LPIPS (AlexNet) follow the standard definitions, and AKD is FAN's
when its weights are cached, else MediaPipe-based.

Images are (T, H, W, 3) float in [0, 1] (512 x 512 in the paper). With ``foreground=True`` both the prediction and
the ground truth are composited on one fixed background colour with the given matte first, so that only the head
is compared.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ConfigError, InputError
from . import models as M

METRICS = ("psnr", "ssim", "lpips", "csim", "akd", "aed", "apd")
RECONSTRUCTION = ("psnr", "ssim", "lpips")  # need ground-truth frames
MOTION = ("akd", "aed", "apd")  # need ground-truth or driving frames

UNITS = {
    "psnr": "dB (+inf for identical frames)",
    "ssim": "mean SSIM over RGB channels, 11x11 Gaussian window sigma 1.5",
    "lpips": "LPIPS distance",
    "csim": "cosine similarity",
    "akd": "pixels at 512x512",
    "aed": "inter-ocular distances (pose-aligned lip/eye/brow mesh points)",
    "apd": "degrees (mean |yaw|, |pitch|, |roll| of the relative head rotation)",
}

# MediaPipe face-mesh points that barely move with expression (forehead and nose midline, eye corners, nostrils):
# the rigid fit between two faces uses only these, so it measures head pose and not expression.
RIGID_POINTS = (10, 151, 9, 8, 168, 6, 197, 195, 5, 4, 1, 2, 33, 133, 362, 263, 75, 97, 326, 305)
RIGHT_EYE_CORNERS, LEFT_EYE_CORNERS = (33, 133), (362, 263)


@functools.lru_cache(maxsize=1)
def expression_points() -> tuple[int, ...]:
    """Face-mesh points that carry expression: MediaPipe's own lip, eye and eyebrow contours (92 points)."""
    from mediapipe.python.solutions import face_mesh_connections as C

    sets = (C.FACEMESH_LIPS, C.FACEMESH_LEFT_EYE, C.FACEMESH_RIGHT_EYE, C.FACEMESH_LEFT_EYEBROW,
            C.FACEMESH_RIGHT_EYEBROW)
    return tuple(sorted({i for s in sets for edge in s for i in edge}))


@dataclass
class MetricsConfig:
    """Metric settings; defaults follow the paper where it says (512 x 512 frames, FAN keypoints when cached) and
    common practice where it does not (LPIPS with AlexNet, white background as in our preprocess stage)."""

    background: tuple[float, float, float] = (1.0, 1.0, 1.0)  # foreground mode: composite colour (preprocess: white)
    lpips_net: str = "alex"  # "alex" (the usual LPIPS) or "vgg"
    keypoints: str = "auto"  # AKD keypoints: "auto" (FAN if cached, else MediaPipe), "fan", "mediapipe"
    akd_resolution: int = 512  # AKD is reported in pixels of a frame this wide
    lpips_batch: int = 4  # frames per LPIPS forward (bounds CPU memory)
    device: str = "auto"  # where the CSIM network runs: "auto" (the GPU when present), "cpu", "cuda", "cuda:1" ...

    def __post_init__(self) -> None:
        if self.keypoints not in ("auto", "fan", "mediapipe"):
            raise ConfigError(f"AKD keypoints {self.keypoints!r} unknown", "use auto, fan or mediapipe")
        if self.lpips_net not in M.LPIPS_BACKBONES:
            raise ConfigError(f"LPIPS backbone {self.lpips_net!r} unknown", f"use one of {sorted(M.LPIPS_BACKBONES)}")
        if len(self.background) != 3 or not all(0.0 <= c <= 1.0 for c in self.background):
            raise ConfigError(f"background {self.background} is not an RGB triple in [0, 1]")


@dataclass
class MetricsResult:
    """Per-frame values (T,) (NaN where a frame could not be scored, e.g. no face found), their means over the
    scored frames, the model behind each metric and the reasons for metrics that could not be computed."""

    n_frames: int
    foreground: bool
    per_frame: dict[str, np.ndarray] = field(default_factory=dict)
    mean: dict[str, float] = field(default_factory=dict)
    n_valid: dict[str, int] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    details: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. apd_yaw_pitch_roll (T, 3) degrees

    def add(self, name: str, values: np.ndarray, model: str) -> None:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        ok = ~np.isnan(values)
        if not ok.any():
            self.unavailable[name] = f"no frame could be scored (no face found in the frames compared); model: {model}"
            return
        self.per_frame[name] = values
        self.mean[name] = float(values[ok].mean())
        self.n_valid[name] = int(ok.sum())
        self.models[name] = model

    def to_dict(self) -> dict:
        """JSON-friendly: lists of floats, NaN as None (+inf stays a float: Python's json writes Infinity)."""

        def clean(v):
            return None if isinstance(v, float) and math.isnan(v) else v

        return {
            "n_frames": self.n_frames,
            "foreground": self.foreground,
            "mean": {k: clean(v) for k, v in self.mean.items()},
            "units": {k: UNITS[k] for k in self.mean},
            "n_valid": dict(self.n_valid),
            "models": dict(self.models),
            "unavailable": dict(self.unavailable),
            "per_frame": {k: [clean(float(x)) for x in v] for k, v in self.per_frame.items()},
            "details": {k: np.where(np.isnan(v), None, v).tolist() for k, v in self.details.items()},
        }


# ------------------------------------------------------------------------------------------------- image metrics


def composite(images: np.ndarray, alpha: np.ndarray, background=(1.0, 1.0, 1.0)) -> np.ndarray:
    """(T, H, W, 3) images over a constant ``background`` colour with ``alpha`` (T, H, W, 1) in [0, 1]."""
    bg = np.asarray(background, dtype=np.float32).reshape(1, 1, 1, 3)
    return images * alpha + bg * (1.0 - alpha)


def psnr(pred: np.ndarray, gt: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """(T,) PSNR in dB of (T, H, W, 3) frames: 10 log10(range^2 / MSE) over all pixels and channels of a frame.
    Identical frames give +inf (no cap)."""
    diff = np.asarray(pred, dtype=np.float64) - np.asarray(gt, dtype=np.float64)
    mse = (diff**2).reshape(diff.shape[0], -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(pred: np.ndarray, gt: np.ndarray, data_range: float = 1.0, chunk: int = 8) -> np.ndarray:
    """(T,) SSIM (Wang et al. 2004) of (T, H, W, 3) frames: 11 x 11 Gaussian window with sigma 1.5, K1 = 0.01,
    K2 = 0.03, population (co)variances, computed per RGB channel, averaged over channels and over the pixels at
    least 5 from the border (where the window fits). Equals ``skimage.metrics.structural_similarity(...,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=-1, data_range=1)``."""
    from scipy.ndimage import correlate1d

    g = _gaussian_window()
    r = len(g) // 2
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def filt(z: np.ndarray) -> np.ndarray:  # separable Gaussian over H and W of (N, H, W, C)
        return correlate1d(correlate1d(z, g, axis=1, mode="reflect"), g, axis=2, mode="reflect")

    out = []
    for s in range(0, pred.shape[0], chunk):
        x = np.asarray(pred[s : s + chunk], dtype=np.float64)
        y = np.asarray(gt[s : s + chunk], dtype=np.float64)
        mx, my = filt(x), filt(y)
        vx, vy, cxy = filt(x * x) - mx * mx, filt(y * y) - my * my, filt(x * y) - mx * my
        smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        out.append(smap[:, r:-r, r:-r].reshape(len(x), -1).mean(1))
    return np.concatenate(out)


def lpips_distance(pred: np.ndarray, gt: np.ndarray, model: M.Lpips, batch: int = 4) -> np.ndarray:
    """(T,) LPIPS of (T, H, W, 3) frames in [0, 1]."""
    out = []
    for s in range(0, pred.shape[0], batch):
        a = torch.as_tensor(np.asarray(pred[s : s + batch]), dtype=torch.float32).permute(0, 3, 1, 2)
        b = torch.as_tensor(np.asarray(gt[s : s + batch]), dtype=torch.float32).permute(0, 3, 1, 2)
        out.append(model(a, b).double())
    return torch.cat(out).numpy()


# -------------------------------------------------------------------------------------------------- face metrics


def similarity_fit(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity (Umeyama 1991) mapping points src (N, 3) onto dst (N, 3): dst ~ s R src + t.
    Returns s, R (3, 3) a proper rotation, t (3,)."""
    ms, md = src.mean(0), dst.mean(0)
    a, b = src - ms, dst - md
    u, sig, vt = np.linalg.svd(b.T @ a / len(src))
    d = np.eye(3)
    d[2, 2] = np.sign(np.linalg.det(u @ vt)) or 1.0
    rot = u @ d @ vt
    scale = float(np.trace(np.diag(sig) @ d) / (a**2).sum(1).mean())
    return scale, rot, md - scale * rot @ ms


def rotation_to_yaw_pitch_roll(rot: np.ndarray) -> np.ndarray:
    """(3,) degrees: rot = Ry(yaw) Rx(pitch) Rz(roll) in image axes (x right, y down, z into the image)."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(rot).as_euler("YXZ", degrees=True)


def inter_ocular(lmk: np.ndarray) -> float:
    """Distance between the two eye centres (mid-points of each eye's corners) of (478, 3) mesh points."""
    return float(np.linalg.norm(lmk[list(RIGHT_EYE_CORNERS)].mean(0) - lmk[list(LEFT_EYE_CORNERS)].mean(0)))


def expression_and_pose_distance(lmk: np.ndarray, ref: np.ndarray) -> tuple[float, np.ndarray]:
    """Compare the face in ``lmk`` (478, 3) with ``ref`` (478, 3) (MediaPipe mesh points, pixels).

    A similarity transform fitted on the rigid points (``RIGID_POINTS``) maps ``lmk`` onto ``ref``; its rotation is
    the relative head pose, and what is left of the lip / eye / brow points after it is the expression difference.

    Returns:
        aed: mean 3D distance of the aligned expression points, in inter-ocular distances of ``ref``.
        ypr: (3,) yaw, pitch, roll (degrees) of the relative rotation.
    """
    rigid = list(RIGID_POINTS)
    s, rot, t = similarity_fit(lmk[rigid], ref[rigid])
    expr = list(expression_points())
    aligned = s * lmk[expr] @ rot.T + t
    aed = float(np.linalg.norm(aligned - ref[expr], axis=1).mean() / inter_ocular(ref))
    return aed, rotation_to_yaw_pitch_roll(rot)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ------------------------------------------------------------------------------------------------------- driver


def _frames(x, name: str, single_ok: bool = True) -> np.ndarray:
    """(T, H, W, 3) float32 in [0, 1] from an array or tensor; (H, W, 3) becomes T = 1."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim == 3 and single_ok:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise InputError(f"{name} has shape {tuple(x.shape)}", "expected (T, H, W, 3) RGB frames")
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"{name} has dtype {x.dtype}", "pass float images in [0, 1] (divide uint8 by 255)")
    if x.size and (float(x.min()) < -1e-3 or float(x.max()) > 1.0 + 1e-3):
        raise InputError(f"{name} has values in [{float(x.min()):.3g}, {float(x.max()):.3g}]", "expected [0, 1]")
    return np.clip(x.astype(np.float32), 0.0, 1.0)


def _normalized(points: np.ndarray, width: int, height: int) -> np.ndarray:
    return points[..., :2] / np.array([width, height], dtype=np.float64)


def compute_metrics(
    pred,
    gt=None,
    source=None,
    mask=None,
    which: set[str] | None = None,
    foreground: bool = False,
    *,
    driving=None,
    config: MetricsConfig | None = None,
) -> MetricsResult:
    """Score generated frames.

    Args:
        pred: (T, H, W, 3) generated frames in [0, 1].
        gt: (T, H, W, 3) ground-truth frames (self-reenactment) or None.
        source: (H', W', 3) source image; CSIM compares each frame with it (with the ground truth when None).
        mask: (T, H, W, 1) alpha matte in [0, 1], required when ``foreground``.
        which: metric names (subset of ``METRICS``); None = every metric the given inputs allow.
        foreground: composite ``pred`` and ``gt`` on ``config.background`` with ``mask`` before scoring.
        driving: (T, H'', W'', 3) driving frames; AKD / AED / APD compare ``pred`` with them instead of ``gt``
            (cross-identity reenactment, where there is no ground truth).
        config: ``MetricsConfig``.

    Returns:
        ``MetricsResult``; metrics whose model is missing are in ``.unavailable`` with the reason, never numbers.
    """
    cfg = config or MetricsConfig()
    pred = _frames(pred, "pred")
    t, h, w, _ = pred.shape
    gt = None if gt is None else _frames(gt, "gt")
    if gt is not None and gt.shape != pred.shape:
        raise InputError(f"gt has shape {gt.shape} but pred has {pred.shape}", "give one ground-truth frame per frame")
    driving = None if driving is None else _frames(driving, "driving")
    if driving is not None and driving.shape[0] != t:
        raise InputError(f"{driving.shape[0]} driving frames for {t} predicted frames", "give one per frame")
    source = None if source is None else _frames(source, "source")[0]

    possible = set()
    if gt is not None:
        possible |= set(RECONSTRUCTION)
    if source is not None or gt is not None:
        possible.add("csim")
    if gt is not None or driving is not None:
        possible |= set(MOTION)
    if which is None:
        wanted = [m for m in METRICS if m in possible]
        if not wanted:
            raise ConfigError("nothing to score", "give ground-truth frames, driving frames or a source image")
    else:
        unknown = set(which) - set(METRICS)
        if unknown:
            raise ConfigError(f"unknown metric(s) {sorted(unknown)}", f"choose from {', '.join(METRICS)}")
        missing = set(which) - possible
        if missing:
            raise ConfigError(
                f"metric(s) {sorted(missing)} need inputs that were not given",
                "PSNR/SSIM/LPIPS need gt; CSIM needs source or gt; AKD/AED/APD need gt or driving",
            )
        wanted = [m for m in METRICS if m in which]

    if foreground:
        if mask is None:
            raise ConfigError("foreground metrics need the alpha matte", "pass mask (T, H, W, 1) or foreground=False")
        alpha = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        alpha = alpha.astype(np.float32)
        if alpha.ndim == 3:
            alpha = alpha[..., None]
        if alpha.shape != (t, h, w, 1):
            raise InputError(f"mask has shape {alpha.shape}", f"expected ({t}, {h}, {w}, 1)")
        pred = composite(pred, alpha, cfg.background)
        if gt is not None:
            gt = composite(gt, alpha, cfg.background)

    res = MetricsResult(n_frames=t, foreground=foreground)

    # --- reconstruction
    if "psnr" in wanted:
        res.add("psnr", psnr(pred, gt), "formula (no model)")
    if "ssim" in wanted:
        res.add("ssim", ssim(pred, gt), "formula (no model)")
    if "lpips" in wanted:
        try:
            model = M.lpips_model(cfg.lpips_net)
            res.add("lpips", lpips_distance(pred, gt, model, cfg.lpips_batch), model.card.describe())
        except M.ModelUnavailable as exc:
            res.unavailable["lpips"] = str(exc)

    face_metrics = [m for m in wanted if m in ("csim",) + MOTION]
    if not face_metrics:
        return res
    try:
        mesh = M.face_mesh()
    except M.ModelUnavailable as exc:
        res.unavailable.update({m: str(exc) for m in face_metrics})
        return res
    pred_faces = _Faces.of(pred, mesh)
    if "csim" in wanted:
        _score_identity(res, pred_faces, source, gt, mesh, cfg.device)
    if any(m in wanted for m in MOTION):
        ref_faces = _Faces.of(driving if driving is not None else gt, mesh)
        against = "driving frames" if driving is not None else "ground-truth frames"
        _score_motion(res, [m for m in MOTION if m in wanted], pred_faces, ref_faces, against, mesh, cfg)
    return res


@dataclass
class _Faces:
    """Frames as uint8 with their face-mesh points (None where no face was found)."""

    images: list[np.ndarray]  # (H, W, 3) uint8
    meshes: list[np.ndarray | None]  # (478, 3) pixels
    height: int
    width: int

    @classmethod
    def of(cls, frames: np.ndarray, mesh: M.FaceMesh478) -> "_Faces":
        images = [M.to_uint8(f) for f in frames]
        return cls(images, [mesh(f) for f in images], frames.shape[1], frames.shape[2])


def _score_identity(res: MetricsResult, pred: _Faces, source, gt, mesh: M.FaceMesh478, device: str) -> None:
    """CSIM of each predicted frame with the source image (one embedding) or, without one, its ground truth."""
    try:
        idm = M.identity_model(device)
    except M.ModelUnavailable as exc:
        res.unavailable["csim"] = str(exc)
        return
    if source is not None:
        src = _Faces.of(source[None], mesh)
        refs = np.repeat(idm(src.images, src.meshes), len(pred.images), axis=0)
        against = "the source image"
    else:
        ref = _Faces.of(gt, mesh)
        refs = idm(ref.images, ref.meshes)
        against = "the ground-truth frame"
    emb = idm(pred.images, pred.meshes)
    values = np.array([cosine_similarity(a, b) for a, b in zip(emb, refs)])  # NaN where either has no face
    res.add("csim", values, f"{idm.card.describe()}; face boxes from {mesh.card.describe()}; against {against}")


def _score_motion(res: MetricsResult, wanted: list[str], pred: _Faces, ref: _Faces, against: str,
                  mesh: M.FaceMesh478, cfg: MetricsConfig) -> None:
    """AKD, AED and APD of each predicted frame against the reference (ground-truth or driving) frame."""
    t = len(pred.images)
    pairs = [i for i in range(t) if pred.meshes[i] is not None and ref.meshes[i] is not None]
    mesh_name = mesh.card.describe()

    if "akd" in wanted:
        fan, fan_reason = None, ""
        if cfg.keypoints in ("auto", "fan"):
            try:
                fan = M.fan_model()
            except M.ModelUnavailable as exc:
                fan_reason = str(exc)
        if cfg.keypoints == "fan" and fan is None:
            res.unavailable["akd"] = f"FAN keypoints requested but unavailable: {fan_reason}"
        else:
            values = np.full(t, np.nan)
            table = list(M.MEDIAPIPE_TO_IBUG68)
            for i in pairs:
                if fan is not None:
                    kp = fan(pred.images[i], M.face_box_from_mesh(pred.meshes[i]))
                    kr = fan(ref.images[i], M.face_box_from_mesh(ref.meshes[i]))
                    if kp is None or kr is None:
                        continue
                else:
                    kp, kr = pred.meshes[i][table, :2], ref.meshes[i][table, :2]
                # Compare in normalized image coordinates so that driving frames of another size work too.
                d = _normalized(kp, pred.width, pred.height) - _normalized(kr, ref.width, ref.height)
                values[i] = float(np.linalg.norm(d * cfg.akd_resolution, axis=1).mean())
            if fan is not None:
                name = f"{fan.card.describe()}; face boxes from {mesh_name}"
            else:
                why = f" (FAN not used: {fan_reason})" if fan_reason else ""
                name = f"{mesh_name} -> 68 iBUG points by a fixed index table{why}"
            res.add("akd", values, f"{name}; against {against}")

    if "aed" in wanted or "apd" in wanted:
        aed, ypr = np.full(t, np.nan), np.full((t, 3), np.nan)
        for i in pairs:
            aed[i], ypr[i] = expression_and_pose_distance(pred.meshes[i], ref.meshes[i])
        if "aed" in wanted:
            model = f"{mesh_name}: lip/eye/brow points after a rigid fit (paper: SMIRK); against {against}"
            res.add("aed", aed, model)
        if "apd" in wanted:
            model = f"{mesh_name}: rotation of a rigid landmark fit (paper: MediaPipe); against {against}"
            res.add("apd", np.abs(ypr).mean(1), model)
            res.details["apd_yaw_pitch_roll"] = ypr
