"""Evaluation metrics (paper section 4.1) on real faces: scikit-image's astronaut always, the shared portraits and
HDTF clip when present. Offline only: models that are not installed / cached must be reported as unavailable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import map_coordinates
from skimage import data
from skimage.metrics import structural_similarity
from skimage.transform import rotate

from pipelines.errors import ConfigError, InputError
from pipelines.evaluate import MEDIAPIPE_TO_IBUG68, MetricsConfig, compute_metrics, psnr, ssim
from pipelines.evaluate import models as M

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PORTRAITS = SHARED / "portraits"
CLIP = SHARED / "clips" / "st_WDA_KatieHill_000.mp4"  # HDTF, 512 x 512, 25 fps


def face_crop(img: np.ndarray, size: int = 512) -> np.ndarray:
    """(size, size, 3) float crop of 2.2 x the face-mesh box around the face in uint8 ``img`` (the framing of the
    preprocess stage: a centred head)."""
    k = 512 / max(img.shape[:2])
    small = np.asarray(Image.fromarray(img).resize((round(img.shape[1] * k), round(img.shape[0] * k))))
    lmk = M.face_mesh()(small)
    assert lmk is not None, "no face in the test image"
    (x0, y0), (x1, y1) = lmk[:468, :2].min(0) / k, lmk[:468, :2].max(0) / k
    s = 2.2 * max(x1 - x0, y1 - y0)
    pad = int(s)
    big = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    cx, cy = int(round((x0 + x1 - s) / 2)) + pad, int(round((y0 + y1 - s) / 2)) + pad
    crop = big[cy : cy + int(s), cx : cx + int(s)]
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.LANCZOS), dtype=np.float32) / 255.0


def portrait(name: str) -> np.ndarray:
    path = PORTRAITS / f"lp_{name}.jpg"
    if not path.is_file():
        pytest.skip(f"shared portrait {path} absent")
    return face_crop(np.asarray(Image.open(path).convert("RGB")))


def shift(img: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Translate by whole pixels (content moves right by dx, down by dy), replicating the border."""
    h, w = img.shape[:2]
    p = max(abs(dx), abs(dy))
    big = np.pad(img, ((p, p), (p, p), (0, 0)), mode="edge")
    return big[p - dy : p - dy + h, p - dx : p - dx + w]


def identity_or_skip():
    try:
        return M.identity_model()
    except M.ModelUnavailable as exc:
        pytest.skip(f"no identity model: {exc}")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return face_crop(data.astronaut())


# ----------------------------------------------------------------------------------------------- PSNR and SSIM


@pytest.mark.parametrize("sigma", [0.02, 0.05])
def test_psnr_of_gaussian_noise_matches_its_sigma(astronaut, sigma):
    img = 0.2 + 0.6 * astronaut  # keep noise away from the [0, 1] clip
    noisy = img + np.random.default_rng(0).normal(0.0, sigma, img.shape).astype(np.float32)
    assert noisy.min() > 0 and noisy.max() < 1
    value = psnr(noisy[None], img[None])[0]
    assert abs(value - 20 * np.log10(1 / sigma)) < 0.2


def test_psnr_of_identical_frames_is_inf_and_the_mean_says_so(astronaut):
    assert psnr(astronaut[None], astronaut[None])[0] == np.inf
    res = compute_metrics(astronaut, astronaut, which={"psnr"})
    assert res.mean["psnr"] == np.inf


def test_ssim_is_one_for_identical_lower_for_shifted_and_agrees_with_skimage(astronaut):
    frames = np.stack([astronaut, shift(astronaut, 1, 0), shift(astronaut, 3, 2), np.clip(astronaut + 0.1, 0, 1)])
    ref = np.stack([astronaut] * 4)
    ours = ssim(frames, ref)
    assert abs(ours[0] - 1.0) < 1e-9
    assert ours[2] < ours[1] < 0.99  # more shift, less similar
    for f, value in zip(frames, ours):
        sk = structural_similarity(
            f, astronaut, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False,
        )
        assert abs(value - sk) < 1e-3


def test_foreground_mode_ignores_the_background(astronaut):
    alpha = np.zeros((1, 512, 512, 1), np.float32)
    alpha[:, 128:384, 128:384] = 1.0
    other_bg = np.where(alpha[0] > 0, astronaut, 0.3).astype(np.float32)  # same head, different background
    full = compute_metrics(other_bg, astronaut, which={"psnr", "ssim"})
    fg = compute_metrics(other_bg, astronaut, mask=alpha, which={"psnr", "ssim"}, foreground=True)
    assert full.mean["psnr"] < 20 and full.mean["ssim"] < 0.9
    assert fg.mean["psnr"] == np.inf and abs(fg.mean["ssim"] - 1) < 1e-9
    with pytest.raises(ConfigError):
        compute_metrics(other_bg, astronaut, which={"psnr"}, foreground=True)


