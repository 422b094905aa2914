"""The one prediction path: posed source mesh -> position map -> network -> attribute maps + canonical Δp.

Reconstruction (``pipelines.reconstruct``), refinement (``pipelines.refine``, which starts from it), training and
validation (``pipelines.train``) all call :func:`predict_avatar`, so what is trained is what is reconstructed.
The network may run under bf16 autocast; its outputs are returned in fp32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..avatar.binding import AvatarRig, posed_to_canonical_offsets
from ..core.camera import world_to_camera
from ..head.base import HeadModel, HeadParams
from ..uv.space import UVSpace
from .model import FHAvatarNet, NetOutput


def network_inputs(head: HeadModel, uv: UVSpace, params: HeadParams, c2w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Posed source mesh (B, V, 3), its position map p (B, 3, K, K), the valid mask (1, 1, K, K), w2c (B, 4, 4)."""
    verts = head(params)
    return {
        "verts": verts,
        "p": uv.position_map(verts, head.faces),
        "valid": uv.valid[None, None].float(),
        "w2c": world_to_camera(c2w),
    }


def autocast_for(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when enabled, else a no-op context."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class AvatarPrediction:
    """The network's avatar for B sources. out: the raw NetOutput; A, A1 (B, 14, K, K) fp32 (A1 only with aux);
    delta_p (B, 3, K, K) on the posed source mesh (what L_shape / L_shape^tv regularise); delta_p_canonical the same
    offsets carried to the canonical mesh (what the avatar stores); shape (B, S)."""

    out: NetOutput
    A: torch.Tensor
    A1: torch.Tensor | None
    delta_p: torch.Tensor
    delta_p_canonical: torch.Tensor
    shape: torch.Tensor

    def rig(self, head: HeadModel, uv: UVSpace, aux: bool = False) -> AvatarRig:
        maps = self.A1 if aux else self.A
        assert maps is not None, "the auxiliary maps were not computed"
        return AvatarRig(head, uv, maps, self.shape, self.delta_p_canonical)

    def visible_fraction(self, uv: UVSpace) -> float:
        """Share of the valid texels that the source camera sees (M_v), over the batch."""
        valid = uv.valid[None, None].to(self.out.M_v)
        return float((self.out.M_v * valid).sum() / (valid.sum() * self.out.M_v.shape[0]))


def predict_avatar(net: FHAvatarNet, head: HeadModel, uv: UVSpace, image: torch.Tensor, params: HeadParams,
                   c2w: torch.Tensor, K: torch.Tensor, with_aux: bool = False, amp: bool = False) -> AvatarPrediction:
    """Run the network on B sources: image (B, 3, H, W), params (B, ...), c2w (B, 4, 4), K (B, 3, 3) normalized."""
    inp = network_inputs(head, uv, params, c2w)
    with autocast_for(image.device, amp):
        out = net(image, inp["p"], inp["valid"], inp["w2c"], K, with_aux=with_aux)
    A = out.A.float()
    A1 = out.A1.float() if out.A1 is not None else None
    delta_p = out.delta_p.float()
    canonical = head.canonical(params.shape)
    dpc = posed_to_canonical_offsets(uv, delta_p, inp["verts"], canonical, head.faces)
    return AvatarPrediction(out, A, A1, delta_p, dpc, params.shape)
