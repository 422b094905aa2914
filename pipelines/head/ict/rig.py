"""A FLAME-like 5-joint rig for ICT-FaceKit, computed from its own shapes (ICT ships no joints or skinning weights).

* **Eyes.** Each eye joint is the centre of the sphere that fits that eye's sclera; the eyeball (sclera and iris)
  follows it rigidly. Gaze is the joints' job: ICT's ``eyeLook*`` shapes, linear stand-ins for a rotation, are left out
  of the expression basis (so the tracker has one way to turn an eye, not two).
* **Jaw.** ``jawOpen`` is fitted as a rotation about a hinge on the left-right axis (x; the mesh is mirror-symmetric),
  from the lower teeth, which ``jawOpen`` moves rigidly. Each vertex's jaw weight is the share of that rotation that
  explains its ``jawOpen`` displacement (clamped to [0, 1], smoothed over the mesh), so the chin, lower lip, lower
  gums, teeth and tongue follow the joint together. What skinning does not explain (lip rolling, cheek stretch) is
  kept as a pose corrective on the jaw's pitch (FLAME's ``posedirs`` layout), exact at ``jawOpen`` = 1 and scaled by
  sin(pitch) / sin(pitch at jawOpen = 1) between. ``jawOpen`` itself leaves the expression basis: opening the mouth is
  the jaw joint, as in FLAME. ``jawLeft``/``jawRight``/``jawForward`` stay expressions.
* **Neck.** The head (neck joint and its children) blends into the chest (root joint) over the lower neck.
* **Joint regressor.** Each joint is an affine combination of nearby vertices that reproduces it on the template, so
  the joints follow the identity shape.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import least_squares
from scipy.sparse import coo_matrix, diags

from ..geometry import affine_regressor, smoothstep


S_MIRROR = np.array([-1.0, 1.0, 1.0])


def mirror_field(field: np.ndarray, mirror: np.ndarray) -> np.ndarray:
    """The mirror image (x -> -x) of per-vertex vectors (..., V, 3): (M f)[v] = S f[mirror[v]]."""
    return field[..., mirror, :] * S_MIRROR


def symmetrize_shapes(neutral: np.ndarray, identity: np.ndarray, expression: np.ndarray, names: list[str],
                      mirror: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Make ICT exactly mirror-symmetric (its scans are so to ~0.3 mm), so that the flip augmentation and the
    symmetric UV fusion see one model whose mirror image is itself.

    * template: the mean of itself and its mirror image;
    * expressions: a left/right pair (``*_L``/``*_R``, ``*Left``/``*Right``) becomes the mean of one and the mirror
      of the other, and its mirror; any other shape the mean of itself and its mirror;
    * identity: the Gaussian prior N(0, Phi Phi^T) is averaged with its mirror image, and the same number of
      components is taken as the leading principal directions of that mirror-invariant covariance (each one
      symmetric or antisymmetric), scaled to one standard deviation, as ICT's own are.
    """
    neutral = 0.5 * (neutral + mirror_field(neutral, mirror))
    expression = expression.copy()
    index = {n: i for i, n in enumerate(names)}
    done = set()
    for n, i in index.items():
        if i in done:
            continue
        twin = next((n[: -len(a)] + b for a, b in (("_L", "_R"), ("_R", "_L"), ("Left", "Right"), ("Right", "Left"))
                     if n.endswith(a) and n[: -len(a)] + b in index), None)
        if twin is None:
            expression[i] = 0.5 * (expression[i] + mirror_field(expression[i], mirror))
            done.add(i)
        else:
            j = index[twin]
            left = 0.5 * (expression[i] + mirror_field(expression[j], mirror))
            expression[i], expression[j] = left, mirror_field(left, mirror)
            done.update((i, j))
    C, V, _ = identity.shape
    both = np.concatenate([identity, mirror_field(identity, mirror)]).reshape(2 * C, V * 3) / np.sqrt(2.0)
    # Leading right singular vectors of ``both`` (covariance = both^T both) through its small Gram matrix.
    lam, u = np.linalg.eigh(both @ both.T)
    order = np.argsort(lam)[::-1][:C]
    identity = (u[:, order].T @ both).reshape(C, V, 3)  # = sv * vt: one standard deviation per component
    return neutral, identity, expression


