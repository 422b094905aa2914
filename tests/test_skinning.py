"""Posing Gaussians that the shape offsets moved away from their triangle (pipelines/avatar/skinning.py)."""

from __future__ import annotations

import pytest
import torch

from pipelines.avatar.binding import AvatarRig
from pipelines.avatar.maps import template_maps
from pipelines.avatar.skinning import SkinningConfig
from pipelines.errors import ConfigError
from pipelines.head.ict import IctHeadModel
from pipelines.uv.space import UVConfig, build_uv_space

DROP = torch.tensor([0.0, -0.12, 0.02])  # the "collar" texels' offset: 12 cm below their neck triangle


@pytest.fixture(scope="module")
def scene():
    """The ICT head at K = 64 with the head-weighted neck texels moved down to the chest by their shape offset, as
    the network does when neck texels paint a collar; the source frame is a turned and shifted head."""
    head = IctHeadModel()
    uv = build_uv_space(head, UVConfig(size=64))
    W = head.lbs_weights
    w_texel = (W[head.faces[uv.face_index.clamp(min=0)]] * uv.bary[..., None]).sum(-2)  # (K, K, J)
    collar = uv.valid & uv.region_mask("neck") & (w_texel[..., 0] < 0.02)
    delta_p = torch.zeros(1, 3, 64, 64)
    delta_p[0, :, collar] = DROP[:, None]
    source = head.zero_params(1)
    source.rotation[0] = torch.tensor([0.05, 0.3, 0.0])
    source.translation[0] = torch.tensor([0.01, 0.02, 0.05])
    return head, uv, delta_p, source, collar


def rig(scene, **skinning) -> AvatarRig:
    head, uv, delta_p, source, _ = scene
    return AvatarRig(head, uv, template_maps(uv), torch.zeros(1, head.n_shape), delta_p, source,
                     SkinningConfig(**skinning))


def frame_params(scene, yaw: float = 0.0, shift=(0.0, 0.0, 0.0)):
    p = scene[3].index(slice(0, 1))
    p.rotation = p.rotation + torch.tensor([[0.0, yaw, 0.0]])
    p.translation = p.translation + torch.tensor([shift])
    return p


def _texel_of(uv, texels):
    K = texels.shape[0]
    x = (uv.sample_uv[:, 0] * K).long().clamp(0, K - 1)
    y = ((1 - uv.sample_uv[:, 1]) * K).long().clamp(0, K - 1)
    return texels[y, x]


def test_the_source_pose_renders_as_the_triangles_put_it(scene):
    """Exact at the source pose, the render the network was trained to match."""
    plain, ours = rig(scene, by_position=False, torso_follow=1.0), rig(scene)
    assert len(ours.position_skinning) > 50  # the collar Gaussians, at least
    a, b = plain.pose_params(scene[3]), ours.pose_params(scene[3])
    torch.testing.assert_close(b.means, a.means, atol=2e-6, rtol=0)
    torch.testing.assert_close(b.quats.abs(), a.quats.abs(), atol=1e-4, rtol=0)


def test_collar_gaussians_stay_with_the_chest_when_the_head_turns(scene):
    """Riding its neck triangle, a Gaussian the offsets put on the chest swings round with a 30° head turn; skinned by
    its position it stays with the chest. Face Gaussians move the same either way."""
    collar = _texel_of(scene[1], scene[4])
    # Face texels away from the collar (the offsets are sampled bilinearly, so the collar's neighbours move too).
    near_collar = torch.nn.functional.max_pool2d(scene[4][None, None].float(), 3, 1, 1)[0, 0] > 0
    face = _texel_of(scene[1], scene[1].region_mask("face") & ~near_collar)
    assert collar.sum() > 50
    plain, ours = rig(scene, by_position=False, torso_follow=1.0), rig(scene, torso_follow=1.0)
    src, turned = scene[3], frame_params(scene, yaw=0.5)
    move = lambda r: (r.pose_params(turned).means - r.pose_params(src).means)[0].norm(dim=-1)  # noqa: E731
    m_plain, m_ours = move(plain), move(ours)
    assert m_plain[collar].median() > 0.015  # centimetres, with the head
    # With the chest: what is left is the neck's share of the few texels whose nearest vertex is still head-weighted.
    assert m_ours[collar].median() < min(0.01, 0.3 * m_plain[collar].median().item())
    torch.testing.assert_close(m_ours[face], m_plain[face], atol=1e-5, rtol=0)
    assert m_plain[face].median() > 0.03


def test_the_chest_holds_the_source_translation_and_the_face_follows_the_tracking(scene):
    head = scene[0]
    chest = head.lbs_weights[:, 0] > 0.999
    face = head.lbs_weights[:, 0] < 1e-3
    src, moved = scene[3], frame_params(scene, shift=(0.03, 0.0, 0.0))
    for follow, chest_move in ((0.0, 0.0), (0.5, 0.015), (1.0, 0.03)):
        r = rig(scene, torso_follow=follow)
        d = (r.posed_vertices(moved) - r.posed_vertices(src))[0].norm(dim=-1)
        assert abs(d[chest].mean().item() - chest_move) < 1e-5, follow
        assert abs(d[face].mean().item() - 0.03) < 1e-5, follow


def test_eyelids_do_not_follow_the_gaze(scene):
    """The eyeball vertices lie a millimetre behind the lids: lid Gaussians, even pushed 2 cm out by their offsets,
    do not take the eyes' weights by proximity, so a gaze change moves nothing outside the eyes."""
    head, uv, _, source, _ = scene
    eyeball = head.v_template[head.lbs_weights[:, 3:].sum(-1) > 0]
    texel_pos = (head.v_template[head.faces[uv.face_index.clamp(min=0)]] * uv.bary[..., None]).sum(-2)  # (K, K, 3)
    lids = uv.valid & uv.region_mask("face") & (torch.cdist(texel_pos.view(-1, 3), eyeball).min(1).values.view(
        64, 64) < 0.01)
    assert lids.sum() > 10
    delta_p = torch.zeros(1, 3, 64, 64)
    delta_p[0, 2, lids] = 0.02
    look = source.index(slice(0, 1))
    look.eyes = look.eyes + torch.tensor([[0.0, 0.4, 0.0, 0.0, 0.4, 0.0]])
    moves = []
    for by_position in (False, True):
        r = AvatarRig(head, uv, template_maps(uv), torch.zeros(1, head.n_shape), delta_p, source,
                      SkinningConfig(by_position=by_position))
        moves.append((r.pose_params(look).means - r.pose_params(source).means)[0].norm(dim=-1))
    lid = _texel_of(uv, lids)
    assert moves[0].max() > 0.003  # the eyes turn
    assert moves[0][lid].max() < 1e-5  # the lids' triangles have no eye weights
    torch.testing.assert_close(moves[1], moves[0], atol=1e-5, rtol=0)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="torso_follow"):
        SkinningConfig(torso_follow=1.5)
    with pytest.raises(ConfigError, match="offset_onset"):
        SkinningConfig(offset_onset=0.05, offset_full=0.03)
