"""Pruning at reconstruct time: drop the Gaussians of an avatar that never change a pixel.

Every frame poses, projects, sorts and composites all of an avatar's Gaussians, also those that cannot be seen: too
transparent to be drawn at all, or always behind an opaque surface (the inside of the mouth socket behind closed
lips, the back of the eyeballs, samples that overlap others on the same surface). They are found once, when the
avatar is made, and the avatar file keeps a mask of the Gaussians that are kept (``Avatar.keep``); the UV maps stay
whole, so the same avatar can be pruned differently later.

Two tests, both cheap against a render:

* **opacity** below ``min_opacity``: gsplat (and the reference renderer) skip a Gaussian whose alpha is below 1/255
  at every pixel, and alpha never exceeds the opacity, so at the default 1/255 this drops exactly nothing visible;
* **contribution** below ``min_contribution``: the Gaussian is rendered in a set of views (orbit cameras around the
  head) and poses (the source expression, the jaw open, the eyes turned), and its score is the largest, over these
  views, of ``sum over pixels of w_i`` (``w_i = T_i alpha_i``), scaled to pixels of a 512² image. Removing Gaussian
  i changes a pixel by ``w_i (c_i - C_behind)``, at most ``w_i``: a Gaussian below the threshold changes no view by
  more than that many pixels' worth of full-range colour (summed over the image). This also covers footprints too
  small to matter (their weights are small) and occlusion (their transmittance is ~0).

``max_gaussians`` then keeps at most that many, by the same score (by opacity when no views are rendered).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..core.camera import DEFAULT_RADIUS, normalized_intrinsics, orbit_cameras, to_pixel_intrinsics, world_to_camera
from ..errors import ConfigError, InputError
from ..head.base import HeadModel, HeadParams
from ..uv.space import UVSpace
from .artifact import Avatar
from .binding import AvatarRig

SCORE_SIZE = 512  # scores are stated in pixels of a SCORE_SIZE x SCORE_SIZE image, whatever size they are rendered


@dataclass
class PruneConfig:
    """Which Gaussians an avatar keeps (see the module docstring); 0 switches a test off."""

    min_opacity: float = 1.0 / 255.0  # below: never drawn (the renderers skip alpha < 1/255): lossless
    # Largest per-view sum of w_i over the views, in pixels at 512²; 0 = off. Measured on lp_d0 (ICT, unproject,
    # K = 256): 1.0 drops 31% of the Gaussians (the 28% never drawn in any view among them), the render moves by
    # 52.7 dB PSNR, its PSNR against the frames by 0.000 dB. Off by default until the GPU run confirms it on the
    # validation split: on the CPU the 144 scoring renders take minutes.
    min_contribution: float = 0.0
    max_gaussians: int = 0  # keep at most this many, by contribution (or opacity); 0 = no cap
    views: int = 8  # yaw steps of the scoring cameras over 360 degrees
    pitches: tuple[float, ...] = (-25.0, 0.0, 25.0)  # degrees; each with every yaw
    jaw_open: float = 0.35  # radians: a pose with the mouth open (its inside seen)
    gaze: float = 0.35  # radians: poses with the eyes turned left, right, up and down (0: none)
    # Pixels of the scoring renders (scores scaled to 512²; the 0.3 px dilation makes coarse renders over-estimate
    # small footprints rather than miss them).
    size: int = 128

    def __post_init__(self) -> None:
        self.pitches = tuple(float(p) for p in self.pitches)  # type: ignore[assignment]

    def validate(self) -> "PruneConfig":
        if not 0.0 <= self.min_opacity < 1.0:
            raise ConfigError(f"--prune-opacity {self.min_opacity} must be in [0, 1)")
        if self.min_contribution < 0 or self.max_gaussians < 0:
            raise ConfigError(f"--prune-contribution {self.min_contribution} and --max-gaussians "
                              f"{self.max_gaussians} must be >= 0")
        if self.scored and (self.views < 1 or not self.pitches or self.size < 16):
            raise ConfigError(f"pruning by contribution needs views >= 1, pitches and size >= 16 (got {self.views}, "
                              f"{self.pitches}, {self.size})")
        return self

    @property
    def scored(self) -> bool:
        """Whether views are rendered (a contribution threshold, or a cap ranked by contribution)."""
        return self.min_contribution > 0 or self.max_gaussians > 0


def scoring_poses(head: HeadModel, expression: torch.Tensor, cfg: PruneConfig) -> HeadParams:
    """The poses Gaussians are scored in (P frames): the avatar's expression (1, E) facing the cameras, the jaw open,
    and the eyes turned four ways. Rotation and translation are zero so that the orbit cameras frame the head."""
    rows = [(0.0, 0.0, 0.0)]
    if cfg.jaw_open:
        rows.append((cfg.jaw_open, 0.0, 0.0))
    if cfg.gaze:
        rows += [(0.0, g, 0.0) for g in (cfg.gaze, -cfg.gaze)] + [(0.0, 0.0, g) for g in (cfg.gaze, -cfg.gaze)]
    P = len(rows)
    p = head.zero_params(P)
    p.expression = expression.reshape(1, -1).expand(P, -1).to(p.expression)
    r = torch.tensor(rows, dtype=p.jaw.dtype, device=p.jaw.device)
    p.jaw[:, 0] = r[:, 0]
    for eye in (0, 3):  # both eyes: pitch about x, yaw about y
        p.eyes[:, eye] = r[:, 2]
        p.eyes[:, eye + 1] = r[:, 1]
    return p


def contribution_scores(rig: AvatarRig, expression: torch.Tensor, cfg: PruneConfig, backend: str = "auto",
                        chunk: int = 8) -> torch.Tensor:
    """(G,) each Gaussian's largest per-view ``sum of w_i`` over the scoring views and poses, in pixels at 512²."""
    from ..render import render_contributions

    head = rig.head
    device = rig.color.device
    poses = scoring_poses(head, expression.to(device), cfg)
    yaw = torch.arange(cfg.views, dtype=torch.float32) * (360.0 / cfg.views)
    pitch = torch.tensor(cfg.pitches, dtype=torch.float32)
    yaw, pitch = (t.reshape(-1) for t in torch.meshgrid(yaw, pitch, indexing="ij"))
    target = tuple(float(x) for x in head.head_center().tolist())
    c2w = orbit_cameras(yaw, pitch, radius=DEFAULT_RADIUS, target=target).to(device)
    viewmats = world_to_camera(c2w)
    Ks = to_pixel_intrinsics(normalized_intrinsics(batch=len(yaw)).to(device), cfg.size, cfg.size)
    best = torch.zeros(rig.num_gaussians, device=device)
    with torch.no_grad():
        for i in range(poses.batch):
            g = rig.pose_params(HeadParams(**{k: v[i:i + 1] for k, v in poses.to_dict().items()}))
            for s in range(0, len(yaw), chunk):
                n = min(chunk, len(yaw) - s)
                args = [t.expand(n, *t.shape[1:]) for t in (g.means, g.quats, g.scales, g.opacities)]
                w = render_contributions(*args, viewmats[s:s + n], Ks[s:s + n], cfg.size, cfg.size, backend=backend)
                best = torch.maximum(best, w.amax(0))
    return best * (SCORE_SIZE / cfg.size) ** 2