def fit_sphere(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares sphere through points (N, 3): centre (3,), radius."""
    A = np.concatenate([2 * points, np.ones((len(points), 1))], 1)
    b = (points ** 2).sum(1)
    sol, *_ = np.linalg.lstsq(A, b, rcond=None)
    c = sol[:3]
    return c, float(np.sqrt(sol[3] + c @ c))


def rotation_x(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def fit_hinge(rest: np.ndarray, moved: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Rotation about an x-parallel axis through (0, y, z) that best maps ``rest`` (N, 3) onto ``moved``.

    Returns the hinge point (3,), the angle (rad; positive opens, FLAME's convention) and the RMS residual (m).
    """
    def residual(q):
        c = np.array([0.0, q[1], q[2]])
        return ((rest - c) @ rotation_x(q[0]).T + c - moved).ravel()

    centre = rest.mean(0)
    sol = least_squares(residual, x0=[0.2, centre[1] + 0.03, centre[2] - 0.08])
    rms = float(np.sqrt(np.mean(sol.fun.reshape(-1, 3) ** 2 * 3)))
    return np.array([0.0, sol.x[1], sol.x[2]]), float(sol.x[0]), rms


def vertex_adjacency(faces: np.ndarray, n: int):
    """(V, V) sparse row-normalised adjacency (mean over edge neighbours)."""
    i = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2], faces[:, 1], faces[:, 2], faces[:, 0]])
    j = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0], faces[:, 0], faces[:, 1], faces[:, 2]])
    A = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)).tocsr()
    A.data[:] = 1.0
    deg = np.asarray(A.sum(1)).ravel()
    return diags(1.0 / np.maximum(deg, 1)) @ A


def jaw_weights(verts: np.ndarray, faces: np.ndarray, displacement: np.ndarray, hinge: np.ndarray, angle: float,
                rigid: np.ndarray, smooth_iters: int = 20) -> np.ndarray:
    """(V,) share of the hinge rotation in each vertex's ``jawOpen`` displacement (V, 3), in [0, 1].

    ``rigid`` (V,) bool marks vertices that move with the jaw bone exactly (weight 1, kept through smoothing).
    Vertices that barely move (< 0.2 mm) get 0.
    """
    r = (verts - hinge) @ rotation_x(angle).T + hinge - verts  # what the rotation would do
    rr = (r * r).sum(1)
    w = np.where(rr > 1e-10, (displacement * r).sum(1) / np.maximum(rr, 1e-12), 0.0)
    w = np.clip(w, 0.0, 1.0)
    w[np.linalg.norm(displacement, axis=1) < 2e-4] = 0.0
    w[rigid] = 1.0
    A = vertex_adjacency(faces, len(verts))
    moving = np.linalg.norm(displacement, axis=1) >= 2e-4
    for _ in range(smooth_iters):  # smooth where the skin moves; rigid and still vertices keep their value
        s = A @ w
        w = np.where(moving & ~rigid, s, w)
    return np.clip(w, 0.0, 1.0)


def neck_blend(verts: np.ndarray, chin_y: float, nape_y: float, head_z: float, width: float = 0.05) -> np.ndarray:
    """(V,) 0 on the chest and lower neck (root joint) .. 1 on the head (neck joint): a smooth ramp below a boundary
    that runs from under the chin (front) to the nape (back)."""
    front = smoothstep(head_z - 0.04, head_z + 0.04, verts[:, 2])  # 1 at the front of the neck
    boundary = nape_y + (chin_y - nape_y) * front
    return smoothstep(boundary - width, boundary - 0.005, verts[:, 1])


def joint_regressor(verts: np.ndarray, joints: np.ndarray, supports: list[np.ndarray]) -> np.ndarray:
    """(J, V): joint j as an affine combination of the vertices ``supports[j]`` that reproduces it on ``verts``."""
    return np.stack([affine_regressor(verts, ids, c) for c, ids in zip(joints, supports)])


def jaw_corrective(verts: np.ndarray, displacement: np.ndarray, jaw_weight: np.ndarray, hinge: np.ndarray,
                  angle: float, n_joints: int = 5) -> np.ndarray:
    """(P, V*3) FLAME-layout pose correctives (P = (J-1)*9) with which skinning the jaw by ``angle`` about ``hinge``
    moves ``verts`` (V, 3) by exactly ``displacement`` (V, 3).

    Skinning moves a vertex by w (R - I)(v - hinge) (w = ``jaw_weight`` (V,), its LBS weight on the jaw); LBS adds
    correctives before skinning, so the remainder is taken back through the vertex's blended rotation I + w (R - I).
    It rides on the jaw's pitch: the (R - I) entries (2, 1) = sin and (1, 2) = -sin of joint 2 each carry half of it,
    divided by sin(angle), so the corrective is exact at ``angle`` and proportional to sin(pitch) between.
    """
    V = verts.shape[0]
    R = rotation_x(angle) - np.eye(3)
    skinned = jaw_weight[:, None] * ((verts - hinge) @ R.T)
    blend = np.eye(3)[None] + jaw_weight[:, None, None] * R[None]  # (V, 3, 3)
    rest = np.linalg.solve(blend, (displacement - skinned)[..., None])[..., 0]
    res = rest.reshape(-1) / np.sin(angle)
    P = np.zeros(((n_joints - 1) * 9, V * 3))
    block = (2 - 1) * 9  # joint 2 (jaw); the root has no correctives
    P[block + 7] = 0.5 * res  # entry (2, 1): +sin
    P[block + 5] = -0.5 * res  # entry (1, 2): -sin
    return P