# ---------------------------------------------------------------------------------------------------------- LPIPS


def test_lpips_is_unavailable_without_cached_backbone_weights(astronaut, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub cache
    M.lpips_model.cache_clear()
    res = compute_metrics(astronaut, astronaut, which={"psnr", "lpips"})
    assert "lpips" not in res.mean and "lpips" not in res.per_frame and "lpips" not in res.models
    assert "alexnet-owt-7be5be79.pth" in res.unavailable["lpips"]
    assert res.mean["psnr"] == np.inf  # the other metrics still come out
    # A file with the right name but other contents is refused too (torchvision's sha256 prefix check).
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save({"x": torch.zeros(1)}, tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
    res = compute_metrics(astronaut, astronaut, which={"lpips"})
    assert "sha256" in res.unavailable["lpips"] and not res.mean
    M.lpips_model.cache_clear()


def _random_backbone_file(path, net: str = "alex", seed: int = 0):
    """A backbone file in torchvision's layout (``features.<i>.weight|bias``) with random weights: no real ImageNet
    file can be had offline, but the loader's key mapping and the network's arithmetic are the same."""
    from pipelines.evaluate.lpips_net import LpipsNet

    torch.manual_seed(seed)
    ref = LpipsNet(net)
    for m in ref.features:
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
            torch.nn.init.uniform_(m.bias, -0.1, 0.1)
    torch.save({f"features.{k}": v for k, v in ref.features.state_dict().items()} | {"classifier.1.weight":
               torch.zeros(4, 4)}, path)
    return ref


def test_lpips_network_matches_a_direct_computation(tmp_path):
    """Our LPIPS equals the formula written out by hand: scaling layer, ReLU taps, channel-normalised squared
    differences weighted by the wheel's calibrated linear layers, spatial mean, sum over taps."""
    import torch.nn.functional as F

    from pipelines.evaluate.lpips_net import lpips_linear_weights_path

    path = tmp_path / "alexnet-owt-7be5be79.pth"
    ref = _random_backbone_file(path)
    ours = M.Lpips("alex", backbone_path=path, verify_hash=False)
    lin = torch.load(lpips_linear_weights_path("alex"), map_location="cpu", weights_only=True)
    assert all(float(w.min()) >= 0 for w in lin.values())  # LPIPS' calibrated weights are non-negative
    a, b = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)

    def taps(x):
        sd = ref.features.state_dict()
        x = (2 * x - 1 - torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)) / torch.tensor(
            [0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        x = F.relu(F.conv2d(x, sd["0.weight"], sd["0.bias"], stride=4, padding=2)); out = [x]
        x = F.relu(F.conv2d(F.max_pool2d(x, 3, 2), sd["3.weight"], sd["3.bias"], padding=2)); out.append(x)
        x = F.relu(F.conv2d(F.max_pool2d(x, 3, 2), sd["6.weight"], sd["6.bias"], padding=1)); out.append(x)
        x = F.relu(F.conv2d(x, sd["8.weight"], sd["8.bias"], padding=1)); out.append(x)
        x = F.relu(F.conv2d(x, sd["10.weight"], sd["10.bias"], padding=1)); out.append(x)
        return out

    want = 0
    for k, (fa, fb) in enumerate(zip(taps(a), taps(b))):
        na = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
        nb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
        want = want + ((na - nb) ** 2 * lin[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)).sum(1).mean((1, 2))
    torch.testing.assert_close(ours(a, b), want, rtol=1e-4, atol=1e-6)


def test_lpips_backbone_file_drives_compute_metrics(astronaut, tmp_path, monkeypatch):
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    _random_backbone_file(path)
    ours = M.Lpips("alex", backbone_path=path, verify_hash=False)
    monkeypatch.setattr(M, "lpips_model", lambda net="alex": ours)
    rng = np.random.default_rng(1)
    noisy = [np.clip(astronaut + rng.normal(0, s, astronaut.shape), 0, 1) for s in (0.05, 0.2)]
    frames = np.stack([astronaut] + noisy)
    res = compute_metrics(frames.astype(np.float32), np.stack([astronaut] * 3), which={"lpips"})
    d = res.per_frame["lpips"]
    assert d[0] == pytest.approx(0.0, abs=1e-6) and 0 < d[1] < d[2]
    assert "LPIPS v0.1 alex" in res.models["lpips"]


def test_lpips_net_is_differentiable_for_the_training_loss(tmp_path):
    path = tmp_path / "vgg16-397923af.pth"
    _random_backbone_file(path, "vgg")
    net = M.Lpips("vgg", backbone_path=path, verify_hash=False).net
    a = torch.rand(1, 3, 64, 64, requires_grad=True)
    net(a, torch.rand(1, 3, 64, 64)).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in net.parameters())  # frozen


def test_forbid_downloads_stops_torch_hub_fetching_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(M.ModelUnavailable, match="would download"):
        with M.forbid_downloads():
            torch.hub.load_state_dict_from_url("https://download.pytorch.org/models/alexnet-owt-7be5be79.pth")
    assert not any(tmp_path.rglob("*.pth"))


# ------------------------------------------------------------------------------------------------------------ AKD


def test_ibug68_table_is_mirror_consistent(astronaut):
    """Point k of the flipped image, flipped back, must land on the mirror partner of k (catches left/right or
    ordering mistakes in the index table)."""
    table = np.array(MEDIAPIPE_TO_IBUG68)
    assert len(table) == 68 and len(set(table.tolist())) == 68 and table.max() < 468
    mirror = (list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30, 35, 34, 33, 32, 31]
              + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
              + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55, 64, 63, 62, 61, 60, 67, 66, 65])
    mesh = M.face_mesh()
    a = mesh(M.to_uint8(astronaut))[table, :2]
    b = mesh(M.to_uint8(astronaut[:, ::-1]))[table, :2]
    b[:, 0] = 512 - b[:, 0]
    err = np.linalg.norm(a - b[mirror], axis=1) / np.linalg.norm(a[36] - a[45])
    assert err.max() < 0.06, np.argsort(err)[-3:]
    # Mirror pairs swapped together pass the test above; left-to-right order on screen catches them.
    for chain in ([0, 4, 8, 12, 16], [17, 19, 21, 22, 24, 26], [31, 32, 33, 34, 35], [36, 37, 38, 39, 42, 43, 44, 45],
                  [48, 49, 50, 51, 52, 53, 54], [59, 58, 57, 56, 55], [60, 61, 62, 63, 64], [67, 66, 65]):
        assert np.all(np.diff(a[chain, 0]) > 0), chain


