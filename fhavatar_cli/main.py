"""fhavatar: one portrait photo -> animatable 3D full-head Gaussian avatar.

Commands read and write artifacts under an output folder (``--out``); re-running skips finished work.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from pipelines.batch import EXIT_USAGE, EXIT_WEIGHTS
from pipelines.errors import ConfigError, FhavatarError, WeightsError

from .ui import UI

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help=__doc__, context_settings={"help_option_names": ["-h", "--help"]})


class State:
    ui = UI()


@app.callback()
def main(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors."),
    log_json: bool = typer.Option(False, "--log-json", help="Line-delimited JSON events on stdout (cluster logs)."),
) -> None:
    State.ui = UI(quiet=quiet, log_json=log_json)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} requested but CUDA is not available", "use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"--device '{device}' is not one of auto, cpu, cuda, cuda:N")
    return device


def fail(e: FhavatarError) -> None:
    State.ui.error(e.line())
    raise typer.Exit(EXIT_WEIGHTS if isinstance(e, WeightsError) else EXIT_USAGE)


def parse_color(text: str) -> tuple[float, float, float]:
    named = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "grey": (0.5, 0.5, 0.5), "gray": (0.5, 0.5, 0.5),
             "green": (0.0, 1.0, 0.0)}
    if text.lower() in named:
        return named[text.lower()]
    try:
        t = text.lstrip("#")
        if len(t) == 6 and all(c in "0123456789abcdefABCDEF" for c in t):
            return tuple(int(t[i : i + 2], 16) / 255.0 for i in (0, 2, 4))  # type: ignore[return-value]
        vals = tuple(float(x) for x in text.split(","))
        if len(vals) == 3 and all(0 <= v <= 1 for v in vals):
            return vals  # type: ignore[return-value]
    except ValueError:
        pass
    raise ConfigError(f"colour '{text}' not understood", "use white, black, grey, #RRGGBB or r,g,b in [0,1]")


RENDERER_HELP = "Gaussian renderer: auto (gsplat on CUDA, else the PyTorch reference), gsplat or torch."


@app.command()
def turntable(
    avatars: List[str] = typer.Argument(..., help="avatar.npz files (or item folders holding avatar/avatar.npz)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="mp4 path (single avatar). Default: "
                                          "<item>/turntable/turntable.mp4 next to the avatar."),
    png_dir: Optional[Path] = typer.Option(None, "--png-dir", help="Also write an RGBA PNG sequence here."),
    no_video: bool = typer.Option(False, "--no-video", help="Only the PNG sequence."),
    frames: int = typer.Option(120, help="Number of frames in the orbit."),
    size: int = typer.Option(512, help="Resolution (square)."),
    fps: float = typer.Option(30.0),
    yaw_range: float = typer.Option(360.0, help="Degrees swept."),
    pitch: float = typer.Option(0.0, help="Camera elevation in degrees."),
    pitch_amplitude: float = typer.Option(0.0, help="Sinusoidal pitch wobble in degrees."),
    radius: float = typer.Option(1.35, help="Camera distance in metres (PanoHead framing at our scale)."),
    fov: float = typer.Option(13.373, help="Vertical field of view in degrees (EG3D/PanoHead focal 4.2647)."),
    background: str = typer.Option("white", help="white, black, grey, #RRGGBB or r,g,b."),
    expression: str = typer.Option("source", help="source (the photo's expression) or neutral."),
    renderer: str = typer.Option("auto", help=RENDERER_HELP),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Render a 360-degree orbit of an avatar to mp4 and/or PNGs."""
    from pipelines.batch import exit_code, run_batch
    from pipelines.turntable import TurntableConfig, run_turntable

    ui = State.ui
    try:
        dev = resolve_device(device)
        cfg = TurntableConfig(frames=frames, size=size, fps=fps, yaw_range=yaw_range, pitch=pitch,
                              pitch_amplitude=pitch_amplitude, radius=radius, fov=fov,
                              background=parse_color(background), expression=expression)
        if expression not in ("source", "neutral"):
            raise ConfigError(f"--expression '{expression}' must be source or neutral")
        if renderer not in ("auto", "gsplat", "torch"):
            raise ConfigError(f"--renderer '{renderer}' is not one of auto, gsplat, torch")
        if output is not None and len(avatars) > 1:
            raise ConfigError("--output names one file but several avatars were given", "omit --output")
    except FhavatarError as e:
        fail(e)

    def job_for(spec: str):
        def job():
            path = _avatar_path(spec)
            video = None if no_video else (output or path.parent.parent / "turntable" / "turntable.mp4")
            with ui.progress(f"turntable {Path(spec).name}", cfg.frames) as advance:
                n = run_turntable(path, video, png_dir, cfg, backend=renderer, device=dev, progress=advance)
            return "done", {"video": str(video), "frames": n}
        return job

    results = run_batch([(a, a, job_for(a)) for a in avatars], on_result=ui.item)
    raise typer.Exit(exit_code(results))


def _avatar_path(spec: str) -> Path:
    from pipelines.errors import InputError

    p = Path(spec)
    for cand in (p, p / "avatar" / "avatar.npz", p / "avatar.npz"):
        if cand.is_file():
            return cand
    raise InputError(f"avatar '{spec}' not found", "pass an avatar.npz or an item folder made by `fhavatar reconstruct`")


if __name__ == "__main__":
    app()
