"""``fhavatar reconstruct``: a preprocessed source frame -> the avatar artifact.

Methods:
    network    the FHAvatar network (sections 3.3-3.4) with weights from ``weights/`` (default) or ``--weights``.
    unproject  no network: each visible texel takes the source colour it projects to, invisible texels the colour
               of their mirrored texel (UV symmetry) or the mean colour of their region. The baseline of the
               training issue, and a useful fallback.
    template   the UV-layout template (no image needed): for checks of the head model and renderer.

``refine_steps`` N > 0 then fits the network's or the unprojected maps to the source view (``pipelines.refine``);
"auto" means ``RefineConfig.auto_steps`` on CUDA and 0 on the CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .avatar.artifact import Avatar
from .avatar.complete import CompleteConfig, complete_maps
from .avatar.head import head_record
from .avatar.maps import ATTRIBUTE_SLICES, REGION_COLORS, template_maps
from .avatar.prune import PruneConfig, prune_avatar
from .errors import ConfigError, InputError
from .head.base import REGIONS, HeadModel, HeadParams
from .refine import RefineConfig, refine_maps, seen_by_source
from .uv.space import UVSpace

METHODS = ("network", "unproject", "template")


@dataclass
class ReconstructConfig:
    method: str = "network"
    uv_size: int = 256  # K
    source_frame: int = 0  # which preprocessed frame is the source (videos)
    # Adam steps of source-view refinement; "auto": refine.auto_steps (50, ~0.8 s) on CUDA, 0 on the CPU (~2 min
    # there). On the H200 50 steps raise the validation split's mean self-reenactment PSNR 19.78 -> 20.10 dB and the
    # frame after the source 25.6 -> 30.2 dB, the back of the head unchanged (bench/RESULTS.md).
    refine_steps: int | str = "auto"
    weights: str | None = None  # checkpoint path; default: the embedded default weights
    prior: str = "builtin"
    refine: RefineConfig = field(default_factory=RefineConfig)  # how refinement fits (losses, step sizes, schedule)
    prune: PruneConfig = field(default_factory=PruneConfig)  # which Gaussians the avatar keeps (avatar/prune.py)
    # What the source never saw: hair-cap and skin fill, hair volume, opacity floor (--complete/--no-complete).
    complete: CompleteConfig = field(default_factory=CompleteConfig)

    def __post_init__(self) -> None:
        if isinstance(self.complete, bool):  # the CLI switch: on/off with CompleteConfig's other defaults
            self.complete = CompleteConfig(enabled=self.complete)
        elif isinstance(self.complete, dict):  # settings read back from a manifest
            self.complete = CompleteConfig(**self.complete)

    def validate(self) -> "ReconstructConfig":
        if self.method not in METHODS:
            raise ConfigError(f"--method '{self.method}' is not one of {', '.join(METHODS)}")
        if self.uv_size < 16 or self.uv_size & (self.uv_size - 1):
            raise ConfigError(f"--uv-size {self.uv_size} must be a power of two >= 16")
        steps = self.refine_steps
        if isinstance(steps, str) and steps.strip().isdigit():
            self.refine_steps = steps = int(steps)
        if steps != "auto" and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 0):
            raise ConfigError(f"--refine-steps '{steps}' is neither a number of steps (>= 0) nor auto")
        if self.method == "template" and steps not in (0, "auto"):
            raise ConfigError("--refine-steps needs an image to fit, and --method template uses none",
                              "use --method network or unproject")
        self.refine.validate()
        self.prune.validate()
        self.complete.validate()
        return self

    def for_device(self, device: str | torch.device) -> "ReconstructConfig":
        """This config with ``refine_steps`` "auto" made a number for ``device``: ``refine.auto_steps`` on CUDA (a
        few seconds there), 0 on the CPU (minutes there) and for the template. Stage settings hold the number."""
        if self.refine_steps != "auto":
            return self
        cuda = torch.device(device).type == "cuda" and self.method != "template"
        return dataclasses.replace(self, refine_steps=self.refine.auto_steps if cuda else 0)


def with_network(cfg: ReconstructConfig, device: str = "cpu", uv_size: int | None = None,
                 head: HeadModel | None = None):
    """``(cfg, net)``: for ``--method network`` the network loaded and checked once, before any item runs, with K
    taken from its checkpoint; ``(cfg, None)`` for the other methods.

    A network only works on the head model it was trained on (its UV layout and geometry): weights recording
    another head than ``head``, or another UV layout of it, are a ``ConfigError`` naming both.

    The checkpoint owns K: a ``uv_size`` the user asked for (None: not asked) that differs is a ``ConfigError``
    here, not a shape error in every item. ``weights='random'`` builds an untrained network of ``cfg.uv_size``.
    Missing, unreadable or mismatched weights raise ``WeightsError`` (exit 3).
    """
    if cfg.method != "network":
        return cfg, None
    from .network.config import NetworkConfig
    from .network.weights import load_network, weights_head
    from .uv.space import uv_layout_digest

    net = load_network(cfg.weights, device, prior=cfg.prior if cfg.prior != "builtin" else None,
                       config=NetworkConfig(uv_size=cfg.uv_size, prior=cfg.prior))
    trained_on = weights_head(cfg.weights)  # after the load: a damaged file is exit 3 first
    if head is not None and trained_on is not None:
        if trained_on["head"] != head.kind:
            raise ConfigError(f"the network weights were trained on the '{trained_on['head']}' head model, not "
                              f"'{head.kind}'", f"use --head-model {trained_on['head']} (or auto), or weights "
                              f"trained on '{head.kind}'")
        digest = uv_layout_digest(head)
        if trained_on.get("head_digest", digest) != digest:
            raise ConfigError(f"the network weights were trained on another version of the '{head.kind}' head model "
                              f"(UV layout {trained_on['head_digest']}, this one {digest})",
                              "use the head model files the weights were trained with, or retrain")
    K = net.config.uv_size
    if uv_size is not None and uv_size != K:
        raise ConfigError(f"--uv-size {uv_size} conflicts with the network weights, which were trained for K = {K}",
                          "omit --uv-size with --method network (the checkpoint sets it)")
    return replace(cfg, uv_size=K), net


@dataclass
class SourceFrame:
    """image (3, H, W) in [0,1] composited on the preprocess background; matte (1, H, W);
    params: HeadParams (batch 1); K (3, 3) normalized; c2w (4, 4)."""

    image: torch.Tensor
    matte: torch.Tensor
    params: HeadParams
    K: torch.Tensor
    c2w: torch.Tensor

    def to(self, device) -> "SourceFrame":
        return SourceFrame(self.image.to(device), self.matte.to(device), self.params.to(device), self.K.to(device),
                           self.c2w.to(device))


def load_source(preprocess_dir: str | Path, frame: int = 0) -> SourceFrame:
    """Read frame ``frame`` of a preprocessed item (frames/, mattes/, tracking.npz)."""
    import imageio.v3 as iio

    from .tracking.result import load_tracking

    d = Path(preprocess_dir)
    tr = load_tracking(d / "tracking.npz")
    if not 0 <= frame < tr.num_frames:
        raise InputError(f"source frame {frame} out of range: '{d}' has {tr.num_frames} frames")
    img_p, mat_p = d / "frames" / f"{frame:06d}.png", d / "mattes" / f"{frame:06d}.png"
    if not img_p.is_file() or not mat_p.is_file():
        raise InputError(f"preprocessed frame {frame} missing in '{d}'", "re-run `fhavatar preprocess`")
    image = torch.from_numpy(iio.imread(img_p)[..., :3].copy()).permute(2, 0, 1).float() / 255.0
    matte = torch.from_numpy(iio.imread(mat_p).copy()).float()[None] / 255.0
    if matte.ndim == 4:
        matte = matte[..., 0]
    one = tr.select(frame)
    return SourceFrame(image, matte, one.head_params(), torch.as_tensor(np.asarray(tr.K), dtype=torch.float32),
                       torch.as_tensor(np.asarray(one.c2w[0]), dtype=torch.float32))


# --------------------------------------------------------------------------------------------------- unprojection
# Rings of invalid texels around the UV islands that take island colours (dilate_maps). On the ICT head 2 reach every
# Gaussian's bilinear footprint at K = 128 and 256 (none darker than a uniform source after, docs/HEAD_MODELS.md);
# 3 as the completion's gutter (CompleteConfig.gutter).
DILATE_TEXELS = 3


def dilate_maps(maps: torch.Tensor, valid: torch.Tensor, iterations: int = DILATE_TEXELS) -> torch.Tensor:
    """maps (B, C, K, K) with the invalid texels near the UV islands filled from them; valid (K, K) bool.

    Gaussians sample the maps bilinearly at UV points (``UVSpace.sample_maps``); vertex and hair-grid samples at an
    island's border have invalid texels in their 2 x 2 footprint, and a map that is zero there (``color * valid``)
    darkens them towards black: dotted seams along the island borders. Each iteration sets the invalid texels next
    to an already-set one (8-neighbourhood) to the mean of those neighbours, one ring of texels per iteration; the
    valid texels and the invalid ones farther than ``iterations`` texels from any island keep their values.
    """
    known = valid.to(maps)[None, None].expand(maps.shape[0], 1, -1, -1)  # (B, 1, K, K)
    out = maps * known
    for _ in range(iterations):
        share = F.avg_pool2d(known, 3, stride=1, padding=1, count_include_pad=False)  # (B, 1, K, K)
        mean = F.avg_pool2d(out, 3, stride=1, padding=1, count_include_pad=False) / share.clamp(min=1e-6)
        grow = (share > 0) & (known == 0)
        out = torch.where(grow, mean, out)
        known = known + grow.to(known)
    return torch.where(known > 0, out, maps)


def unproject_maps(source: SourceFrame, head: HeadModel, uv: UVSpace) -> torch.Tensor:
    """Attribute maps (1, 14, K, K) coloured by unprojecting the source image (the no-network baseline).

    Visible texels (depth test against the texels' own z-buffer, facing the camera, inside the matte) take the image
    colour; the rest take the colour of their mirror texel (u -> 1 - u) when that one is visible, else the mean
    visible colour of their region (default palette colours when a region is unseen). The colours are then dilated
    ``DILATE_TEXELS`` texels into the invalid border around the islands (``dilate_maps``), so that Gaussians sampled
    at island borders read island colours, not the zeros outside.
    """
    device = source.image.device
    seen, grid = seen_by_source(source, head, uv)  # (1, 1, K, K), (1, K, K, 2)
    color = F.grid_sample(source.image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    mirror_seen = uv.flip(seen) & ~seen
    color = torch.where(seen, color, torch.where(mirror_seen, uv.flip(color), torch.zeros_like(color)))
    filled = seen | mirror_seen
    region = uv.region.to(device)
    for name, rid in REGIONS.items():
        m = (region == rid)[None, None] & uv.valid[None, None]
        known = m & filled
        if known.sum() > 16:
            mean = (color * known).sum((2, 3), keepdim=True) / known.sum()
        else:
            mean = torch.tensor(REGION_COLORS.get(name, (0.5, 0.5, 0.5)), device=device).view(1, 3, 1, 1)
        color = torch.where(m & ~filled, mean.expand_as(color), color)
    A = template_maps(uv).to(device)
    A[:, ATTRIBUTE_SLICES["color"]] = dilate_maps(color * uv.valid, uv.valid.to(device))
    return A


# ---------------------------------------------------------------------------------------------------------- driver
def reconstruct(source: SourceFrame, head: HeadModel, uv: UVSpace, cfg: ReconstructConfig,
                net=None, progress: Callable[..., None] | None = None, backend: str = "auto") -> Avatar:
    """Build the avatar of one source frame with ``cfg.method``, then refine it on the source view when
    ``cfg.refine_steps`` asks (``progress`` is called once per refinement step, see ``refine.refine_maps``;
    ``backend``: the renderer refinement uses)."""
    device = source.image.device
    cfg = cfg.for_device(device)
    K = uv.size
    delta_p = torch.zeros(1, 3, K, K, device=device)
    meta: dict = {"method": cfg.method, "config": asdict(cfg)}
    with torch.no_grad():
        if cfg.method == "template":
            maps = template_maps(uv).to(device)
        elif cfg.method == "unproject":
            maps = unproject_maps(source, head, uv)
        else:
            from .network.inference import predict_avatar

            pred = predict_avatar(net, head, uv, source.image[None], source.params, source.c2w[None], source.K[None])
            maps, delta_p = pred.A, pred.delta_p_canonical
            meta["visible_fraction"] = pred.visible_fraction(uv)
        if cfg.method != "template":  # before refinement, which then holds the unseen texels at the completion
            maps, delta_p, meta["complete"] = complete_maps(maps, delta_p, source, head, uv, cfg.complete)
    if cfg.refine_steps:
        # Outside no_grad: refinement differentiates the renders with respect to the maps.
        maps, meta["refine"] = refine_maps(maps, delta_p, source, head, uv, cfg.refine_steps, cfg.refine,
                                           backend=backend, progress=progress)
    params = {k: v.detach().cpu().numpy() for k, v in source.params.to_dict().items() if k != "shape"}
    return prune_avatar(Avatar(
        maps=maps[0].detach().cpu().numpy(),
        delta_p=delta_p[0].detach().cpu().numpy(),
        shape=source.params.shape[0].detach().cpu().numpy(),
        source_params=params,
        source_K=source.K.cpu().numpy(),
        source_c2w=source.c2w.cpu().numpy(),
        head_model=head_record(head),
        meta=meta,
    ), head, uv, cfg.prune, backend)
