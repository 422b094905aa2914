"""pipelines.identity against dlib itself: the reader of dlib's serialization, the PyTorch port of the face
descriptor network (on the same chip: cosine >= 0.999 per image, CSIM equal within 1e-3) and the grid_sample chip
alignment (against dlib.get_face_chip), on the sample portrait and the shared photos when present."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.identity import (
    DlibFaceResNet,
    DlibFormatError,
    FaceIdentity,
    dlib_layout,
    dlib_points_from_mediapipe,
    extract_chips,
    face_chip_details,
    read_network,
)
from pipelines.identity.align import plan_chip
from pipelines.identity.dlib_format import Stream

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_inputs" / "astronaut.jpg"
PORTRAITS = ROOT.parent / "shared" / "data" / "portraits"


# ------------------------------------------------------------------------------------------ dlib's serialization
def pack_int(v: int) -> bytes:
    """dlib's ser_helper::pack_int: control byte (byte count | 0x80 if negative) + little-endian magnitude."""
    mag = abs(v)
    body = mag.to_bytes(max(1, (mag.bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if v < 0 else 0)]) + body


def pack_float(x: float) -> bytes:
    """dlib's float_details for a float32 value: 24-bit mantissa * 2**exponent, zero low bytes shifted off."""
    if math.isinf(x):
        return pack_int(0) + pack_int(32000 if x > 0 else 32001)
    if math.isnan(x):
        return pack_int(0) + pack_int(32002)
    m, e = math.frexp(x)
    mant, exp = int(m * (1 << 24)), e - 24
    for _ in range(8):
        if mant & 0xFF:
            break
        mant >>= 8
        exp += 8
    return pack_int(mant) + pack_int(exp)


def test_stream_reads_dlib_primitives():
    data = (pack_int(1) + pack_int(-300) + pack_int(2**40 + 5) + pack_float(0.04) + pack_float(-122.782)
            + pack_float(math.inf) + pack_float(math.nan) + b"10" + pack_int(5) + b"relu_")
    s = Stream(data)
    assert (s.integer(), s.integer(), s.integer()) == (1, -300, 2**40 + 5)
    assert s.real() == pytest.approx(0.04, abs=1e-9) and s.real() == pytest.approx(-122.782, abs=1e-5)
    assert s.real() == math.inf and math.isnan(s.real())
    assert (s.boolean(), s.boolean(), s.string()) == (True, False, "relu_")
    assert s.pos == len(data)
    # The exact bytes dlib wrote for loss_metric_2's margin (0.04) in the shipped file.
    assert Stream(bytes.fromhex("030ad7a3811c")).real() == pytest.approx(0.04, abs=1e-8)
    with pytest.raises(DlibFormatError, match="byte 0: not a dlib integer"):
        Stream(b"\x30").integer()
    with pytest.raises(DlibFormatError, match="not a dlib bool"):
        Stream(b"\x01").boolean()


def test_stream_reads_both_tensor_versions():
    vals = np.array([0.5, -1.25, 3.0, 0.0], np.float32)
    dims = b"".join(pack_int(d) for d in (1, 4, 1, 1))
    v1 = pack_int(1) + dims + b"".join(pack_float(float(v)) for v in vals)
    v2 = pack_int(2) + dims + vals.astype("<f4").tobytes()
    for data in (v1, v2):
        t = Stream(data).tensor()
        assert t.shape == (1, 4, 1, 1) and np.array_equal(t.reshape(-1), vals)


@pytest.fixture(scope="module")
def dat() -> Path:
    from pipelines.evaluate.models import ModelUnavailable
    from pipelines.identity import weights_path

    try:
        return weights_path()
    except ModelUnavailable as exc:
        pytest.skip(str(exc))


def test_the_shipped_file_reads_completely_as_dlibs_architecture(dat):
    net = read_network(dat, dlib_layout())
    kinds = [r.kind for r in net.layers]
    assert kinds.count("con") == 29 and kinds.count("affine") == 29 and kinds.count("relu") == 29
    assert kinds.count("add_prev") == 14 and kinds.count("avg_pool") == 5 and kinds[-1] == "fc"
    assert net.loss == pytest.approx({"version": "loss_metric_2", "margin": 0.04, "distance_threshold": 0.6})
    assert net.input["size"] == (150, 150)
    assert np.allclose(net.input["mean_rgb"], (122.782, 117.001, 104.298), atol=1e-4)  # as dlib's input_rgb_image
    stem = net.layers[0].values
    assert stem["weight"].shape == (32, 3, 7, 7) and stem["stride"] == (2, 2) and stem["padding"] == (0, 0)
    assert net.layers[-1].values["weight"].shape == (256, 128)
    model = DlibFaceResNet().load_dlib(net)
    in_file = sum(v.size for r in net.layers for v in r.values.values() if isinstance(v, np.ndarray))
    assert sum(p.numel() for p in model.parameters()) == in_file == 5_614_592  # every parameter of the file