def _akd_of_shifts(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    moves = [(0, 0), (3, 4), (6, 8), (-9, 12)]
    pred = np.stack([shift(img, dx, dy) for dx, dy in moves])
    cfg = MetricsConfig(keypoints="mediapipe")
    res = compute_metrics(pred, np.stack([img] * len(moves)), which={"akd"}, config=cfg)
    assert "MediaPipe" in res.models["akd"] and "68 iBUG" in res.models["akd"]
    return res.per_frame["akd"], np.array([np.hypot(dx, dy) for dx, dy in moves])


def test_akd_of_a_shifted_face_is_the_shift_length(astronaut):
    akd, expected = _akd_of_shifts(astronaut)
    assert akd[0] == 0.0
    np.testing.assert_allclose(akd, expected, atol=1.0)


@pytest.mark.shared
@pytest.mark.parametrize("name", ["d30", "s12"])
def test_akd_of_shifted_real_portraits(name):
    akd, expected = _akd_of_shifts(portrait(name))
    np.testing.assert_allclose(akd, expected, atol=1.0)


def test_cross_identity_scores_motion_against_driving_frames_of_another_size(astronaut):
    """No ground truth: CSIM against the source, AKD / AED / APD against the driving frames (here the same face at
    256 x 256, so the motion distances are ~0 once measured at 512)."""
    driving = np.asarray(Image.fromarray(M.to_uint8(astronaut)).resize((256, 256), Image.LANCZOS), np.float32) / 255
    res = compute_metrics(astronaut, source=astronaut, driving=driving[None])
    assert set(res.mean) | set(res.unavailable) == {"csim", "akd", "aed", "apd"}
    assert res.mean["akd"] < 2.0 and res.mean["apd"] < 1.0 and res.mean["aed"] < 0.01
    assert all("against driving frames" in res.models[m] for m in ("akd", "aed", "apd"))


def test_akd_is_reported_in_pixels_at_512(astronaut):
    small = np.asarray(Image.fromarray(M.to_uint8(astronaut)).resize((256, 256), Image.LANCZOS), np.float32) / 255
    res = compute_metrics(shift(small, 3, 4)[None], small[None], which={"akd"})
    assert res.mean["akd"] == pytest.approx(10.0, abs=2.0)  # 5 px at 256 = 10 px at 512


def test_fan_keypoints_requested_but_not_cached_are_unavailable(astronaut, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    M.load_landmarker.cache_clear()
    res = compute_metrics(astronaut, astronaut, which={"akd"}, config=MetricsConfig(keypoints="fan"))
    assert "akd" not in res.mean and "FAN" in res.unavailable["akd"]
    res = compute_metrics(astronaut, astronaut, which={"akd"})  # auto: falls back to MediaPipe and says why
    assert res.mean["akd"] == 0.0 and "FAN not used" in res.models["akd"]
    M.load_landmarker.cache_clear()


def test_fan_keypoints_when_face_alignment_and_weights_are_present(astronaut, tmp_path, monkeypatch):
    fa_models = pytest.importorskip("face_alignment.models", reason="face_alignment not installed")
    from face_alignment import api as fa_api

    ckpt = tmp_path / "hub" / "checkpoints" / Path(fa_api.models_urls["2DFAN-4"]).name
    ckpt.parent.mkdir(parents=True)
    torch.save(fa_models.FAN(4).state_dict(), ckpt)  # random weights: tests the wiring, not FAN's accuracy
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    M.load_landmarker.cache_clear()
    res = compute_metrics(astronaut, astronaut, which={"akd"}, config=MetricsConfig(keypoints="fan"))
    assert res.mean["akd"] == 0.0 and "FAN 2DFAN-4" in res.models["akd"]
    M.load_landmarker.cache_clear()


# ---------------------------------------------------------------------------------------------------- AED and APD


def test_apd_is_zero_for_the_same_image_and_nonzero_for_its_mirror_image(astronaut):
    res = compute_metrics(np.stack([astronaut, astronaut[:, ::-1]]), np.stack([astronaut] * 2), which={"apd", "aed"})
    apd, ypr = res.per_frame["apd"], res.details["apd_yaw_pitch_roll"]
    assert apd[0] < 1e-6 and res.per_frame["aed"][0] < 1e-9
    assert apd[1] > 1.5  # the head's roll (and yaw) change sign in the mirror image
    assert abs(ypr[1, 2]) > 3.0


def test_apd_measures_an_in_plane_rotation_as_roll(astronaut):
    rolled = np.stack([rotate(astronaut, a, mode="edge").astype(np.float32) for a in (5.0, -12.0)])
    res = compute_metrics(rolled, np.stack([astronaut] * 2), which={"apd", "aed"})
    ypr = res.details["apd_yaw_pitch_roll"]
    np.testing.assert_allclose(np.abs(ypr[:, 2]), [5.0, 12.0], atol=1.0)
    assert np.abs(ypr[:, :2]).max() < 1.5  # no yaw / pitch
    assert res.per_frame["aed"].max() < 0.015  # pose is removed before comparing expressions


def test_aed_grows_when_the_lower_face_changes_but_not_with_pose(astronaut):
    lmk = M.face_mesh()(M.to_uint8(astronaut))
    nose = lmk[2, 1]  # stretch everything below the nose base by 30%: mouth and chin move down
    ys = np.arange(512, dtype=np.float64)
    src_y = np.where(ys < nose, ys, nose + (ys - nose) / 1.3)
    yy, xx = np.meshgrid(src_y, np.arange(512.0), indexing="ij")
    stretched = np.stack([map_coordinates(astronaut[..., c], [yy, xx], order=1, mode="nearest") for c in range(3)], -1)
    moved = shift(rotate(astronaut, 8.0, mode="edge").astype(np.float32), 5, -4)
    res = compute_metrics(np.stack([stretched.astype(np.float32), moved]), np.stack([astronaut] * 2), which={"aed"})
    aed = res.per_frame["aed"]
    assert aed[0] > 3 * aed[1]


@pytest.mark.shared
def test_aed_apd_on_real_expressions_of_one_person():
    """HDTF clip: frame 0 (mouth nearly closed, head down) against frame 30 (open smile, head back)."""
    if not CLIP.is_file():
        pytest.skip(f"shared clip {CLIP} absent")
    decord = pytest.importorskip("decord")
    frames = decord.VideoReader(str(CLIP)).get_batch([0, 30]).asnumpy().astype(np.float32) / 255
    f0, f30 = frames
    same_expression_new_pose = shift(rotate(f0, 10.0, mode="edge").astype(np.float32), -6, 4)
    res = compute_metrics(np.stack([f30, same_expression_new_pose]), np.stack([f0, f0]), which={"aed", "apd"})
    aed, ypr = res.per_frame["aed"], res.details["apd_yaw_pitch_roll"]
    assert aed[0] > 2 * aed[1]
    assert abs(ypr[0, 1]) > 10  # the head tilts back by well over 10 degrees between these frames
    assert abs(abs(ypr[1, 2]) - 10) < 1.5


# ----------------------------------------------------------------------------------------------------------- CSIM


def test_csim_of_an_image_with_itself_is_one(astronaut):
    idm = identity_or_skip()
    res = compute_metrics(astronaut, source=astronaut, which={"csim"})
    assert res.mean["csim"] == pytest.approx(1.0, abs=1e-6)
    assert "dlib" in res.models["csim"] and "source image" in res.models["csim"]
    assert idm.card.licence.startswith("models CC0")


def test_csim_equals_dlibs_own_descriptors(astronaut):
    """evaluate's CSIM (our port of dlib's network on our chips) = dlib's compute_face_descriptor on the same 5
    points, within 1e-3."""
    idm = identity_or_skip()
    dlib = pytest.importorskip("dlib")
    assert "5-point shape predictor" in idm.card.name
    frames = np.stack([shift(astronaut, 3, 2), np.clip(astronaut * 0.8 + 0.1, 0, 1), astronaut[:, ::-1]])
    res = compute_metrics(frames, source=astronaut, which={"csim"})
    rec = dlib.face_recognition_model_v1(str(idm.net.path))

    def dlib_descriptor(img):
        rgb = M.to_uint8(img)
        pts = idm.points(rgb, M.face_mesh()(rgb))
        shape = dlib.full_object_detection(dlib.rectangle(0, 0, 1, 1), [dlib.point(int(x), int(y)) for x, y in pts])
        return np.asarray(rec.compute_face_descriptor(rgb, shape, 0))

    src = dlib_descriptor(astronaut)
    ref = [float(d @ src / np.linalg.norm(d) / np.linalg.norm(src)) for d in map(dlib_descriptor, frames)]
    assert np.abs(res.per_frame["csim"] - ref).max() < 1e-3
    assert min(ref) < 0.999  # the frames do differ


@pytest.mark.shared
def test_csim_is_lower_for_two_different_people():
    identity_or_skip()
    a, b, c = portrait("s2"), portrait("s12"), portrait("d30")
    noisy_a = np.clip(a + np.random.default_rng(0).normal(0, 0.02, a.shape), 0, 1).astype(np.float32)
    res = compute_metrics(np.stack([noisy_a, a[:, ::-1], b, c]), source=a, which={"csim"})
    same_noise, same_mirror, other1, other2 = res.per_frame["csim"]
    assert min(same_noise, same_mirror) > 0.97
    assert max(other1, other2) < min(same_noise, same_mirror) - 0.05


# -------------------------------------------------------------------------------------------------- unavailable


def test_missing_models_and_faces_are_reported_not_numbers(astronaut, monkeypatch):
    def no_identity_model(*args):
        raise M.ModelUnavailable("dlib is not installed (simulated)")

    monkeypatch.setattr(M, "identity_model", no_identity_model)
    res = compute_metrics(astronaut, astronaut, source=astronaut, which={"csim", "psnr"})
    assert res.unavailable == {"csim": "dlib is not installed (simulated)"}
    assert set(res.mean) == set(res.per_frame) == set(res.models) == {"psnr"}

    blank = np.full((2, 128, 128, 3), 0.5, np.float32)  # no face: motion metrics cannot be scored
    res = compute_metrics(blank, blank, which={"akd", "aed", "apd", "ssim"})
    assert set(res.unavailable) == {"akd", "aed", "apd"} and "no face" in res.unavailable["aed"]
    assert set(res.mean) == {"ssim"}
    d = res.to_dict()
    assert d["mean"] == {"ssim": pytest.approx(1.0)} and "akd" in d["unavailable"]


def test_input_and_request_errors_name_the_problem(astronaut):
    with pytest.raises(ConfigError, match="psnr"):
        compute_metrics(astronaut, which={"psnr"})  # no ground truth
    with pytest.raises(ConfigError, match="unknown"):
        compute_metrics(astronaut, astronaut, which={"fid"})
    with pytest.raises(InputError, match="dtype"):
        compute_metrics(M.to_uint8(astronaut), astronaut)
    with pytest.raises(InputError, match="shape"):
        compute_metrics(astronaut, astronaut[:256])