def prune_mask(rig: AvatarRig, expression: torch.Tensor, cfg: PruneConfig,
               backend: str = "auto") -> tuple[torch.Tensor, dict]:
    """(G,) bool: the Gaussians of ``rig`` (one avatar) that ``cfg`` keeps, and what was done (for the manifest)."""
    cfg.validate()
    opacity = rig.opacity[0].detach()
    keep = opacity >= cfg.min_opacity
    info: dict = {"config": dataclasses.asdict(cfg), "before": rig.num_gaussians,
                  "below_opacity": int((~keep).sum())}
    score = opacity
    if cfg.scored:
        score = contribution_scores(rig, expression, cfg, backend)
        low = score < cfg.min_contribution
        info["below_contribution"] = int((low & keep).sum())
        info["score_quantiles"] = [float(q) for q in torch.quantile(
            score.double().cpu(), torch.tensor([0.01, 0.1, 0.5, 0.9], dtype=torch.float64))]
        keep &= ~low
    if cfg.max_gaussians and int(keep.sum()) > cfg.max_gaussians:
        ranked = torch.where(keep, score, torch.full_like(score, -math.inf))
        top = torch.topk(ranked, cfg.max_gaussians).indices
        info["over_budget"] = int(keep.sum()) - cfg.max_gaussians
        keep = torch.zeros_like(keep).index_fill_(0, top, True)
    info["kept"] = int(keep.sum())
    return keep, info


def select_samples(uv: UVSpace, keep: torch.Tensor | None) -> UVSpace:
    """The UV space with only the kept Gaussian samples (``keep`` (G,) bool over ``uv``'s samples; None: all).

    A rig built on it has only those Gaussians; the K x K texel lookup (maps, position maps) is untouched.
    """
    if keep is None:
        return uv
    keep = torch.as_tensor(keep, dtype=torch.bool, device=uv.sample_uv.device)
    if keep.shape != (uv.num_samples,):
        raise InputError(f"the avatar's pruning mask has {tuple(keep.shape)} entries, its UV space "
                         f"{uv.num_samples} Gaussians", "re-create the avatar with `fhavatar reconstruct`")
    return dataclasses.replace(uv, sample_uv=uv.sample_uv[keep], sample_face=uv.sample_face[keep],
                               sample_bary=uv.sample_bary[keep], sample_spacing=uv.sample_spacing[keep])


def prune_avatar(avatar: Avatar, head: HeadModel, uv: UVSpace, cfg: PruneConfig, backend: str = "auto") -> Avatar:
    """``avatar`` with its pruning mask (``keep``; None when every Gaussian stays) and ``meta["prune"]`` set.

    ``uv`` is the avatar's whole UV space (on the device to score on).
    """
    device = uv.sample_uv.device
    shape = torch.as_tensor(avatar.shape, dtype=torch.float32, device=device)
    with torch.no_grad():
        rig = AvatarRig(head, uv, avatar.maps_tensor(device), shape, avatar.delta_p_tensor(device))
    expression = torch.as_tensor(avatar.source_params["expression"], dtype=torch.float32, device=device)
    keep, info = prune_mask(rig, expression, cfg, backend)
    keep = keep.cpu().numpy()
    return dataclasses.replace(avatar, keep=None if keep.all() else keep, meta={**avatar.meta, "prune": info})
