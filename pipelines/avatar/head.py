"""The one home of the avatar <-> head-model binding.

An avatar records which head model made it (``head_record``: the registry kind, the model's name and its UV-layout
digest); ``head_for_avatar`` loads that head model again and refuses a different one; ``build_rig`` binds the avatar's
Gaussians to it. Reconstruct writes the record, reenact / turntable / evaluate read it through these functions only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError
from ..head.base import HeadModel
from ..uv.space import UVConfig, load_or_build_uv_space, uv_layout_digest
from .artifact import Avatar
from .binding import AvatarRig
from .skinning import SkinningConfig


def head_record(head: HeadModel) -> dict[str, str]:
    """What an avatar stores about its head model: kind (registry name), name, digest (UV layout + template)."""
    return {"kind": head.kind, "name": head.name, "digest": uv_layout_digest(head)}


def weights_head_record(head: HeadModel) -> dict[str, str]:
    """What network weights store about the head they were trained on (their metadata's ``extra``): its kind, which
    ``--head-model auto`` follows, and its UV-layout digest, which reconstruct checks."""
    return {"head": head.kind, "head_digest": uv_layout_digest(head)}


def avatar_head_kind(avatar: Avatar | str | Path) -> str:
    """The registry kind of the head model the avatar (or avatar file) was made with."""
    if not isinstance(avatar, Avatar):
        from .artifact import load_avatar

        avatar = load_avatar(avatar)
    return avatar.head_model.get("kind", "embedded")


def head_for_avatar(avatar: Avatar, device="cpu", avatar_name: str = "avatar") -> HeadModel:
    """Load the head model the avatar was made with and check it is the same one (by digest)."""
    from ..head.registry import load_head_model

    kind = avatar_head_kind(avatar)
    head = load_head_model(kind, device=device)
    want = avatar.head_model.get("digest")
    if want and uv_layout_digest(head) != want:
        raise InputError(
            f"avatar '{avatar_name}' was made with a different {kind} head model (digest {want}, "
            f"found {uv_layout_digest(head)})",
            "use the same head model files (FHAVATAR_FLAME) as when it was reconstructed, or reconstruct again",
        )
    return head


def build_rig(avatar: Avatar, head: HeadModel, device="cpu", skinning: SkinningConfig | None = None) -> AvatarRig:
    """The avatar's Gaussians bound to ``head`` (its UV space at the avatar's K, shape and shape offsets), only those
    its pruning mask keeps, posed with ``skinning`` from the source pose its maps were predicted for."""
    from .prune import select_samples

    uv = select_samples(load_or_build_uv_space(head, UVConfig(size=avatar.uv_size), device=device), avatar.keep)
    shape = torch.as_tensor(avatar.shape, dtype=torch.float32, device=device)
    source = avatar.source_head_params(device) if avatar.source_params else None
    return AvatarRig(head, uv, avatar.maps_tensor(device), shape, avatar.delta_p_tensor(device), source, skinning)
