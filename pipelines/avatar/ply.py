"""Export Gaussians to the standard 3DGS ``.ply`` layout that common viewers (SuperSplat, the INRIA viewer,
nerfstudio's viewer, ...) open: x y z nx ny nz f_dc_0..2 opacity scale_0..2 rot_0..3, binary little-endian,
with opacity as a logit, scales as logs and colour as the degree-0 spherical-harmonic coefficient."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..store import atomic_path
from .binding import Gaussians

SH_C0 = 0.28209479177387814


def write_ply(path: str | Path, g: Gaussians, index: int = 0) -> None:
    """Write the ``index``-th Gaussians of a batch to a 3DGS ``.ply`` file (atomically)."""
    means = g.means[index].detach().cpu().numpy().astype(np.float32)
    n = means.shape[0]
    rgb = g.colors[index, :, :3].detach().cpu().numpy().astype(np.float32)
    opa = g.opacities[index].detach().cpu().numpy().astype(np.float32).clip(1e-6, 1 - 1e-6)
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
             "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    data = np.zeros((n, len(names)), dtype=np.float32)
    data[:, 0:3] = means
    data[:, 6:9] = (rgb - 0.5) / SH_C0
    data[:, 9] = np.log(opa / (1 - opa))
    data[:, 10:13] = np.log(g.scales[index].detach().cpu().numpy().clip(min=1e-9))
    data[:, 13:17] = g.quats[index].detach().cpu().numpy()
    header = "ply\nformat binary_little_endian 1.0\n" f"element vertex {n}\n"
    header += "".join(f"property float {p}\n" for p in names) + "end_header\n"
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(header.encode("ascii"))
            f.write(data.tobytes())


def read_ply(path: str | Path) -> dict[str, np.ndarray]:
    """Read a binary little-endian float32 vertex-only .ply (as written above) into a name -> array dict."""
    raw = Path(path).read_bytes()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    lines = raw[:end].decode("ascii").splitlines()
    n = int(next(ln.split()[-1] for ln in lines if ln.startswith("element vertex")))
    names = [ln.split()[-1] for ln in lines if ln.startswith("property")]
    arr = np.frombuffer(raw[end:], dtype="<f4", count=n * len(names)).reshape(n, len(names))
    return {name: arr[:, i] for i, name in enumerate(names)}
