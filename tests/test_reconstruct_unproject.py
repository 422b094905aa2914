"""The no-network baseline's maps at the UV island borders (``reconstruct.unproject_maps``, ``dilate_maps``).

Gaussians sample the attribute maps bilinearly at UV points; vertex and hair-grid samples on an island's border
read texels outside the islands. Those must carry island colours, not the zeros of ``color * valid`` (dark dotted
seams, docs/HEAD_MODELS.md). CPU, the ICT head at K = 128, no render.
"""

from __future__ import annotations

import pytest
import torch

from pipelines.avatar.binding import AvatarRig
from pipelines.core.camera import DEFAULT_RADIUS, normalized_intrinsics, orbit_cameras
from pipelines.head.registry import load_head_model
from pipelines.reconstruct import DILATE_TEXELS, SourceFrame, dilate_maps, unproject_maps
from pipelines.uv.space import UVConfig, build_uv_space

torch.set_num_threads(1)
COLOUR = (0.8, 0.6, 0.5)


def test_dilate_maps_fills_rings_around_islands_and_keeps_the_rest():
    valid = torch.zeros(9, 9, dtype=torch.bool)
    valid[4, 4] = True  # a one-texel island ...
    valid[4, 8] = True  # ... and another, 4 texels to its right
    maps = torch.full((1, 2, 9, 9), -1.0)  # whatever lies outside the islands (-1: visible if kept)
    maps[0, :, 4, 4] = torch.tensor([0.2, 0.4])
    maps[0, :, 4, 8] = torch.tensor([0.6, 1.0])
    out = dilate_maps(maps, valid, iterations=2)
    assert out.shape == maps.shape
    assert torch.equal(out[0, :, 4, 4], maps[0, :, 4, 4]) and torch.equal(out[0, :, 4, 8], maps[0, :, 4, 8])
    # First ring: the mean of its set neighbours; the ring of each island takes that island's values.
    assert torch.allclose(out[0, :, 3, 3], torch.tensor([0.2, 0.4])) and torch.allclose(out[0, :, 5, 7],
                                                                                     torch.tensor([0.6, 1.0]))
    # Second ring, between the islands (column 6): next to one first-ring texel of each island: their mean.
    assert torch.allclose(out[0, :, 4, 6], torch.tensor([0.4, 0.7]))
    # Farther than 2 texels from both islands: untouched.
    assert torch.equal(out[0, :, 0, 0], maps[0, :, 0, 0]) and torch.equal(out[0, :, 8, 1], maps[0, :, 8, 1])
    assert torch.equal(dilate_maps(maps, valid, iterations=0), maps)


@pytest.fixture(scope="module")
def ict():
    head = load_head_model("ict")
    return head, build_uv_space(head, UVConfig(size=128))


def test_unprojected_ict_avatar_of_a_uniform_photo_has_no_dark_seams(ict):
    """A photo of one colour, frontal: every valid texel gets that colour (seen, mirrored or the region mean), so
    every Gaussian should too. Before the dilation 11 979 of the 57 140 Gaussians were darker than it by more than
    0.01 (10 829 by more than 0.05; vertex and hair samples on island borders, down to black); with it none is."""
    head, uv = ict
    target = tuple(float(x) for x in head.head_center())
    c2w = orbit_cameras(torch.tensor([0.0]), torch.tensor([0.0]), DEFAULT_RADIUS, target)[0]
    size = 128
    image = torch.tensor(COLOUR).view(3, 1, 1).expand(3, size, size).clone()
    params = head.zero_params()
    source = SourceFrame(image, torch.ones(1, size, size), params, normalized_intrinsics()[0], c2w)
    maps = unproject_maps(source, head, uv)
    colour = AvatarRig(head, uv, maps, params.shape).color[0]  # (G, 3)
    # The test exercises the borders: a fifth of the Gaussians has invalid texels in its bilinear footprint.
    footprint_valid = uv.sample_maps(uv.valid[None, None].float())[0, :, 0]  # (G,)
    assert (footprint_valid < 1 - 1e-6).float().mean() > 0.2
    darker = (torch.tensor(COLOUR) - colour).max(1).values  # (G,)
    assert float(darker.max()) < 0.01, f"{int((darker > 0.01).sum())} Gaussians darker, max {float(darker.max())}"
    assert float((colour - torch.tensor(COLOUR)).abs().max()) < 0.01  # and none lighter either
    assert DILATE_TEXELS >= 2  # a 2 x 2 footprint around a UV point up to a texel off its island
