"""``fhavatar reconstruct``: a preprocessed source frame -> the avatar artifact.

Methods:
    network    the FHAvatar network (sections 3.3-3.4) with weights from ``weights/`` (default) or ``--weights``;
               optional ``--refine-steps N`` fine-tunes the predicted maps on the source view.
    unproject  no network: each visible texel takes the source colour it projects to, invisible texels the colour
               of their mirrored texel (UV symmetry) or the mean colour of their region. The baseline of the
               training issue, and a useful fallback.
    template   the UV-layout template (no image needed): for checks of the head model and renderer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .avatar.artifact import Avatar
from .avatar.maps import ATTRIBUTE_SLICES, REGION_COLORS, template_maps
from .core.camera import world_to_camera
from .errors import ConfigError, InputError
from .head.base import REGIONS, HeadModel, HeadParams
from .uv.space import UVSpace, uv_layout_digest

METHODS = ("network", "unproject", "template")


@dataclass
class ReconstructConfig:
    method: str = "network"
    uv_size: int = 256  # K
    source_frame: int = 0  # which preprocessed frame is the source (videos)
    refine_steps: int = 0
    refine_lr: float = 1e-2
    weights: str | None = None  # checkpoint path; default: the embedded default weights
    prior: str = "builtin"

    def validate(self) -> "ReconstructConfig":
        if self.method not in METHODS:
            raise ConfigError(f"--method '{self.method}' is not one of {', '.join(METHODS)}")
        if self.uv_size < 16 or self.uv_size & (self.uv_size - 1):
            raise ConfigError(f"--uv-size {self.uv_size} must be a power of two >= 16")
        return self


def with_network(cfg: ReconstructConfig, device: str = "cpu", uv_size: int | None = None):
    """``(cfg, net)``: for ``--method network`` the network loaded and checked once, before any item runs, with K
    taken from its checkpoint; ``(cfg, None)`` for the other methods.

    The checkpoint owns K: a ``uv_size`` the user asked for (None: not asked) that differs is a ``ConfigError``
    here, not a shape error in every item. ``weights='random'`` builds an untrained network of ``cfg.uv_size``.
    Missing, unreadable or mismatched weights raise ``WeightsError`` (exit 3).
    """
    if cfg.method != "network":
        return cfg, None
    from .network.config import NetworkConfig
    from .network.weights import load_network

    net = load_network(cfg.weights, device, prior=cfg.prior if cfg.prior != "builtin" else None,
                       config=NetworkConfig(uv_size=cfg.uv_size, prior=cfg.prior))
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
def unproject_maps(source: SourceFrame, head: HeadModel, uv: UVSpace) -> torch.Tensor:
    """Attribute maps (1, 14, K, K) coloured by unprojecting the source image (the no-network baseline).

    Visible texels (depth test against the texels' own z-buffer, facing the camera, inside the matte) take the image
    colour; the rest take the colour of their mirror texel (u -> 1 - u) when that one is visible, else the mean
    visible colour of their region (default palette colours when a region is unseen).
    """
    from .network.local import project_position_map, visibility_mask

    device = source.image.device
    verts = head(source.params)  # posed, world
    p = uv.position_map(verts, head.faces)  # (1, 3, K, K)
    valid = uv.valid[None, None].float()
    w2c = world_to_camera(source.c2w[None])
    H = source.image.shape[-1]
    vis = visibility_mask(p, valid, w2c, source.K[None], H)  # (1, 1, K, K)
    proj, _ = project_position_map(p, w2c, source.K[None])  # (1, K, K, 2) in [0,1]? (normalized image coords)
    grid = proj * 2 - 1
    color = F.grid_sample(source.image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    alpha = F.grid_sample(source.matte[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    seen = (vis > 0.5) & (alpha > 0.5)
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
    A[:, ATTRIBUTE_SLICES["color"]] = color * uv.valid
    return A


# ---------------------------------------------------------------------------------------------------------- driver
def reconstruct(source: SourceFrame, head: HeadModel, uv: UVSpace, cfg: ReconstructConfig,
                head_kind: str, net=None, backend: str = "auto") -> Avatar:
    """Build the avatar of one source frame with ``cfg.method`` (``backend``: the renderer of ``refine_steps``)."""
    K = uv.size
    delta_p = torch.zeros(1, 3, K, K)
    meta: dict = {"method": cfg.method, "config": asdict(cfg)}
    with torch.no_grad():
        if cfg.method == "template":
            maps = template_maps(uv)
        elif cfg.method == "unproject":
            maps = unproject_maps(source, head, uv)
        else:
            from .network.inference import predict_maps

            maps, delta_p, info = predict_maps(net, source, head, uv, refine_steps=cfg.refine_steps,
                                               refine_lr=cfg.refine_lr, backend=backend)
            meta.update(info)
    params = {k: v.detach().cpu().numpy() for k, v in source.params.to_dict().items() if k != "shape"}
    return Avatar(
        maps=maps[0].detach().cpu().numpy(),
        delta_p=delta_p[0].detach().cpu().numpy(),
        shape=source.params.shape[0].detach().cpu().numpy(),
        source_params=params,
        source_K=source.K.cpu().numpy(),
        source_c2w=source.c2w.cpu().numpy(),
        head_model={"kind": head_kind, "name": head.name, "digest": uv_layout_digest(head)},
        meta=meta,
    )
