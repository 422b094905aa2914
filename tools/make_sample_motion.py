"""Make ``sample_inputs/driving_motion.npz``: a short driving motion for a head model (ICT-FaceKit by default, the
head of the shipped weights), by our own code.

3 s at 25 fps: the head turns left and right and nods, the jaw opens and closes (speaking), a smile comes and goes,
the eyes blink twice and glance sideways. Stored in the tracking-file format (``pipelines.tracking.result``), so
``fhavatar reenact AVATAR sample_inputs/driving_motion.npz`` drives any avatar made with that head model.

    python tools/make_sample_motion.py [--head-model ict|embedded] [--out sample_inputs/driving_motion.npz]
"""

from __future__ import annotations

import argparse

import numpy as np

from pipelines.head.registry import load_head_model
from pipelines.preprocess.stage import frontal_camera
from pipelines.tracking.result import TRACKED, TrackingResult, save_tracking

FPS = 25
SECONDS = 3.0


def bump(t: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Smooth 0 -> 1 -> 0 bump centred at ``centre`` seconds."""
    return np.exp(-0.5 * ((t - centre) / width) ** 2)


# Each head's expression fields for the actions of the motion, and one "full" unit of each (the embedded head's
# fields reach a full smile at 1.5; ICT's ARKit shapes are a full action at 1).
ACTIONS = {
    "embedded": {"smile": (("smile_left", "smile_right"), 1.5), "blink": (("eye_close_left", "eye_close_right"), 1.0),
                 "brow": (("brow_inner_up_left", "brow_inner_up_right"), 1.0)},
    "ict": {"smile": (("mouthSmile_L", "mouthSmile_R"), 0.8), "blink": (("eyeBlink_L", "eyeBlink_R"), 1.0),
            "brow": (("browInnerUp_L", "browInnerUp_R"), 0.8)},
}


def make_motion(n_shape: int, expression_names: tuple[str, ...], kind: str = "embedded") -> dict[str, np.ndarray]:
    T = int(SECONDS * FPS)
    t = np.arange(T) / FPS
    index = {name: i for i, name in enumerate(expression_names)}
    n_expr = len(expression_names)
    rotation = np.zeros((T, 3))
    rotation[:, 1] = np.radians(20) * np.sin(2 * np.pi * t / SECONDS)  # yaw: left, right
    rotation[:, 0] = np.radians(8) * np.sin(4 * np.pi * t / SECONDS)  # pitch: two nods
    jaw = np.zeros((T, 3))
    jaw[:, 0] = 0.22 * np.clip(np.sin(2 * np.pi * 2.0 * t), 0, None) * (t < 2.0)  # four syllables, then closed
    expression = np.zeros((T, n_expr))
    curves = {"smile": bump(t, 2.4, 0.3), "blink": np.clip(bump(t, 0.8, 0.05) + bump(t, 2.2, 0.05), 0, 1),
              "brow": bump(t, 1.5, 0.25)}
    for action, (fields, unit) in ACTIONS[kind].items():
        for f in fields:
            expression[:, index[f]] = unit * curves[action]
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
    ap.add_argument("--head-model", default="ict", choices=sorted(ACTIONS))
    args = ap.parse_args()
    head = load_head_model(args.head_model)
    params = {k: v.astype(np.float32)
              for k, v in make_motion(head.n_shape, tuple(head.expression_names), args.head_model).items()}
    T = params["expression"].shape[0]
    K, c2w = frontal_camera(T)
    result = TrackingResult(params=params, K=K, c2w=c2w, lmk_error_px=np.zeros(T), status=np.full(T, TRACKED, np.uint8),
                            head_model=head.name)
    save_tracking(args.out, result, head.name)
    print(f"wrote {args.out}: {T} frames at {FPS} fps")


if __name__ == "__main__":
    main()
