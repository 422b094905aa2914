"""Make ``sample_inputs/driving_motion.npz``: a short driving motion for the embedded head model, by our own code.

3 s at 25 fps: the head turns left and right and nods, the jaw opens and closes (speaking), a smile comes and goes,
the eyes blink twice and glance sideways. Stored in the tracking-file format (``pipelines.tracking.result``), so
``fhavatar reenact AVATAR sample_inputs/driving_motion.npz`` drives any avatar made with the embedded head model.

    python tools/make_sample_motion.py [--out sample_inputs/driving_motion.npz]
"""

from __future__ import annotations

import argparse

import numpy as np

from pipelines.head.embedded import EXPRESSION_NAMES, EmbeddedHeadModel
from pipelines.preprocess.stage import frontal_camera
from pipelines.tracking.result import TRACKED, TrackingResult, save_tracking

FPS = 25
SECONDS = 3.0


def bump(t: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Smooth 0 -> 1 -> 0 bump centred at ``centre`` seconds."""
    return np.exp(-0.5 * ((t - centre) / width) ** 2)


def make_motion(n_shape: int, n_expr: int) -> dict[str, np.ndarray]:
    T = int(SECONDS * FPS)
    t = np.arange(T) / FPS
    ex = {name: i for i, name in enumerate(EXPRESSION_NAMES)}
    rotation = np.zeros((T, 3))
    rotation[:, 1] = np.radians(20) * np.sin(2 * np.pi * t / SECONDS)  # yaw: left, right
    rotation[:, 0] = np.radians(8) * np.sin(4 * np.pi * t / SECONDS)  # pitch: two nods
    jaw = np.zeros((T, 3))
    jaw[:, 0] = 0.22 * np.clip(np.sin(2 * np.pi * 2.0 * t), 0, None) * (t < 2.0)  # four syllables, then closed
    expression = np.zeros((T, n_expr))
    smile = bump(t, 2.4, 0.3)
    expression[:, ex["smile_left"]] = expression[:, ex["smile_right"]] = 1.5 * smile
    blink = bump(t, 0.8, 0.05) + bump(t, 2.2, 0.05)
    expression[:, ex["eye_close_left"]] = expression[:, ex["eye_close_right"]] = np.clip(blink, 0, 1)
    expression[:, ex["brow_inner_up_left"]] = expression[:, ex["brow_inner_up_right"]] = bump(t, 1.5, 0.25)
    eyes = np.zeros((T, 6))
    eyes[:, 1] = eyes[:, 4] = np.radians(15) * bump(t, 1.2, 0.2)  # glance to the side
    return {
        "shape": np.zeros(n_shape),
        "expression": expression,
        "rotation": rotation,
        "translation": np.zeros((T, 3)),
        "neck": np.zeros((T, 3)),
        "jaw": jaw,
        "eyes": eyes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="sample_inputs/driving_motion.npz")
    args = ap.parse_args()
    head = EmbeddedHeadModel()
    params = {k: v.astype(np.float32) for k, v in make_motion(head.n_shape, head.n_expr).items()}
    T = params["expression"].shape[0]
    K, c2w = frontal_camera(T)
    result = TrackingResult(params=params, K=K, c2w=c2w, lmk_error_px=np.zeros(T), status=np.full(T, TRACKED, np.uint8),
                            head_model=head.name)
    save_tracking(args.out, result, head.name)
    print(f"wrote {args.out}: {T} frames at {FPS} fps")


if __name__ == "__main__":
    main()
