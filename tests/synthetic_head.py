"""A tiny analytic head model for tests: a UV sphere with a symmetric UV layout, regions and a 5-joint rig."""

from __future__ import annotations

import numpy as np
import torch

from pipelines.head.base import PARENTS, REGIONS, HeadModel


class SphereHead(HeadModel):
    """Sphere of radius ``radius`` around the origin. u = azimuth (face centre at u = 0.5, facing +z), v = latitude.

    The UV seam at the back duplicates the seam vertices in UV only. Regions: scalp above latitude 30 deg, neck below
    -50 deg, face elsewhere. Shape basis: radial scale (1) and x-stretch (2); expression: chin push (1).
    """

    name = "sphere"

    def __init__(self, n_lat: int = 16, n_lon: int = 24, radius: float = 0.1) -> None:
        super().__init__()
        lat = np.linspace(-np.pi / 2 * 0.95, np.pi / 2 * 0.95, n_lat)
        lon = np.linspace(-np.pi, np.pi, n_lon + 1)  # last column duplicates the first (seam)
        verts, uvs = [], []
        for a in lat:
            for b in lon[:-1]:
                verts.append([radius * np.cos(a) * np.sin(b), radius * np.sin(a), radius * np.cos(a) * np.cos(b)])
        for a in lat:
            for b in lon:
                uvs.append([(b + np.pi) / (2 * np.pi), (a - lat[0]) / (lat[-1] - lat[0])])
        faces, uv_faces, region = [], [], []
        for i in range(n_lat - 1):
            for j in range(n_lon):
                a, b = i * n_lon + j, i * n_lon + (j + 1) % n_lon
                c, d = (i + 1) * n_lon + j, (i + 1) * n_lon + (j + 1) % n_lon
                ta, tb = i * (n_lon + 1) + j, i * (n_lon + 1) + j + 1
                tc, td = (i + 1) * (n_lon + 1) + j, (i + 1) * (n_lon + 1) + j + 1
                faces += [[a, b, d], [a, d, c]]
                uv_faces += [[ta, tb, td], [ta, td, tc]]
                mid = (lat[i] + lat[i + 1]) / 2
                r = REGIONS["scalp"] if mid > np.radians(30) else REGIONS["neck"] if mid < np.radians(-50) else REGIONS["face"]
                region += [r, r]
        v = torch.tensor(verts, dtype=torch.float32)
        V = v.shape[0]
        self.register_buffer("v_template", v)
        self.register_buffer("faces", torch.tensor(faces, dtype=torch.long))
        self.register_buffer("uv_coords", torch.tensor(uvs, dtype=torch.float32))
        self.register_buffer("uv_faces", torch.tensor(uv_faces, dtype=torch.long))
        self.register_buffer("face_region", torch.tensor(region, dtype=torch.long))
        shapedirs = torch.stack([v, v * torch.tensor([1.0, 0.0, 0.0])], -1) * 0.1
        chin = torch.exp(-((v - torch.tensor([0.0, -radius, radius * 0.5])) ** 2).sum(-1) / (0.5 * radius) ** 2)
        exprdirs = (chin[:, None] * torch.tensor([0.0, -0.01, 0.01]))[..., None]
        self.register_buffer("shapedirs", shapedirs)
        self.register_buffer("exprdirs", exprdirs)
        self.register_buffer("posedirs", torch.zeros(0, V * 3))
        J = torch.zeros(5, V)
        J[:, :] = 1.0 / V  # every joint at the centroid except the jaw/eyes, set below via weights
        self.register_buffer("J_regressor", J)
        w = torch.zeros(V, 5)
        w[:, 1] = 1.0  # everything follows the neck
        lower = v[:, 1] < -0.3 * radius
        w[lower] = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0])  # lower part follows the jaw
        self.register_buffer("lbs_weights", w)
        self.register_buffer("parents", torch.tensor(PARENTS, dtype=torch.long))