def test_a_corrupt_file_fails_at_the_layer_that_differs(dat, tmp_path):
    data = bytearray(dat.read_bytes())
    i = data.find(b"relu_")  # the first ReLU's version string
    data[i:i + 5] = b"relux"
    bad = tmp_path / "bad.dat"
    bad.write_bytes(bytes(data))
    # The version string starts with its length (2 bytes) before the text.
    with pytest.raises(DlibFormatError, match=rf"layer 2 \(relu\): byte {i - 2}: expected a relu layer.*'relux'"):
        read_network(bad, dlib_layout())
    with pytest.raises(DlibFormatError, match="layer 3 .*max_pool"):  # the file is not this architecture
        read_network(dat, dlib_layout()[:3] + ["avg_pool"] + dlib_layout()[4:])
    shutil.copy(dat, tmp_path / "copy.dat")
    with open(tmp_path / "copy.dat", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(DlibFormatError, match="1 bytes left"):
        read_network(tmp_path / "copy.dat", dlib_layout())


# ---------------------------------------------------------------------------------------------- against dlib
def faces() -> list[tuple[str, np.ndarray]]:
    files = [SAMPLE] + (sorted(PORTRAITS.glob("d3dfr_*.jpg"))[:6] if PORTRAITS.is_dir() else [])
    return [(f.name, np.asarray(Image.open(f).convert("RGB"))) for f in files]


@pytest.fixture(scope="module")
def dlib_models(dat):
    dlib = pytest.importorskip("dlib")
    sp5 = dlib.shape_predictor(str(dat.parent / "shape_predictor_5_face_landmarks.dat"))
    return dlib, dlib.get_frontal_face_detector(), sp5, dlib.face_recognition_model_v1(str(dat))


@pytest.fixture(scope="module")
def real_faces(dlib_models):
    """(name, image, dlib 5-point shape, dlib's chip, dlib's descriptor of that chip) for each real photo."""
    dlib, detector, sp5, rec = dlib_models
    out = []
    for name, img in faces():
        rects = detector(img, 0) or detector(img, 1)
        if not rects:
            continue
        shape = sp5(img, max(rects, key=lambda r: r.area()))
        chip = np.asarray(dlib.get_face_chip(img, shape, size=150, padding=0.25))
        out.append((name, img, shape, chip, np.asarray(rec.compute_face_descriptor(chip))))
    assert out and out[0][0] == SAMPLE.name
    return out


@pytest.fixture(scope="module")
def ident(dat) -> FaceIdentity:
    torch.set_num_threads(1)
    return FaceIdentity(dat)


def _pts(shape) -> np.ndarray:
    return np.array([(p.x, p.y) for p in shape.parts()], np.float64)


def _csim(d: np.ndarray) -> np.ndarray:
    n = d / np.linalg.norm(d, axis=1, keepdims=True)
    return n @ n.T


def test_descriptor_equals_dlibs_on_the_same_chip(ident, real_faces):
    chips = torch.from_numpy(np.stack([f[3] for f in real_faces])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        ours = ident.embed(chips).double().numpy()
    ref = np.stack([f[4] for f in real_faces])
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.999, dict(zip([f[0] for f in real_faces], cos))
    assert np.abs(ours - ref).max() < 1e-4  # in fact ~3e-7: float32 summation order
    # CSIM between every pair of photos: the same numbers.
    assert np.abs(_csim(ours) - _csim(ref)).max() < 1e-3
    if len(real_faces) > 1:  # different people score lower than a face with itself
        assert _csim(ours)[0, 1:].max() < 0.99


def test_chip_alignment_matches_dlib_get_face_chip(ident, real_faces, dlib_models):
    dlib = dlib_models[0]
    for j, (name, img, shape, chip, _) in enumerate(real_faces):
        for k in (1, 2) if j < 3 else (1,):  # k = 2: a larger image, where dlib takes the chip from its pyramid
            big = img if k == 1 else np.asarray(Image.fromarray(img).resize((img.shape[1] * 2, img.shape[0] * 2)))
            pts = _pts(shape) * k  # dlib's shapes hold integer points
            ref = chip if k == 1 else np.asarray(dlib.get_face_chip(big, dlib.full_object_detection(
                dlib.rectangle(0, 0, 1, 1), [dlib.point(int(x), int(y)) for x, y in pts]), 150, 0.25))
            x = torch.from_numpy(big.copy()).permute(2, 0, 1)[None].float() / 255
            d = face_chip_details(pts[None])
            ours = extract_chips(x, d, quantize=True)[0].permute(1, 2, 0).numpy() * 255
            diff = np.abs(ours - ref.astype(np.float32))
            # 8-bit truncation at values dlib computes as n - 1e-9: a few pixels may differ by one level.
            assert diff.max() <= 1.0 + 1e-3 and (diff > 0.5).mean() < 1e-3, (name, k, diff.max(), (diff > 0.5).sum())
            smooth = extract_chips(x, d)[0].permute(1, 2, 0).numpy() * 255  # differentiable: no truncation
            levels = plan_chip(d, 0, big.shape[1], big.shape[0]).levels
            assert np.abs(smooth - ref).mean() < 0.5 + 0.5 * levels + 0.05


def test_whole_pipeline_equals_compute_face_descriptor(ident, real_faces, dlib_models):
    rec = dlib_models[3]
    ours, ref = [], []
    for name, img, shape, _, _ in real_faces[:4]:
        x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            ours.append(ident.describe(x, _pts(shape)[None], quantize=True)[0].double().numpy())
        ref.append(np.asarray(rec.compute_face_descriptor(img, shape, 0)))
    ours, ref = np.stack(ours), np.stack(ref)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.999
    assert np.abs(_csim(ours) - _csim(ref)).max() < 1e-3


def test_68_point_shapes_align_like_dlib(ident, real_faces, dat, dlib_models):
    dlib, detector = dlib_models[0], dlib_models[1]
    sp68 = dlib.shape_predictor(str(dat.parent / "shape_predictor_68_face_landmarks.dat"))
    name, img = real_faces[0][0], real_faces[0][1]
    shape = sp68(img, max(detector(img, 0), key=lambda r: r.area()))
    ref = np.asarray(dlib.get_face_chip(img, shape, size=150, padding=0.25)).astype(np.float32)
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
    ours = extract_chips(x, face_chip_details(_pts(shape)[None]), quantize=True)[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(ours - ref).max() <= 1.0 + 1e-3 and (np.abs(ours - ref) > 0.5).mean() < 1e-3
    # A shape with missing points still aligns (the tracker's embedding may lack some).
    pts = _pts(shape)
    pts[[30, 48]] = np.nan
    d = face_chip_details(pts[None])
    full = face_chip_details(_pts(shape)[None])
    assert abs(d.angle[0] - full.angle[0]) < 0.02 and abs(d.width[0] / full.width[0] - 1) < 0.02


def test_mediapipe_points_give_the_same_identity(ident, real_faces):
    from pipelines.evaluate import models as M

    try:
        mesh = M.face_mesh()
    except M.ModelUnavailable as exc:
        pytest.skip(str(exc))
    name, img, shape, _, ref = real_faces[0]
    lmk = mesh(img)
    pts = dlib_points_from_mediapipe(lmk[None])
    assert np.linalg.norm(pts[0] - _pts(shape), axis=1).max() < 0.1 * np.linalg.norm(pts[0, 0] - pts[0, 2])
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        d = ident.describe(x, pts, quantize=True)[0].double().numpy()
    assert d @ ref / np.linalg.norm(d) / np.linalg.norm(ref) > 0.97


def test_descriptor_is_differentiable_in_the_image(ident, real_faces):
    name, img, shape, _, ref = real_faces[0]
    x = (torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255).requires_grad_(True)
    d = ident.describe(x, _pts(shape)[None])
    loss = 1 - torch.nn.functional.cosine_similarity(d, torch.from_numpy(ref).float()[None]).mean()
    loss.backward()
    g = x.grad
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # Only the face chip's region of the image receives gradient.
    assert g[0, :, :40, :40].abs().sum() == 0


def test_a_float16_copy_loads_through_the_environment_variable(ident, real_faces, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from pipelines.evaluate.models import ModelUnavailable
    from pipelines.identity import weights_path
    from pipelines.identity.descriptor import WEIGHTS_SHA256

    path = tmp_path / "fp16.safetensors"
    state = {k: v.half().contiguous() for k, v in ident.net.state_dict().items()}
    save_file(state, str(path), metadata={"dtype": "float16", "source_sha256": WEIGHTS_SHA256})
    monkeypatch.setenv("FHAVATAR_FACE_DESCRIPTOR", str(path))
    assert weights_path() == path
    copy = FaceIdentity()
    chips = torch.from_numpy(np.stack([f[3] for f in real_faces])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(copy.embed(chips), ident.embed(chips))
    assert cos.min() > 1 - 1e-5 and "float16 copy" in copy.card.source
    save_file(state, str(path), metadata={"source_sha256": "0" * 64})
    with pytest.raises(ModelUnavailable, match="not made from dlib"):
        FaceIdentity()
    monkeypatch.setenv("FHAVATAR_FACE_DESCRIPTOR", str(tmp_path / "missing.dat"))
    with pytest.raises(ModelUnavailable, match="FHAVATAR_FACE_DESCRIPTOR"):
        weights_path()
