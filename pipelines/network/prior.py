"""Global full-head prior (section 3.3, "Full-Head Feature Generation"): image -> tri-plane T -> features at 3D points.

A prior has two steps, so that the tri-plane is built once per source image and sampled twice (at the FLAME
position map p for the refinement UNet, then at the refined map p_r for F_g):

    state = prior.encode(image, w2c, K_norm)      # PriorState: tri-plane(s) of this image
    F_T_p = prior.sample(state, p, valid)          # (B, C_g, K, K)
    F_g   = prior.sample(state, p_r, valid)

Two priors:

* ``BuiltinPrior`` (default): trainable, needs no external weights. A learned canonical-head tri-plane (a learned
  full-head appearance prior) is modulated (FiLM) by a global code of the source image and corrected by a residual
  tri-plane decoded from that code, so any 3D point - front or back of the head - gets a feature.
* ``PanoHeadPrior``: the paper's frozen PanoHead + feed-forward inversion, supplied by the user as one exported
  module (torch.export .pt2 or TorchScript). Only the tri-grid sampling is implemented here; the class docstring
  gives the file contract.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import WeightsError
from .blocks import ConvNormAct, ResBlock
from .config import NetworkConfig

# Grid axes (W, H, depth) of PanoHead's three planes, from its ``generate_planes`` (XY, XZ, YZ):
# plane k samples at coords @ inv(axes_k), i.e. (x, y | z), (x, z | y), (y, z | x).
PLANE_AXES: tuple[tuple[int, int, int], ...] = ((0, 1, 2), (0, 2, 1), (1, 2, 0))

PANOHEAD_ENV = "FHAVATAR_PANOHEAD"
PANOHEAD_DIR = Path(__file__).resolve().parents[2] / "weights" / "panohead"
PANOHEAD_SUFFIXES = (".pt2", ".ts", ".pt", ".pth", ".jit")


@dataclass
class PriorState:
    """What ``encode`` computed for a batch of source images.

    planes: (B, 3, C, D, R, R) tri-plane (D = 1) or tri-grid (D > 1) features; extras: prior-specific tensors.
    """

    planes: torch.Tensor
    extras: dict = field(default_factory=dict)


def sample_triplane(planes: torch.Tensor, coords: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Bilinearly sample a tri-plane / tri-grid at normalized 3D coordinates.

    Args:
        planes: (B, 3, C, D, R, R); plane k is indexed by the coordinate axes ``PLANE_AXES[k]`` = (W, H, depth).
        coords: (B, 3, H', W') points in [-1, 1]^3 (``align_corners=False``: -1/1 are the outer texel edges).
        reduce: "mean" over planes (EG3D / PanoHead decoders) or "concat".

    Returns:
        (B, C, H', W') for "mean", (B, 3C, H', W') for "concat". Points outside the cube read zeros.
    """
    B, P, C, D, R, _ = planes.shape
    feats = []
    for k, axes in enumerate(PLANE_AXES):
        if D == 1:
            grid = torch.stack([coords[:, axes[0]], coords[:, axes[1]]], dim=-1)  # (B, H', W', 2)
            f = F.grid_sample(planes[:, k, :, 0], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        else:
            grid = torch.stack([coords[:, a] for a in axes], dim=-1)[:, None]  # (B, 1, H', W', 3)
            f = F.grid_sample(planes[:, k], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, :, 0]
        feats.append(f)
    if reduce == "mean":
        return torch.stack(feats, 0).mean(0)
    if reduce == "concat":
        return torch.cat(feats, 1)
    raise ValueError(f"unknown reduce {reduce!r}")


class GlobalPrior(nn.Module):
    """Interface of a global full-head prior. Subclasses implement ``encode``; ``sample`` is shared.

    World points are mapped to the tri-plane cube by ``(x - center) * units_per_metre * 2 / box_warp``.
    """

    out_channels: int

    def __init__(self, center: tuple[float, float, float], units_per_metre: float, box_warp: float) -> None:
        super().__init__()
        self.register_buffer("center", torch.tensor(center, dtype=torch.float32), persistent=False)
        self.coord_scale = 2.0 * units_per_metre / box_warp

    def encode(self, image: torch.Tensor, w2c: torch.Tensor, K_norm: torch.Tensor) -> PriorState:
        """image (B, 3, H, W) in [0, 1], w2c (B, 4, 4), K_norm (B, 3, 3) -> PriorState."""
        raise NotImplementedError

    def normalize_points(self, points: torch.Tensor) -> torch.Tensor:
        """(B, 3, K, K) world points -> tri-plane cube coordinates in [-1, 1]."""
        return (points - self.center.to(points)[None, :, None, None]) * self.coord_scale

    def sample(self, state: PriorState, points: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Features (B, C_g, K, K) at world points (B, 3, K, K); zero where ``valid`` (B, 1, K, K) is 0."""
        f = sample_triplane(state.planes, self.normalize_points(points))
        return f if valid is None else f * valid.to(f.dtype)


class BuiltinPrior(GlobalPrior):
    """Trainable full-head prior without a GAN (the default; see the module docstring).

    T = T_canonical * (1 + gamma(z)) + beta(z) + Decoder(z), with z = Encoder(image, camera) a global code.
    The FiLM layer starts at the identity so a fresh prior returns the learned canonical head.
    """

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__(cfg.head_center, 1.0, 2.0 * cfg.head_extent)
        C, R, Z = cfg.prior_channels, cfg.prior_triplane_res, cfg.prior_code_dim
        self.out_channels = C
        self.image_size = cfg.prior_image_size
        self.canonical = nn.Parameter(0.1 * torch.randn(1, 3, C, R, R))

        w = (32, 64, 128, 128)
        self.encoder = nn.Sequential(
            ConvNormAct(3, w[0], 2), ResBlock(w[0]),
            ConvNormAct(w[0], w[1], 2), ResBlock(w[1]),
            ConvNormAct(w[1], w[2], 2),
            ConvNormAct(w[2], w[3], 2),
            nn.AdaptiveAvgPool2d(4),
        )
        # The camera (w2c rows 0-2) lets the code be inferred in a canonical frame whatever the source view.
        self.to_code = nn.Sequential(nn.Linear(w[3] * 16 + 12, Z), nn.SiLU(), nn.Linear(Z, Z), nn.SiLU())
        self.film = nn.Linear(Z, 2 * 3 * C)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

        # Residual tri-plane decoder: code -> 3 planes at 4 x 4 -> ... -> R x R; groups=3 keeps planes separate.
        C0 = 3 * 2 * C
        self.seed = nn.Linear(Z, C0 * 16)
        ups = []
        for _ in range(int(math.log2(R // 4))):
            ups += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(C0, C0, 3, padding=1, groups=3),
                    nn.GroupNorm(3, C0), nn.SiLU()]
        self.decoder = nn.Sequential(*ups, nn.Conv2d(C0, 3 * C, 3, padding=1, groups=3))
        self.C, self.R = C, R

    def encode(self, image: torch.Tensor, w2c: torch.Tensor, K_norm: torch.Tensor) -> PriorState:
        B = image.shape[0]
        x = F.interpolate(image, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                          align_corners=False)
        h = self.encoder(x * 2.0 - 1.0).flatten(1)
        z = self.to_code(torch.cat([h, w2c[:, :3, :4].reshape(B, 12).to(h)], dim=1))
        gamma, beta = self.film(z).view(B, 2, 3, self.C, 1, 1).unbind(1)
        residual = self.decoder(self.seed(z).view(B, -1, 4, 4)).view(B, 3, self.C, self.R, self.R)
        planes = self.canonical * (1.0 + gamma) + beta + residual
        return PriorState(planes=planes[:, :, :, None], extras={"code": z})


def resolve_panohead_checkpoint(path: str | os.PathLike | None = None) -> Path:
    """Find the user-supplied PanoHead inversion export: ``path``, else $FHAVATAR_PANOHEAD, else weights/panohead/.

    A directory is searched for one file ending in .pt2 / .ts / .pt / .pth / .jit. Raises WeightsError when none is
    found.
    """
    source = "argument"
    if path is None and os.environ.get(PANOHEAD_ENV):
        path, source = os.environ[PANOHEAD_ENV], f"${PANOHEAD_ENV}"
    fix = (f"the paper's global prior needs the PanoHead generator and its feed-forward inversion (user-supplied, "
           f"not downloadable here) exported as one torch.export (.pt2) or TorchScript file (contract: "
           f"pipelines/network/prior.py, PanoHeadPrior); put it in {PANOHEAD_DIR}/ or set "
           f"{PANOHEAD_ENV}=/path/to/file - or use --prior builtin, which works without any external weights")
    if path is None:
        search, source = PANOHEAD_DIR, "default folder"
    else:
        search = Path(path).expanduser()
        if not search.exists():
            raise WeightsError(f"PanoHead checkpoint {str(search)!r} (from {source}) does not exist", fix)
    if search.is_file():
        return search
    found = sorted(p for p in search.glob("*") if p.suffix in PANOHEAD_SUFFIXES) if search.is_dir() else []
    if not found:
        raise WeightsError(f"no PanoHead/inversion checkpoint found in {str(search)!r} ({source})", fix)
    if len(found) > 1:
        raise WeightsError(f"several PanoHead checkpoints in {str(search)!r}: {[p.name for p in found]}",
                           f"keep one, or point {PANOHEAD_ENV} at the file to use")
    return found[0]


def eg3d_camera_label(w2c: torch.Tensor, K_norm: torch.Tensor, center: torch.Tensor, units_per_metre: float) -> torch.Tensor:
    """EG3D / PanoHead camera label (B, 25): flattened camera-to-world in PanoHead units, then normalized K."""
    c2w = torch.linalg.inv(w2c)
    c2w[:, :3, 3] = (c2w[:, :3, 3] - center) * units_per_metre
    return torch.cat([c2w.reshape(-1, 16), K_norm.reshape(-1, 9)], dim=1)


def load_exported_module(path: Path) -> nn.Module:
    """Load a user export: ``torch.export.save`` (.pt2) or TorchScript (``torch.jit.save``, any other suffix)."""
    try:
        if path.suffix == ".pt2":
            return torch.export.load(str(path)).module()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still a valid user format
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any load failure is a bad user file
        raise WeightsError(f"PanoHead checkpoint {str(path)!r} is not a torch.export / TorchScript export "
                           f"({type(e).__name__})",
                           "export PanoHead + inversion with torch.export.save (.pt2) or torch.jit.save") from e


class PanoHeadPrior(GlobalPrior):
    """The paper's frozen prior: PanoHead [1] + its feed-forward inversion [2], supplied by the user.

    File contract (``torch.export.save`` as .pt2, or TorchScript ``torch.jit.save`` with another suffix):
    ``forward(image, camera) -> planes`` with
    image (B, 3, 512, 512) in [-1, 1], camera (B, 25) the EG3D label from ``eg3d_camera_label`` and planes
    (B, 3, C * D, R, R), laid out as PanoHead's generator returns them (C = ``panohead_channels``,
    D = ``panohead_depth``). World points are mapped to PanoHead units by ``panohead_units_per_metre`` around
    ``head_center`` and sampled with PanoHead's plane axes and ``box_warp``.

    The inversion is frozen and kept outside this module's parameters / state_dict (it is not ours to save).
    """

    def __init__(self, cfg: NetworkConfig, checkpoint: str | os.PathLike | None = None) -> None:
        super().__init__(cfg.head_center, cfg.panohead_units_per_metre, cfg.panohead_box_warp)
        path = resolve_panohead_checkpoint(checkpoint if checkpoint is not None else cfg.panohead_checkpoint)
        inverter = load_exported_module(path)
        if isinstance(inverter, torch.jit.ScriptModule):
            inverter.eval()  # an exported program's mode is fixed at export time
        for prm in inverter.parameters():
            prm.requires_grad_(False)
        self._inverter = (inverter,)  # a tuple hides it from nn.Module registration
        self.path = path
        self.out_channels = cfg.panohead_channels
        self.depth = cfg.panohead_depth
        self.units_per_metre = cfg.panohead_units_per_metre
        self.input_size = 512

    @torch.no_grad()
    def encode(self, image: torch.Tensor, w2c: torch.Tensor, K_norm: torch.Tensor) -> PriorState:
        inverter = self._inverter[0].to(image.device)
        x = F.interpolate(image, size=(self.input_size, self.input_size), mode="bilinear", antialias=True,
                          align_corners=False)
        label = eg3d_camera_label(w2c.float(), K_norm.float(), self.center, self.units_per_metre)
        planes = inverter(x * 2.0 - 1.0, label)
        B = image.shape[0]
        C, D = self.out_channels, self.depth
        if planes.dim() != 5 or planes.shape[:3] != (B, 3, C * D) or planes.shape[-1] != planes.shape[-2]:
            raise WeightsError(f"PanoHead checkpoint {str(self.path)!r} returned planes {tuple(planes.shape)}",
                               f"expected (B, 3, {C}*{D}, R, R); set panohead_channels / panohead_depth to match")
        R = planes.shape[-1]
        return PriorState(planes=planes.view(B, 3, C, D, R, R).to(image.dtype))


def build_prior(cfg: NetworkConfig) -> GlobalPrior:
    """The prior named by ``cfg.prior``."""
    if cfg.prior == "panohead":
        return PanoHeadPrior(cfg)
    return BuiltinPrior(cfg)
