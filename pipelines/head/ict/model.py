"""``IctHeadModel``: ICT-FaceKit (MIT; a morphable full head from light-stage scans) behind the ``HeadModel`` interface.

What our code adds to ICT's numbers (``weights/ict_facekit/ict_head.npz``, see ``tools/make_ict_head.py``):

* **Frame.** FLAME's axes in metres (y up, the face looks along +z, x to the subject's left), eye level at y = 0 and
  the eyes 6.9 cm in front of the origin, as for the embedded head (so crops, cameras and tracking start alike).
* **Rig** (``rig.py``): FLAME's 5 joints with our skinning weights; the jaw joint replaces ``jawOpen`` (plus a pose
  corrective), the eye joints replace the ``eyeLook*`` shapes; the other ARKit shapes are the expression basis
  (weight 1 = the full expression, as ARKit blendshape scores).
* **Shape.** ICT's identity principal components, each one standard deviation (the tracker's unit-variance prior);
  ``IctHeadConfig.n_shape`` of the 100 are used.
* **UV** (``layout.py``): one horizontally symmetric unit square: the face tile whole at the top centre (u -> 1 - u
  mirrors left and right), the back of the head and neck as two mirrored halves, mirrored eyes, teeth, gums, tongue,
  mouth and eye sockets around it.
* **Regions**: face, scalp (cranium and the hairline band of the face tile), ears, neck, mouth (socket, gums,
  tongue), teeth, eyes (sclera, iris), other (eye sockets).
* **Landmarks**: MediaPipe's 478 points embedded on the template by aligning our MediaPipe reference face
  (``pipelines/assets``) to ICT's own 68 iBUG landmark vertices (their MediaPipe indices from ``MEDIAPIPE_TO_IBUG68``)
  and projecting onto the surface; ICT's 68 landmark vertices themselves serve ``--landmarks dlib|fan`` exactly.
  By default (``IctHeadConfig.fitted_landmarks``) each aligned point is first moved by a per-landmark offset fitted
  to tracked training footage (``pipelines/assets/ict_landmark_offsets.npy``, ``tools/fit_landmark_offsets.py``):
  the hand-aligned reference layout misplaces some points on ICT's surface by millimetres (docs/HEAD_MODELS.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..base import REGIONS, ArrayHeadModel, LandmarkEmbedding
from .asset import IctAsset, load_asset
from .layout import Item, mirror_island, mirror_vertices, split_halves, symmetric_atlas, uv_islands
from .rig import (
    S_MIRROR,
    fit_hinge,
    fit_sphere,
    jaw_corrective,
    jaw_weights,
    joint_regressor,
    neck_blend,
    symmetrize_shapes,
)

EYE_Z = 0.069  # eyes in front of the origin (metres), as the embedded head
GAZE_SHAPES = ("eyeLookDown_L", "eyeLookDown_R", "eyeLookIn_L", "eyeLookIn_R", "eyeLookOut_L", "eyeLookOut_R",
               "eyeLookUp_L", "eyeLookUp_R")
JAW_SHAPE = "jawOpen"
# ICT's documented vertex ranges (toolkit README) that tell the back-of-head material's islands apart.
MOUTH_SOCKET_VERTS = (11248, 13293)
EYE_SOCKET_VERTS = (13294, 14061)
# Relative texel densities of the atlas items (face = 1): what the avatar needs detail on gets more texels.
# The face tile is two islands: the front of the face (centred, whole) and the ring around it (forehead, temples,
# ears, under the chin; split into mirrored halves), so the front can get more texels than ICT's tile gives it.
DENSITY = {"face_front": 1.0, "face_ring": 0.7, "back": 0.5, "teeth": 0.75, "eyes": 0.75, "mouth": 0.45,
           "socket": 0.3, "ear_canal": 0.3}


OFFSETS_FILE = Path(__file__).resolve().parents[2] / "assets" / "ict_landmark_offsets.npy"


@dataclass(frozen=True)
class IctHeadConfig:
    """ICT head options. n_shape: identity components used (of 100; see docs/HEAD_MODELS.md for the measurement)."""

    n_shape: int = 100
    uv_resolution: int = 256  # the K the atlas' gaps between islands are sized for
    # MediaPipe landmarks embedded with the data-fitted per-landmark offsets (``OFFSETS_FILE``); False: the plain
    # reference alignment (what the offsets are fitted from). Only the landmark embedding depends on it.
    fitted_landmarks: bool = True


def load_landmark_offsets(path: str | Path = OFFSETS_FILE) -> np.ndarray:
    """(478, 2) fitted offsets (metres, ICT's frontal x/y plane) of the aligned MediaPipe reference points."""
    offsets = np.load(path, allow_pickle=False)
    if offsets.shape != (478, 2) or not np.isfinite(offsets).all():
        raise ValueError(f"{path}: landmark offsets must be finite with shape (478, 2), got {offsets.shape}")
    return offsets.astype(np.float64)


def _atlas_items(a: IctAsset, mirror: np.ndarray) -> tuple[list[Item], dict[str, np.ndarray]]:
    """The atlas items and the triangle ids of each part (for regions and the rig)."""
    F, verts = a.faces, a.neutral

    def pair_items(name: str, face_ids: np.ndarray, density: float) -> list[Item]:
        """Each island with its mirror twin; self-symmetric islands split into halves (packable anywhere)."""
        isl = uv_islands(a.faces_uv, face_ids)
        items, done = [], set()
        for k, island in enumerate(isl):
            if k in done:
                continue
            m = mirror_island(island, isl, F, mirror)
            done.update((k, m))
            if m == k:
                left, right = split_halves(island, F, verts, mirror)
            else:
                left, right = island, isl[m]
                if verts[F[left], 0].mean() < 0:  # the subject's left member (x > 0) is the one placed
                    left, right = right, left
            items.append(Item(f"{name}{k}", left, density, False, right))
        return items

    back = a.material_faces("M_BackHead")
    socket, eye_socket, head_neck = [], [], []
    for island in uv_islands(a.faces_uv, back):
        med = np.median(F[island])
        if MOUTH_SOCKET_VERTS[0] <= med <= MOUTH_SOCKET_VERTS[1]:
            socket.append(island)
        elif EYE_SOCKET_VERTS[0] <= med <= EYE_SOCKET_VERTS[1]:
            eye_socket.append(island)
        else:
            head_neck.append(island)
    head_neck.sort(key=len, reverse=True)
    parts = {
        "face": a.material_faces("M_Face"),
        "back": np.concatenate(head_neck[:2]),  # cranium and neck
        "ear_canal": np.concatenate(head_neck[2:]) if len(head_neck) > 2 else np.zeros(0, np.int64),
        "socket": np.concatenate(socket),
        "eye_socket": np.concatenate(eye_socket),
        "gums_tongue": a.material_faces("M_GumsTongue"),
        "teeth": a.material_faces("M_Teeth"),
        "eyes": a.material_faces("M_ScleraLeft", "M_IrisLeft", "M_ScleraRight", "M_IrisRight"),
    }
    face_islands = uv_islands(a.faces_uv, parts["face"])  # largest first: the front of the face, then the ring
    front, ring = face_islands[0], np.concatenate(face_islands[1:])
    items = [Item("face_front", front, DENSITY["face_front"], True)]
    for name, faces_ in (("face_ring", ring), ("back", parts["back"])):
        left, right = split_halves(faces_, F, verts, mirror)
        items.append(Item(name, left, DENSITY[name], False, right))
    for name, part, density in (("ear_canal", "ear_canal", "ear_canal"), ("mouth_socket", "socket", "socket"),
                                ("eye_socket", "eye_socket", "socket"), ("gums_tongue", "gums_tongue", "mouth"),
                                ("tooth", "teeth", "teeth"), ("eye", "eyes", "eyes")):
        if len(parts[part]):
            items += pair_items(name, parts[part], DENSITY[density])
    return items, parts


def _regions(a: IctAsset, verts: np.ndarray, parts: dict[str, np.ndarray], landmarks: dict[str, float]) -> np.ndarray:
    """(F,) REGIONS id per triangle, from its part and (on the skin) its centroid."""
    region = np.full(len(a.faces), REGIONS["other"])
    c = verts[a.faces].mean(1)
    x, y, z = c.T
    skin = np.concatenate([parts["face"], parts["back"]])
    region[skin] = REGIONS["face"]
    # Scalp: above the hairline (a band that rises from the temples to the forehead) and the back of the cranium.
    hairline = landmarks["brow_y"] + 0.045 + 0.010 * np.clip(1.0 - np.abs(x) / 0.06, 0.0, 1.0)
    is_back = np.zeros(len(region), bool)
    is_back[parts["back"]] = True
    scalp = (y > hairline) | (is_back & (y > landmarks["nape_y"]) & (z < landmarks["ear_z"] + 0.01))
    neck = (y < landmarks["chin_y"] - 0.012) & (z < landmarks["chin_z"] - 0.015) | (is_back & (y <= landmarks["nape_y"]))
    ear = (np.abs(x) > landmarks["ear_x"]) & (np.abs(y - landmarks["ear_y"]) < 0.04) & (
        np.abs(z - landmarks["ear_z"]) < 0.035) & ~is_back
    for mask, name in ((scalp, "scalp"), (neck, "neck"), (ear, "ears")):
        region[np.intersect1d(skin, np.flatnonzero(mask))] = REGIONS[name]
    region[parts["ear_canal"]] = REGIONS["ears"]
    region[np.concatenate([parts["socket"], parts["gums_tongue"]])] = REGIONS["mouth"]
    region[parts["teeth"]] = REGIONS["teeth"]
    region[parts["eyes"]] = REGIONS["eyes"]
    region[parts["eye_socket"]] = REGIONS["other"]
    return region


def build_ict_head(config: IctHeadConfig = IctHeadConfig(), path: str | Path | None = None) -> dict:
    """All arrays of the ICT head model (numpy, float64), deterministic for a given asset and config."""
    a = load_asset(path)
    names = list(a.expression_names)
    mirror = mirror_vertices(a.neutral)
    neutral, identity, expression = symmetrize_shapes(a.neutral, a.identity, a.expression, names, mirror)
    verts = neutral.copy()
    items, parts = _atlas_items(a, mirror)

    # ---- eyes and frame: eye level at y = 0, eyes EYE_Z in front of the origin
    eye_faces = {side: a.material_faces(f"M_Sclera{side}") for side in ("Left", "Right")}
    eye_verts = {side: np.unique(a.faces[ids]) for side, ids in eye_faces.items()}
    iris = {side: np.unique(a.faces[a.material_faces(f"M_Iris{side}")]) for side in ("Left", "Right")}
    centres = {side: fit_sphere(verts[ids])[0] for side, ids in eye_verts.items()}
    centres["Left"] = 0.5 * (centres["Left"] + centres["Right"] * S_MIRROR)  # exactly mirrored
    centres["Right"] = centres["Left"] * S_MIRROR
    mid = 0.5 * (centres["Left"] + centres["Right"])
    shift = np.array([0.0, -mid[1], EYE_Z - mid[2]])
    verts = verts + shift
    centres = {k: v + shift for k, v in centres.items()}
    centres["Left"][1] = centres["Right"][1] = 0.0

    # ---- jaw: hinge fitted on the lower teeth, weights, corrective
    d_jaw = expression[names.index(JAW_SHAPE)]
    teeth = np.unique(a.faces[parts["teeth"]])
    lower = teeth[np.linalg.norm(d_jaw[teeth], axis=1) > 0.004]
    hinge, angle, hinge_rms = fit_hinge(verts[lower], verts[lower] + d_jaw[lower])
    rigid = np.zeros(len(verts), bool)
    rigid[lower] = True
    w_jaw = jaw_weights(verts, a.faces, d_jaw, hinge, angle, rigid)
    w_jaw = 0.5 * (w_jaw + w_jaw[mirror])  # the 7 unmirrored triangles make the smoothing a hair asymmetric

    # ---- landmarks of the template used by the regions and the neck blend
    lm68 = verts[a.landmarks68]
    chin = lm68[8]
    brow_y = float(lm68[17:27, 1].mean())
    head_pts = verts[np.unique(a.faces[parts["face"]])]
    ear_x = 0.85 * float(np.abs(head_pts[:, 0]).max())
    geo = {"chin_y": float(chin[1]), "chin_z": float(chin[2]), "brow_y": brow_y, "ear_x": ear_x,
           "ear_y": float(lm68[[0, 16], 1].mean()) - 0.005, "ear_z": float(hinge[2]) - 0.01,
           "nape_y": float(chin[1]) + 0.035}
    region = _regions(a, verts, parts, geo)

    # ---- skinning weights: root (chest) / neck (head) / jaw / eyes
    V = len(verts)
    head_w = neck_blend(verts, chin_y=geo["chin_y"] - 0.01, nape_y=geo["nape_y"] - 0.02, head_z=float(hinge[2]))
    W = np.zeros((V, 5))
    W[:, 0] = 1.0 - head_w
    W[:, 1] = head_w * (1.0 - w_jaw)
    W[:, 2] = head_w * w_jaw
    for side, joint in (("Left", 3), ("Right", 4)):
        ids = np.union1d(eye_verts[side], iris[side])
        W[ids] = 0.0
        W[ids, joint] = 1.0

    # ---- joints (FLAME order: root, neck, jaw, eye_left, eye_right) and their regressor
    root = np.array([0.0, geo["chin_y"] - 0.035, float(hinge[2]) - 0.015])
    neck = np.array([0.0, geo["chin_y"] + 0.02, float(hinge[2]) - 0.02])
    joints = np.stack([root, neck, hinge, centres["Left"], centres["Right"]])
    skin_ids = np.unique(a.faces[np.concatenate([parts["face"], parts["back"]])])
    supports = []
    for j, band in ((root, 0.012), (neck, 0.012)):
        supports.append(skin_ids[np.abs(verts[skin_ids, 1] - j[1]) < band])
    supports.append(lower)
    supports += [np.union1d(eye_verts["Left"], iris["Left"]), np.union1d(eye_verts["Right"], iris["Right"])]
    J_regressor = joint_regressor(verts, joints, supports)

    # ---- pose corrective: what skinning the jaw at the fitted angle misses of jawOpen
    posedirs = jaw_corrective(verts, d_jaw, W[:, 2], hinge, angle)

    # ---- bases
    keep = [i for i, n in enumerate(names) if n not in GAZE_SHAPES and n != JAW_SHAPE]
    exprdirs = expression[keep].transpose(1, 2, 0)  # (V, 3, E)
    shapedirs = identity[: config.n_shape].transpose(1, 2, 0)  # (V, 3, S)
    eyeball = np.union1d(np.union1d(eye_verts["Left"], iris["Left"]), np.union1d(eye_verts["Right"], iris["Right"]))
    exprdirs[eyeball] = 0.0  # eyeballs move only by their joints (blink shapes move the lids, not the eyes)

    uv_coords, uv_faces = symmetric_atlas(verts, a.faces, a.faces_uv, a.uvs, items, mirror,
                                          resolution=config.uv_resolution)
    head_pts = verts[skin_ids]
    head_pts = head_pts[head_pts[:, 1] > geo["chin_y"]]
    centre = 0.5 * (head_pts.min(0) + head_pts.max(0))
    centre[0] = 0.0
    out = {
        "v_template": verts, "faces": a.faces, "uv_coords": uv_coords, "uv_faces": uv_faces,
        "shapedirs": shapedirs, "exprdirs": exprdirs, "posedirs": posedirs, "J_regressor": J_regressor,
        "lbs_weights": W, "face_region": region, "center": centre, "mirror": mirror,
        "landmarks68": a.landmarks68, "expression_names": tuple(names[i] for i in keep),
        "jaw_fit": {"hinge": hinge, "angle": angle, "rms": hinge_rms},
        "lower_teeth": lower, "upper_teeth": np.setdiff1d(teeth, lower),
        "iris": {k: v for k, v in iris.items()}, "source": a.source,
    }
    return out


def ict_landmark_embedding(head: "IctHeadModel", offsets: np.ndarray | None = None) -> LandmarkEmbedding:
    """MediaPipe's 478 points on the ICT template: our reference face aligned to ICT's 68 iBUG landmark vertices
    (their MediaPipe indices from ``MEDIAPIPE_TO_IBUG68``), moved by ``offsets`` ((478, 2) metres in the frontal
    x/y plane, or None) and projected onto the surface."""
    from ...preprocess.landmarks68 import MEDIAPIPE_TO_IBUG68
    from ..embedded import load_reference_face
    from ..landmarks import build_landmark_embedding

    verts = head.v_template.detach().cpu().double().numpy()
    lm68 = verts[head.landmarks68.cpu().numpy()]
    anchors = {int(mp): (float(p[0]), float(p[1])) for mp, p in zip(MEDIAPIPE_TO_IBUG68, lm68)}
    # Skin only: ICT has eye sockets behind the eyeballs, and 11 of each eye's 16 contour points fell through the
    # lid opening onto them, 2.6 cm deep (the tracked lids then opened wide and eye errors tripled under yaw).
    return build_landmark_embedding(head, load_reference_face(), anchors, skin_regions=("face",), offsets=offsets)


def _cached(config: IctHeadConfig, path: str | None) -> dict:
    # The arrays do not depend on fitted_landmarks: one build serves both settings.
    return _cached_arrays(replace(config, fitted_landmarks=True), path)


@lru_cache(maxsize=2)
def _cached_arrays(config: IctHeadConfig, path: str | None) -> dict:
    data = build_ict_head(config, path)
    for v in data.values():
        if isinstance(v, np.ndarray):
            v.setflags(write=False)
    return data


class IctHeadModel(ArrayHeadModel):
    """ICT-FaceKit as a head model (see the module docstring).

    Extra attributes: ``expression_names`` (E,), buffers ``landmarks68`` (68,) vertex ids (iBUG order),
    ``mirror`` (V,) mirror vertex of each vertex, ``center`` (3,); ``jaw_fit`` (hinge, angle, rms).
    """

    name = "ict"
    kind = "ict"
    # The flip augmentation's check: posing 100 + 44 large float32 coefficients rounds to ~0.1-0.2 mm, far below the
    # tracking's error, on a model that is symmetric by construction.
    mirror_tolerance = 5e-4
    max_uv_ratio_over_median = 1.5  # nostril and eyeball-pole triangles are squeezed in ICT's own UVs
    # ARKit blendshapes: 0 = neutral, 1 = the full expression. Unbounded, the tracker opened the mouth with negative
    # or > 1 shapes (mouthPress -1, jawForward 2.5) and left the jaw joint shut, so the lower teeth never moved.
    expression_range = (0.0, 1.0)
    # The model has shoulders: a tracked head turn is carried by the neck, so the chest stays still as in real
    # footage (the face lands in the same place either way; lbs.joint_rotations).
    neck_share = 1.0

    def __init__(self, config: IctHeadConfig | None = None, path: str | Path | None = None,
                 with_landmarks: bool = True) -> None:
        super().__init__()
        self.config = config or IctHeadConfig()
        data = _cached(self.config, None if path is None else str(path))
        i64 = lambda a: torch.tensor(np.asarray(a), dtype=torch.long)  # noqa: E731
        self._register_arrays(data, torch.tensor(np.asarray(data["posedirs"]), dtype=torch.float32))
        self.register_buffer("mirror", i64(data["mirror"]))
        self.register_buffer("landmarks68", i64(data["landmarks68"]))
        self.register_buffer("lower_teeth", i64(data["lower_teeth"]), persistent=False)
        self.register_buffer("upper_teeth", i64(data["upper_teeth"]), persistent=False)
        self.register_buffer("iris_left", i64(data["iris"]["Left"]), persistent=False)
        self.register_buffer("iris_right", i64(data["iris"]["Right"]), persistent=False)
        self.expression_names = data["expression_names"]
        self.jaw_fit = data["jaw_fit"]
        self.source = data["source"]
        if with_landmarks:
            emb = _cached_embedding(self.config, None if path is None else str(path))
            self.lmk_index, self.lmk_faces, self.lmk_bary = emb

    def landmark_embedding(self, source: str = "mediapipe") -> LandmarkEmbedding | None:
        """For 68-point sources, ICT's own iBUG landmark vertices (at their MediaPipe indices); else MediaPipe's."""
        if source == "mediapipe":
            return self.landmarks
        from ...preprocess.landmarks68 import MEDIAPIPE_TO_IBUG68

        # A triangle holding each landmark vertex, with all weight on that corner.
        ids = self.landmarks68
        hit = self.faces[None] == ids[:, None, None]  # (68, F, 3)
        face = hit.any(-1).float().argmax(-1)
        bary = hit[torch.arange(len(ids)), face].float()
        return LandmarkEmbedding(torch.tensor(MEDIAPIPE_TO_IBUG68, dtype=torch.long, device=ids.device), face, bary)


@lru_cache(maxsize=4)
def _cached_embedding(config: IctHeadConfig, path: str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    head = IctHeadModel(config, path, with_landmarks=False)
    emb = ict_landmark_embedding(head, load_landmark_offsets() if config.fitted_landmarks else None)
    return emb.mp_index.clone(), emb.faces.clone(), emb.bary.clone()
