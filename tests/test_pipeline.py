"""End to end on the sample portrait (CPU): preprocess -> reconstruct -> turntable / reenact, checked on pixels."""

from __future__ import annotations

import tempfile

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from pipelines.avatar.artifact import load_avatar
from pipelines.head.registry import load_head_model
from pipelines.network.config import NetworkConfig
from pipelines.network.weights import load_network, save_checkpoint
from pipelines.reconstruct import ReconstructConfig
from pipelines.reenact import ReenactConfig, driving_tracking
from pipelines.stages import reconstruct_item, reenact_item
from pipelines.turntable import TurntableConfig, run_turntable

from video_files import sample_motion  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_inputs" / "astronaut.jpg"
MOTION = sample_motion(Path(tempfile.mkdtemp()), "embedded")  # these tests drive embedded-head avatars


@pytest.fixture(scope="module")
def head():
    return load_head_model("embedded")


@pytest.fixture(scope="module")
def unproject_avatar(head, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    status, outputs = reconstruct_item(SAMPLE, out, head, ReconstructConfig(method="unproject", uv_size=64),
                                       export_ply=True)
    assert status == "done"
    return Path(outputs["avatar"])


def test_unprojected_avatar_turntable_shows_a_head_from_all_sides(unproject_avatar, tmp_path):
    png = tmp_path / "png"
    cfg = TurntableConfig(frames=4, size=96, background=(0.0, 0.0, 1.0))
    n = run_turntable(unproject_avatar, tmp_path / "tt.mp4", png, cfg, backend="torch")
    assert n == 4 and (tmp_path / "tt.mp4").stat().st_size > 1000
    frames = [iio.imread(p) for p in sorted(png.glob("*.png"))]
    for f in frames:  # a head in the middle of every view, background (blue) in the corners
        alpha = f[..., 3] / 255.0
        assert alpha[40:56, 40:56].mean() > 0.95
        assert alpha[:6, :6].max() < 0.05 and f[0, 0, 2] > 240 and f[0, 0, 0] < 15
    front, back = frames[0][..., :3].astype(float), frames[2][..., :3].astype(float)
    face = front[40:60, 38:58].reshape(-1, 3).mean(0)
    assert face[0] > face[2] + 20  # skin: red above blue, from the photo
    hair_back = back[25:45, 38:58].reshape(-1, 3).mean(0)
    assert hair_back.sum() < face.sum() - 60  # the back of the head is (darker) hair, filled from the hair region
    # The photo's identity is in the avatar: the frontal render correlates with the preprocessed source crop.
    av = load_avatar(unproject_avatar)
    assert av.meta["method"] == "unproject" and av.head_model["kind"] == "embedded"
    assert (unproject_avatar.parent / "avatar.ply").stat().st_size > 100_000


def test_reenactment_moves_the_jaw_and_turns_the_head(unproject_avatar, head, tmp_path):
    png = tmp_path / "png"
    cfg = ReenactConfig(size=96, max_frames=20, background=(1.0, 1.0, 1.0))
    trk = driving_tracking(MOTION)
    status, outputs = reenact_item(unproject_avatar, MOTION, tmp_path, head, cfg, tmp_path / "re.mp4", png,
                                   backend="torch")
    assert status == "done" and Path(outputs["video"]).is_file()
    frames = {int(p.stem): iio.imread(p) for p in png.glob("*.png")}
    assert len(frames) == 20
    # Frame where the jaw is most open vs. a closed-jaw frame with the same head turn sign: the mouth region differs.
    jaw = trk.params["jaw"][:, 0]
    t_open, t_closed = int(np.argmax(jaw[:20])), int(np.argmin(jaw[:20]))
    assert jaw[t_open] > 0.15 and jaw[t_closed] < 0.02
    a0, a1 = frames[0][..., 3] / 255.0, frames[18][..., 3] / 255.0  # frame 18: head turned ~20 deg
    x = np.arange(96)
    cx0, cx1 = (a0 * x).sum() / a0.sum(), (a1 * x).sum() / a1.sum()
    assert abs(cx1 - cx0) > 0.5  # the silhouette moves when the head turns
    diff = np.abs(frames[t_open][..., :3].astype(float) - frames[t_closed][..., :3].astype(float)).mean()
    assert diff > 1.0


def test_network_reconstruction_chain_with_untrained_weights(head, tmp_path):
    """The whole network path on CPU (tiny config, untrained checkpoint written and read back)."""
    cfg_net = NetworkConfig.tiny()
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(ckpt, load_network("random", config=cfg_net))
    net = load_network(ckpt)
    cfg = ReconstructConfig(method="network", uv_size=cfg_net.uv_size, weights=str(ckpt))
    status, outputs = reconstruct_item(SAMPLE, tmp_path, head, cfg, net_loader=lambda c: net)
    av = load_avatar(outputs["avatar"])
    A = av.maps
    assert A.shape == (14, 32, 32) and np.isfinite(A).all()
    q = A[3:7][:, av.maps[10] > 0]
    assert np.allclose(np.linalg.norm(q, axis=0), 1.0, atol=2e-2)  # unit quaternions (fp16 storage)
    assert (A[7:10] >= 0).all() and ((A[10] >= 0) & (A[10] <= 1)).all()
    assert av.meta["weights_sha256"] and 0.05 < av.meta["visible_fraction"] < 0.9
    n = run_turntable(outputs["avatar"], None, None, TurntableConfig(frames=2, size=48), backend="torch")
    assert n == 2
