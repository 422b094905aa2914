"""Settings of the preprocess stage (paper section 4.1: crop, align, remove the background, estimate the camera)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..core.camera import DEFAULT_RADIUS, EG3D_FOCAL
from ..errors import ConfigError

# Framing of a typical adult head (metres). Our camera convention (``pipelines/core/camera.py``): the frontal camera
# at DEFAULT_RADIUS = 1.35 m with normalized focal 4.2647 sees a 0.317 m wide square at the head centre: whole heads,
# as PanoHead frames them (eye distance about 0.2 of the crop width).
EYE_DISTANCE_M = 0.063  # distance between the two eye centres (mid-points of the eye corners)
VISIBLE_WIDTH_M = DEFAULT_RADIUS / EG3D_FOCAL  # what the crop spans at the head centre


@dataclass
class PreprocessConfig:
    """Preprocess settings. Every field is recorded in the stage manifest; changing one re-runs the item.

    Framing: the crop spans ``visible_width_m`` at the eyes' scale, i.e. the inter-ocular distance becomes
    ``eye_distance_m / visible_width_m`` (= 0.199) of the crop width; its centre is the projection of a head-centre
    point ``head_center_back_m`` behind and ``head_center_up_m`` above the eye mid-point, in the face's own frame
    (see ``crop.crop_box_from_landmarks``).
    """

    size: int = 512  # output crop side in pixels
    background: tuple[int, int, int] = (255, 255, 255)  # composite colour (RGB 0..255)
    max_frames: int | None = None  # keep at most this many frames (after fps / stride subsampling)
    stride: int = 1  # keep every n-th frame (after fps subsampling)
    fps: float | None = None  # resample a video to this frame rate (None: the source rate)
    face_index: int = 0  # which face when several: 0 = largest, 1 = second largest, ...
    min_detection_confidence: float = 0.5
    smooth_window: int = 15  # frames spanned (+-3 sigma) by the Gaussian that smooths the crop boxes; 1 = off
    remove_roll: bool = False  # rotate the crop so the eyes are level (default: axis-aligned crop, roll is left
    #                            to the tracked head rotation, and pasting back stays a scale + shift)
    matting_refine: bool = True  # guided-filter edges + keep the component connected to the face
    border: str = "replicate"  # padding when the crop leaves the frame: replicate | reflect | constant
    detect_max_side: int = 640  # the first (box) pass decodes videos at most this large
    eye_distance_m: float = EYE_DISTANCE_M
    visible_width_m: float = VISIBLE_WIDTH_M
    head_center_up_m: float = 0.0  # head centre above the eye line (face frame); see crop.py for why 0
    head_center_back_m: float = 0.09  # head centre behind the eyes (face frame)
    chunk: int = 8  # frames decoded per ``get_batch`` call (bounds memory)

    def __post_init__(self) -> None:
        self.background = tuple(int(c) for c in self.background)  # type: ignore[assignment]
        if self.size < 64:
            raise ConfigError(f"--size {self.size} is too small", "use at least 64 (the paper uses 512)")
        if len(self.background) != 3 or not all(0 <= c <= 255 for c in self.background):
            raise ConfigError(f"background colour {self.background} is not an RGB triple in 0..255", "e.g. 255,255,255")
        if self.stride < 1:
            raise ConfigError(f"--stride {self.stride} must be >= 1")
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"--max-frames {self.max_frames} must be >= 1")
        if self.fps is not None and self.fps <= 0:
            raise ConfigError(f"--fps {self.fps} must be > 0")
        if self.face_index < 0:
            raise ConfigError(f"face index {self.face_index} must be >= 0", "0 picks the largest face")
        if not 0.0 < self.min_detection_confidence < 1.0:
            raise ConfigError(f"detection confidence {self.min_detection_confidence} must be in (0, 1)")
        if self.smooth_window < 1:
            raise ConfigError(f"smoothing window {self.smooth_window} must be >= 1", "1 disables smoothing")
        if self.border not in ("replicate", "reflect", "constant"):
            raise ConfigError(f"border mode '{self.border}' is unknown", "use replicate, reflect or constant")
        if self.chunk < 1:
            raise ConfigError(f"chunk {self.chunk} must be >= 1")

    @property
    def eye_fraction(self) -> float:
        """Inter-ocular distance as a fraction of the crop width (0.199 by default)."""
        return self.eye_distance_m / self.visible_width_m

    def to_dict(self) -> dict:
        """Settings that change the results (``chunk`` only bounds memory, so it is left out)."""
        d = asdict(self)
        d["background"] = list(self.background)
        d.pop("chunk")
        return d
