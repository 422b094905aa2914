"""The head-model interface shared by FLAME and the embedded open head model.

A head model is a triangle mesh with a UV layout, a 5-joint rig (root/global, neck, jaw, left eye, right eye -
FLAME's kinematic tree), shape and expression blendshapes, pose correctives and a landmark embedding that ties
MediaPipe's 478 face-mesh points to surface points (face id + barycentrics).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from .lbs import blend_shapes, joint_rotations, lbs

JOINT_NAMES = ("root", "neck", "jaw", "eye_left", "eye_right")
PARENTS = (-1, 0, 1, 1, 1)

# Region ids stored per face (``HeadModel.face_region``); UV masks are built from them.
REGIONS = {"face": 0, "scalp": 1, "eyes": 2, "mouth": 3, "neck": 4, "ears": 5, "other": 6, "teeth": 7}


@dataclass
class HeadParams:
    """Batched tracked parameters. All tensors have batch size B.

    shape (B, S), expression (B, E), rotation (B, 3) global axis-angle, translation (B, 3),
    neck (B, 3), jaw (B, 3), eyes (B, 6) (left then right axis-angle).
    """

    shape: torch.Tensor
    expression: torch.Tensor
    rotation: torch.Tensor
    translation: torch.Tensor
    neck: torch.Tensor
    jaw: torch.Tensor
    eyes: torch.Tensor

    @classmethod
    def zeros(cls, batch: int, n_shape: int, n_expr: int, device=None, dtype=torch.float32) -> "HeadParams":
        z = lambda n: torch.zeros(batch, n, device=device, dtype=dtype)  # noqa: E731
        return cls(z(n_shape), z(n_expr), z(3), z(3), z(3), z(3), z(6))

    @property
    def batch(self) -> int:
        return self.shape.shape[0]

    def full_pose(self) -> torch.Tensor:
        """(B, 5, 3) axis-angle in JOINT_NAMES order."""
        return torch.stack([self.rotation, self.neck, self.jaw, self.eyes[:, :3], self.eyes[:, 3:]], dim=1)

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict, device=None) -> "HeadParams":
        return cls(**{f.name: torch.as_tensor(d[f.name], dtype=torch.float32, device=device) for f in fields(cls)})

    def index(self, idx) -> "HeadParams":
        return HeadParams(**{k: v[idx] for k, v in self.to_dict().items()})

    def to(self, device) -> "HeadParams":
        return HeadParams(**{k: v.to(device) for k, v in self.to_dict().items()})


@dataclass
class LandmarkEmbedding:
    """Surface points that correspond to MediaPipe face-mesh landmarks.

    mp_index (L,) MediaPipe landmark index (0..477), faces (L,) triangle id, bary (L, 3) barycentrics.
    """

    mp_index: torch.Tensor
    faces: torch.Tensor
    bary: torch.Tensor


class HeadModel(nn.Module):
    """Base class. Subclasses register these buffers in ``__init__``:

    v_template (V, 3), faces (F, 3) long, uv_coords (T, 2) in [0, 1] (v up), uv_faces (F, 3) long,
    shapedirs (V, 3, S), exprdirs (V, 3, E), posedirs (P, V*3) or empty, J_regressor (J, V),
    lbs_weights (V, J), parents (J,), face_region (F,) long (see REGIONS).
    And set ``name`` (str) and ``landmarks`` (LandmarkEmbedding or None).
    """

    name: str = "head"
    kind: str = "head"  # the registry's name for this model ("flame", "ict", "embedded"): what avatars record
    landmarks: LandmarkEmbedding | None = None
    # Cap of each triangle's metres-per-UV ratio (the relative scale map s), as a multiple of the median: a layout
    # with triangles squeezed in UV sets it so they do not get centimetre-sized Gaussians (see uv/space.py).
    max_uv_ratio_over_median: float = float("inf")
    # Interval in which the expression coefficients mean what the basis says: one-sided blendshapes (ARKit's,
    # ICT-FaceKit's) are in [0, 1]; a PCA basis (FLAME) is unbounded (None). The tracker keeps fits inside it.
    expression_range: tuple[float, float] | None = None
    # Fraction of the tracked head turn (``HeadParams.rotation``, the root's) that the neck joint carries when posing
    # (``lbs.joint_rotations``): 0 turns the whole model rigidly, chest included; a model with shoulders keeps them
    # still by sharing the turn with the neck. Face vertices land in the same place either way.
    neck_share: float = 0.0

    @property
    def n_shape(self) -> int:
        return self.shapedirs.shape[-1]

    @property
    def n_expr(self) -> int:
        return self.exprdirs.shape[-1]

    @property
    def num_vertices(self) -> int:
        return self.v_template.shape[0]

    def zero_params(self, batch: int = 1) -> HeadParams:
        return HeadParams.zeros(batch, self.n_shape, self.n_expr, device=self.v_template.device)

    def shaped(self, shape: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        """(B, V, 3) template + shape + expression blendshapes (eq. 11 without the pose term)."""
        v = self.v_template[None] + blend_shapes(shape, self.shapedirs)
        return v + blend_shapes(expression, self.exprdirs)

    def forward(self, params: HeadParams) -> torch.Tensor:
        """Posed vertices (B, V, 3): eq. 11-12 then global translation."""
        v_shaped = self.shaped(params.shape, params.expression)
        # Joints are regressed from the shaped mesh *with* expression, as FLAME's official code does (trackers
        # built on it assume this), i.e. J(beta, psi) rather than the paper's shorthand J(beta).
        joints = torch.einsum("jv,bvd->bjd", self.J_regressor, v_shaped)
        posedirs = self.posedirs if self.posedirs.numel() else None
        rot, translation = joint_rotations(params.full_pose(), joints, params.translation, self.neck_share)
        verts, _ = lbs(v_shaped, rot, joints, self.parents, self.lbs_weights, posedirs)
        return verts + translation[:, None, :]

    def canonical(self, shape: torch.Tensor | None = None) -> torch.Tensor:
        """(B, V, 3) neutral-expression, zero-pose vertices for ``shape`` (B, S) (default: the template)."""
        if shape is None:
            shape = torch.zeros(1, self.n_shape, device=self.v_template.device)
        params = HeadParams.zeros(shape.shape[0], self.n_shape, self.n_expr, device=shape.device)
        params.shape = shape
        return self.forward(params)

    def landmark_embedding(self, source: str = "mediapipe") -> LandmarkEmbedding | None:
        """Surface points of the landmarks that ``source`` detects, indexed by MediaPipe index: "mediapipe" (478
        points) or a 68-point source ("dlib", "fan": the iBUG points, placed at their MediaPipe indices). Models
        without points of their own for the 68 use their MediaPipe embedding for both."""
        return self.landmarks

    def landmarks_3d(self, verts: torch.Tensor) -> torch.Tensor:
        """(B, L, 3) landmark positions on posed vertices (B, V, 3)."""
        if self.landmarks is None:
            raise RuntimeError(f"head model {self.name!r} has no landmark embedding")
        lm = self.landmarks
        tri = verts[:, self.faces[lm.faces.to(verts.device)]]  # (B, L, 3, 3)
        return (tri * lm.bary.to(verts)[None, :, :, None]).sum(2)

    def head_center(self) -> torch.Tensor:
        """(3,) a point in the middle of the head (where default cameras look)."""
        return self.v_template.mean(0)



class ArrayHeadModel(HeadModel):
    """A head model built by our code from numpy arrays (the embedded head, ICT-FaceKit): one place that turns them
    into the interface's buffers, keeps the landmark embedding as (non-persistent) buffers so it follows
    ``.to(device)``, and answers ``head_center`` from a stored ``center`` (3,)."""

    def _register_arrays(self, data: dict, posedirs: torch.Tensor) -> None:
        """Buffers of :class:`HeadModel` (plus ``center``) from ``data``'s arrays; ``posedirs`` (P, V*3) or empty."""
        import numpy as np

        f32 = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
        i64 = lambda a: torch.tensor(np.asarray(a), dtype=torch.long)  # noqa: E731
        for name in ("v_template", "uv_coords", "shapedirs", "exprdirs", "J_regressor", "lbs_weights", "center"):
            self.register_buffer(name, f32(data[name]))
        for name in ("faces", "uv_faces", "face_region"):
            self.register_buffer(name, i64(data[name]))
        self.register_buffer("posedirs", posedirs)
        self.register_buffer("parents", torch.tensor(PARENTS, dtype=torch.long))
        # Not persistent: rebuilt from shipped data, and their size depends on whether landmarks are embedded.
        self.register_buffer("lmk_index", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("lmk_faces", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("lmk_bary", torch.zeros(0, 3), persistent=False)

    @property
    def landmarks(self) -> LandmarkEmbedding | None:  # type: ignore[override]
        if self.lmk_index.numel() == 0:
            return None
        return LandmarkEmbedding(self.lmk_index, self.lmk_faces, self.lmk_bary)

    @landmarks.setter
    def landmarks(self, emb: LandmarkEmbedding | None) -> None:
        device = self.v_template.device
        if emb is None:
            self.lmk_index = torch.zeros(0, dtype=torch.long, device=device)
            self.lmk_faces = torch.zeros(0, dtype=torch.long, device=device)
            self.lmk_bary = torch.zeros(0, 3, device=device)
            return
        self.lmk_index = torch.as_tensor(emb.mp_index, dtype=torch.long).to(device).clone()
        self.lmk_faces = torch.as_tensor(emb.faces, dtype=torch.long).to(device).clone()
        self.lmk_bary = torch.as_tensor(emb.bary, dtype=torch.float32).to(device).clone()

    def head_center(self) -> torch.Tensor:
        """(3,) centre of the head's bounding box (neck excluded)."""
        return self.center.clone()
