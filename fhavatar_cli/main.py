"""fhavatar: one portrait photo -> animatable 3D full-head Gaussian avatar.

Commands read and write artifacts under an output folder (``--out``); re-running skips finished work.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import os
import tempfile
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from typer.core import TyperCommand

from pipelines.batch import EXIT_USAGE, EXIT_WEIGHTS, exit_on_signal
from pipelines.errors import ConfigError, FhavatarError, InputError, WeightsError
from pipelines.store import ensure_dir

from .native_logs import silence_native_logs
from .ui import UI

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help=__doc__, context_settings={"help_option_names": ["-h", "--help"]})


# ------------------------------------------------------------------------------------------------ common options
# Declared once and used by every command, so each takes them the same way (also after the sub-command).
SHARD_HELP = ("This job's part of the inputs, i/n (0-based). Default: from SLURM_ARRAY_TASK_ID/COUNT "
              "(or SGE/LSF/PBS equivalents), else all inputs.")
RENDERER_HELP = "Gaussian renderer: auto (gsplat on CUDA, else the PyTorch reference), gsplat or torch."
RENDERERS = ("auto", "gsplat", "torch")

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.")]
LogJson = Annotated[bool, typer.Option("--log-json", help="Line-delimited JSON events on stdout (cluster logs).")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Also show the native logs of MediaPipe, TFLite and "
                                       "ffmpeg (hidden by default).")]
Shard = Annotated[Optional[str], typer.Option(help=SHARD_HELP)]
Force = Annotated[bool, typer.Option(help="Redo finished work.")]
FailFast = Annotated[bool, typer.Option(help="Stop at the first failed item.")]
Renderer = Annotated[str, typer.Option(help=RENDERER_HELP)]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
HeadModel = Annotated[str, typer.Option(help="auto (the head model the network weights were trained on: "
                                        "ict for the shipped ones), ict (ICT-FaceKit, shipped), flame "
                                        "(user-supplied, FHAVATAR_FLAME) or embedded (hand-made, legacy).")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder (one sub-folder per input item).")]
Output = Annotated[Optional[Path], typer.Option(
    "--output", help="Write this one mp4 instead (a single input; its manifest is kept beside it, in a hidden "
    "folder).")]
PngDir = Annotated[Optional[Path], typer.Option("--png-dir", help="Also write an RGBA PNG sequence here (a single "
                                                "input).")]
SettingsFile = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="YAML/JSON file of this command's settings (its stage dataclass, nested keys included, "
    "e.g. skinning: {torso_follow: 0.5}); options given on the command line win.")]
Sets = Annotated[Optional[List[str]], typer.Option(
    "--set", help="Override one setting, e.g. --set skinning.torso_follow=0.5 (YAML values; after --config).")]
AvatarOut = Annotated[Optional[Path], typer.Option(
    "--out", "-o", help="Output folder: results go to <out>/<the avatar's item>/. Default: the folder that holds "
    "the avatar's item folder (next to the avatar).")]


# name -> (annotated type, default) of the options ``with_common`` adds to a command.
COMMON = {"device": (Device, "auto"), "renderer": (Renderer, "auto"), "shard": (Shard, None), "force": (Force, False),
          "fail_fast": (FailFast, False), "quiet": (Quiet, False), "log_json": (LogJson, False),
          "verbose": (Verbose, False), "config": (SettingsFile, None), "sets": (Sets, None)}
CONSOLE = ("quiet", "log_json", "verbose")


@dataclasses.dataclass
class Common:
    """The common options of one command run (those it takes; the others keep these defaults) and its console."""

    device: str = "auto"
    renderer: str = "auto"
    shard: Optional[str] = None
    force: bool = False
    fail_fast: bool = False
    quiet: bool = False
    log_json: bool = False
    verbose: bool = False
    config: Optional[Path] = None
    sets: Optional[list[str]] = None
    ui: Optional[UI] = None

    def settings(self, cls, **given):
        """``cls`` from its defaults <- --config <- --set <- the options the user gave (None: not given)."""
        from pipelines.config import load_config

        given = {k: v for k, v in given.items() if v is not None}
        if self.config is None and not self.sets:
            return cls(**given)
        return dataclasses.replace(load_config(cls, self.config, list(self.sets or [])), **given)

    def setting_overrides(self, cls) -> dict:
        """The fields of ``cls`` that --config / --set change from its defaults (for stages built from keywords)."""
        base, default = self.settings(cls), cls()
        return {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)
                if getattr(base, f.name) != getattr(default, f.name)}


def with_common(*names: str):
    """Give a command the common options ``names`` and --quiet / --log-json / --verbose, declared once (``COMMON``)
    so that every command takes them alike, also after the sub-command. The command receives them as one
    ``common: Common`` argument: its console started (``_start``), the device resolved, the renderer checked."""

    def decorate(func):
        sig = inspect.signature(func, eval_str=True)
        added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=COMMON[n][1], annotation=COMMON[n][0])
                 for n in (*names, *CONSOLE)]

        @functools.wraps(func)
        def command(**kwargs):
            common = Common(**{n: kwargs.pop(n) for n in (*names, *CONSOLE)})
            common.ui = _start(common.quiet, common.log_json, common.verbose)
            try:
                if "device" in names:
                    common.device = resolve_device(common.device)  # "auto" -> "cuda" or "cpu"
                if common.renderer not in RENDERERS:
                    raise ConfigError(f"--renderer '{common.renderer}' is not one of {', '.join(RENDERERS)}")
            except FhavatarError as e:
                fail(e)
            return func(**kwargs, common=common)

        command.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "common"]
                                            + added)
        return command

    return decorate


class State:
    ui = UI()
    flags = {"quiet": False, "log_json": False, "verbose": False}  # as given before the sub-command


@app.callback()
def main(quiet: Quiet = False, log_json: LogJson = False, verbose: Verbose = False) -> None:
    State.flags = {"quiet": quiet, "log_json": log_json, "verbose": verbose}
    State.ui = UI(quiet=quiet, log_json=log_json)
    # Until a batch takes them over: a job pre-empted while models load exits 130 too, as documented.
    exit_on_signal(lambda name: State.ui.error(f"interrupted by {name}: stopped, nothing half-written remains "
                                               "— re-run the same command to continue"))


def _start(quiet: bool, log_json: bool, verbose: bool) -> UI:
    """This command's console, from the global flags given before or after the sub-command; unless --verbose, the
    native logs of third-party libraries are filtered out of stderr from here on."""
    flags = State.flags
    State.ui = UI(quiet=quiet or flags["quiet"], log_json=log_json or flags["log_json"])
    if not (verbose or flags["verbose"]):
        silence_native_logs()
    return State.ui


def defaults_from(*sources: str, **renamed: str) -> type[TyperCommand]:
    """A command class whose --help shows the defaults that the stage dataclasses own.

    Options declared with default None take the dataclass's default when omitted (``_config``), so each default
    has one owner; the dataclasses (and torch behind them) are imported only when help is shown, keeping start-up
    fast. ``sources``: "module:Class" searched for a field named like the option; ``renamed``: option name ->
    "module:Class.field".
    """

    class Command(TyperCommand):
        owners = (sources, renamed)

        def format_help(self, ctx, formatter) -> None:
            for param in self.params:
                value = owned_default(self, param.name)
                if param.default is None and value is not None:
                    param.show_default = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            super().format_help(ctx, formatter)

    return Command


def owned_default(command, name: str):
    """The default a stage dataclass gives option ``name`` of a ``defaults_from`` command (None: no owner there)."""
    sources, renamed = getattr(command, "owners", ((), {}))
    where = [renamed[name]] if name in renamed else [f"{s}.{name}" for s in sources]
    for spec in where:
        module, _, attr = spec.partition(":")
        cls_name, _, field_name = attr.partition(".")
        fields = {f.name: f for f in dataclasses.fields(getattr(importlib.import_module(module), cls_name))}
        f = fields.get(field_name)
        if f is not None:
            return f.default_factory() if f.default is dataclasses.MISSING else f.default
    return None


TrackingFile = Annotated[Optional[Path], typer.Option(
    "--tracking-config", help="YAML/JSON file of tracker settings (TrackingConfig fields), e.g. "
    "configs/tracking_ict_jaw.yaml; default: the tracker's defaults.")]


def _tracking_config(path: Path | None):
    """The TrackingConfig of a ``--tracking-config`` file (None: the defaults)."""
    if path is None:
        return None
    from pipelines.config import load_config
    from pipelines.tracking.config import TrackingConfig

    if not path.is_file():
        raise ConfigError(f"--tracking-config {path} is not a file", "give a YAML or JSON file of TrackingConfig fields")
    return load_config(TrackingConfig, path)


def _config(cls, **given):
    """``cls`` built from the options the user gave (None: not given, the dataclass's default applies)."""
    return cls(**{k: v for k, v in given.items() if v is not None})


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
    """A colour in [0, 1]: a name, #RRGGBB, or r,g,b in [0, 1] (or 0..255 integers)."""
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
        if len(vals) == 3 and all(0 <= v <= 255 and v == int(v) for v in vals):
            return tuple(v / 255.0 for v in vals)  # type: ignore[return-value]
    except ValueError:
        pass
    raise ConfigError(f"colour '{text}' not understood", "use white, black, grey, #RRGGBB or r,g,b in [0,1]")


def _color(text: str | None) -> tuple[float, float, float] | None:
    return None if text is None else parse_color(text)


COMPLETE_HELP = ("Complete what the photo never showed: hair and skin colour from the visible ones, a hair volume "
                 "fitted to the matte, no see-through back (pipelines/avatar/complete.py).")
REFINE_HELP = ("Fit each avatar to its source view: N Adam steps, or auto (a measured number on CUDA, 0 on the CPU). "
               "Default: ReconstructConfig's (pipelines/reconstruct.py).")


# --------------------------------------------------------------------------------------------- inputs and outputs
def _output_folder(folder: Path, option: str = "--out") -> Path:
    """Create ``folder`` and check that files can be written in it: else one line (exit 2) before any work."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{option} '{folder}' is a file, not a folder", f"pass a folder to {option}")
    fix = f"choose a writable {option} folder"
    try:
        ensure_dir(folder)
    except InputError as e:
        raise InputError(e.what, fix) from e
    except OSError as e:  # not one of the errnos ensure_dir words itself (e.g. ENOENT under /proc)
        raise InputError(f"cannot create {option} folder '{folder}': {(e.strerror or str(e)).lower()}", fix) from e
    try:
        fd, probe = tempfile.mkstemp(prefix=".fhavatar-write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"cannot write into {option} folder '{folder}': {(e.strerror or str(e)).lower()}", fix) from e
    return folder


def _output_file(path: Path, option: str = "--output") -> Path:
    """An output file the user named: its folder must be writable (checked before any work, exit 2)."""
    if path.is_dir():
        raise InputError(f"{option} '{path}' is a folder", f"{option} names a file, e.g. {path / 'video.mp4'}")
    _output_folder(path.parent, option)
    return path


def _single_outputs(output: Path | None, png_dir: Path | None, n: int, what: str) -> None:
    """--output and --png-dir name the outputs of a single input, in writable places (else exit 2, up front)."""
    for option, value in (("--output", output), ("--png-dir", png_dir)):
        if value is not None and n > 1:
            raise ConfigError(f"{option} names one output but {n} {what} were given",
                              f"omit {option}: each input gets its own folder in its item")
    if output is not None:
        _output_file(output)
    if png_dir is not None:
        _output_folder(png_dir, "--png-dir")


def _avatar_path(spec: str) -> Path:
    p = Path(spec)
    for cand in (p, p / "avatar" / "avatar.npz", p / "avatar.npz"):
        if cand.is_file():
            return cand
    raise InputError(f"avatar '{spec}' not found",
                     "pass an avatar.npz or an item folder made by `fhavatar reconstruct`")


def _avatars(specs: List[str]) -> list[Path]:
    """The avatar file of every argument, each once; a missing one is bad usage (exit 2) before any work."""
    seen: set[Path] = set()
    paths = []
    for spec in specs:
        p = _avatar_path(spec)
        if p.resolve() not in seen:
            seen.add(p.resolve())
            paths.append(p)
    return paths


def _is_item_folder(p: Path) -> bool:
    """A folder written by fhavatar for one input (it holds preprocess/ or a tracking file), not a folder of inputs."""
    return p.is_dir() and ((p / "preprocess" / "tracking.npz").is_file() or (p / "tracking.npz").is_file())


def _select(inputs: List[str], exts, shard: Optional[str]) -> list[Path]:
    """Expand files, folders, globs and @lists (keeping fhavatar item folders whole), then take this shard."""
    from pipelines.store import expand_inputs, parse_shard, select_shard

    items: list[Path] = []
    for spec in inputs:
        items += [Path(spec)] if _is_item_folder(Path(spec)) else expand_inputs([spec], exts)
    i, n = parse_shard(shard)
    return select_shard(items, i, n)


def _is_video(p: Path) -> bool:
    from pipelines.store import VIDEO_EXTS

    return p.is_file() and p.suffix.lower() in VIDEO_EXTS


def _load_head(head_model: str, device: str, weights: str | None = None):
    """The head model; ``auto`` follows the network weights in use (``weights``, None: the default file)."""
    from pipelines.head.registry import load_head_model

    return load_head_model(head_model, device=device, weights=weights)


def _finish(results) -> None:
    from pipelines.batch import exit_code

    ui = State.ui
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    ui.event("summary", **counts)
    if not ui.log_json and not ui.quiet:
        ui.out.print(f"[bold]{len(results)} item(s):[/] {summary}")
    raise typer.Exit(exit_code(results))


# ------------------------------------------------------------------------------------------------------ commands
@app.command(cls=defaults_from("pipelines.turntable:TurntableConfig"))
@with_common("device", "renderer", "shard", "force", "fail_fast", "config", "sets")
def turntable(
    avatars: List[str] = typer.Argument(..., help="avatar.npz files (or item folders holding avatar/avatar.npz)."),
    out: AvatarOut = None,
    output: Output = None,
    png_dir: PngDir = None,
    no_video: bool = typer.Option(False, "--no-video", help="Only the PNG sequence."),
    frames: Optional[int] = typer.Option(None, help="Number of frames in the orbit."),
    size: Optional[int] = typer.Option(None, help="Resolution (square)."),
    fps: Optional[float] = typer.Option(None, help="Frames per second."),
    yaw_range: Optional[float] = typer.Option(None, help="Degrees swept."),
    pitch: Optional[float] = typer.Option(None, help="Camera elevation in degrees."),
    pitch_amplitude: Optional[float] = typer.Option(None, help="Sinusoidal pitch wobble in degrees."),
    radius: Optional[float] = typer.Option(None, help="Camera distance in metres (PanoHead framing at our scale)."),
    fov: Optional[float] = typer.Option(None, help="Vertical field of view in degrees (EG3D/PanoHead focal 4.2647)."),
    background: Optional[str] = typer.Option(None, help="white, black, grey, #RRGGBB or r,g,b."),
    expression: Optional[str] = typer.Option(None, help="source (the photo's expression) or neutral."),
    *,
    common: Common,
) -> None:
    """Render a 360-degree orbit of each avatar to mp4 and/or PNGs (<item>/turntable/turntable.mp4)."""
    ui, dev = common.ui, common.device
    from pipelines.batch import run_batch
    from pipelines.stages import avatar_item_dir, turntable_item
    from pipelines.store import parse_shard, select_shard
    from pipelines.turntable import TurntableConfig, run_turntable

    try:
        cfg = common.settings(TurntableConfig, frames=frames, size=size, fps=fps, yaw_range=yaw_range, pitch=pitch,
                              pitch_amplitude=pitch_amplitude, radius=radius, fov=fov,
                              background=_color(background), expression=expression)
        paths = _avatars(avatars)
        _single_outputs(output, png_dir, len(paths), "avatars")
        if out is not None:
            _output_folder(out)
        mine = select_shard(paths, *parse_shard(common.shard))
    except FhavatarError as e:
        fail(e)

    def job_for(path: Path):
        def job():
            with ui.progress(f"turntable {path.name}", cfg.frames) as advance:
                if no_video:
                    n = run_turntable(path, None, png_dir, cfg, backend=common.renderer, device=dev, progress=advance)
                    return "done", {"frames": n}
                return turntable_item(path, cfg, output, png_dir, common.renderer, dev, advance, common.force, out=out)
        return job

    _finish(run_batch([(str(p), avatar_item_dir(p, out).name, job_for(p)) for p in mine], on_result=ui.item,
                      fail_fast=common.fail_fast))


@app.command(cls=defaults_from("pipelines.preprocess.config:PreprocessConfig"))
@with_common("device", "shard", "force", "fail_fast")
def preprocess(
    inputs: List[str] = typer.Argument(..., help="Photos, videos, folders, globs or @list.txt."),
    out: Out = Path("fhavatar_out"),
    size: Optional[int] = typer.Option(None, help="Crop size in pixels."),
    background: Optional[str] = typer.Option(None, help="Composite background colour."),
    max_frames: Optional[int] = typer.Option(None, help="Keep at most this many frames per video."),
    stride: Optional[int] = typer.Option(None, help="Keep every n-th frame."),
    fps: Optional[float] = typer.Option(None, help="Resample videos to this frame rate."),
    face_index: Optional[int] = typer.Option(None, help="Which face when several: 0 = largest."),
    overlay: Optional[str] = typer.Option(None, help="Also draw the tracked mesh + landmarks over the frames "
                                          "(overlay.mp4 / overlay.png): shaded, wireframe or none (landmarks only)."),
    landmarks: str = typer.Option("mediapipe", help="Landmarks the head model is tracked on: mediapipe (478-point "
                                  "mesh), dlib (68 points, shipped) or fan (68 points, FAN 2DFAN-4: needs "
                                  "face-alignment and its weights already in the torch hub cache)."),
    photometric: bool = typer.Option(False, "--photometric", help="Refine the tracking of videos with the frames' "
                                     "colours (face-skin vertices keep one colour across frames); ~0.3 s per frame "
                                     "on a CPU core. Writes photometric.json."),
    head_model: HeadModel = "auto",
    tracking_config: TrackingFile = None,
    *,
    common: Common,
) -> None:
    """Crop, align, matte, estimate the camera and track the head model (frames, mattes, landmarks, tracking)."""
    ui = common.ui
    from pipelines.batch import run_batch
    from pipelines.preprocess.config import PreprocessConfig
    from pipelines.preprocess.landmarks68 import require_landmark_source
    from pipelines.tracking.photometric import PhotometricConfig
    from pipelines.stages import preprocess_item
    from pipelines.store import IMAGE_EXTS, VIDEO_EXTS, item_id

    try:
        items = _select(inputs, IMAGE_EXTS + VIDEO_EXTS, common.shard)
        _output_folder(out)
        bg = _color(background)
        cfg = _config(PreprocessConfig, size=size, background=None if bg is None else
                      tuple(int(round(c * 255)) for c in bg), max_frames=max_frames, stride=stride, fps=fps,
                      face_index=face_index)
        require_landmark_source(landmarks)  # an unavailable model fails here, once, not per item
        photo_cfg = PhotometricConfig() if photometric else None
        tracking_cfg = _tracking_config(tracking_config)
        head = _load_head(head_model, "cpu")
    except FhavatarError as e:
        fail(e)

    def job_for(path: Path):
        def job():
            with ui.progress(f"preprocess {path.name}", None) as advance:
                return preprocess_item(path, out, head, cfg, tracking_cfg, progress=advance, force=common.force,
                                       overlay=overlay,
                                       landmarks=landmarks, photometric=photo_cfg)
        return job

    _finish(run_batch([(str(p), item_id(p), job_for(p)) for p in items], on_result=ui.item, fail_fast=common.fail_fast))


_PRUNE = "pipelines.avatar.prune:PruneConfig"


@app.command(cls=defaults_from("pipelines.reconstruct:ReconstructConfig", prune_opacity=f"{_PRUNE}.min_opacity",
                               prune_contribution=f"{_PRUNE}.min_contribution",
                               max_gaussians=f"{_PRUNE}.max_gaussians"))
@with_common("device", "renderer", "shard", "force", "fail_fast")
def reconstruct(
    inputs: List[str] = typer.Argument(..., help="Photos, videos or preprocessed item folders (globs, @list.txt)."),
    out: Out = Path("fhavatar_out"),
    method: Optional[str] = typer.Option(None, help="network (FHAvatar), unproject (no network) or template."),
    weights: Optional[str] = typer.Option(None, help="Network checkpoint (.safetensors); 'random' = untrained. "
                                          "Default: $FHAVATAR_WEIGHTS, then weights/fhavatar_default.safetensors."),
    prior: Optional[str] = typer.Option(None, help="Global prior: builtin or panohead (user-supplied checkpoint)."),
    refine_steps: Optional[str] = typer.Option(None, help=REFINE_HELP),
    source_frame: Optional[int] = typer.Option(None, help="Which frame of a video is the source."),
    uv_size: Optional[int] = typer.Option(None, help="UV map size K. With --method network the checkpoint sets K "
                                          "(a different --uv-size is refused)."),
    ply: bool = typer.Option(False, "--ply", help="Also export a standard 3DGS .ply."),
    prune_opacity: Optional[float] = typer.Option(None, help="Drop Gaussians below this opacity (1/255: never "
                                                  "drawn)."),
    prune_contribution: Optional[float] = typer.Option(None, help="Drop Gaussians that draw less than this (pixels "
                                                       "at 512², largest over orbit views and poses; 0 = off)."),
    max_gaussians: Optional[int] = typer.Option(None, help="Keep at most this many Gaussians, by contribution "
                                                "(0 = no cap)."),
    complete: Optional[bool] = typer.Option(None, "--complete/--no-complete", help=COMPLETE_HELP),
    head_model: HeadModel = "auto",
    *,
    common: Common,
) -> None:
    """Build avatars (avatar/avatar.npz) from portraits: preprocesses raw inputs first (or reuses their preprocess)."""
    ui, dev = common.ui, common.device
    from pipelines.batch import run_batch
    from pipelines.avatar.prune import PruneConfig
    from pipelines.reconstruct import ReconstructConfig, with_network
    from pipelines.stages import reconstruct_item
    from pipelines.store import IMAGE_EXTS, VIDEO_EXTS

    try:
        prune = _config(PruneConfig, min_opacity=prune_opacity, min_contribution=prune_contribution,
                        max_gaussians=max_gaussians)
        cfg = _config(ReconstructConfig, method=method, uv_size=uv_size, source_frame=source_frame,
                      refine_steps=refine_steps, weights=weights, prior=prior, prune=prune,
                      complete=complete).validate()
        items = _select(inputs, IMAGE_EXTS + VIDEO_EXTS, common.shard)
        _output_folder(out)
        head = _load_head(head_model, dev, cfg.weights)
        cfg, net = with_network(cfg, dev, uv_size, head)  # the weights are checked once, before any item (exit 3)
    except FhavatarError as e:
        fail(e)

    def job_for(spec: Path):
        def job():
            with ui.progress(f"reconstruct {spec.name}", None) as advance:
                return reconstruct_item(spec, out, head, cfg, dev, lambda c: net, progress=advance, force=common.force,
                                        export_ply=ply, backend=common.renderer)
        return job

    _finish(run_batch([(str(p), p.name, job_for(p)) for p in items], on_result=ui.item, fail_fast=common.fail_fast))


@app.command(cls=defaults_from("pipelines.reenact:ReenactConfig"))
@with_common("device", "renderer", "shard", "force", "fail_fast", "config", "sets")
def reenact(
    avatar: str = typer.Argument(..., help="avatar.npz (or its item folder)."),
    driving: List[str] = typer.Argument(..., help="Driving videos, tracking .npz files or preprocessed folders."),
    out: AvatarOut = None,
    output: Output = None,
    png_dir: PngDir = None,
    motion: Optional[str] = typer.Option(None, help="relative (cross-identity) or absolute (self-reenactment)."),
    camera: Optional[str] = typer.Option(None, help="driving, source or orbit."),
    size: Optional[int] = typer.Option(None, help="Resolution."),
    fps: Optional[float] = typer.Option(None, help="Frames per second."),
    max_frames: Optional[int] = typer.Option(None, help="Use at most N driving frames (0 = all)."),
    background: Optional[str] = typer.Option(None, help="white, black, grey, #RRGGBB or r,g,b."),
    head_model: Annotated[str, typer.Option(help="Head model for tracking driving videos: auto (the avatar's), "
                                            "ict, flame or embedded.")] = "auto",
    *,
    common: Common,
) -> None:
    """Drive an avatar with videos or tracked motion and render it (mp4, optional PNG + alpha)."""
    ui, dev = common.ui, common.device
    from pipelines.batch import run_batch
    from pipelines.avatar.head import avatar_head_kind
    from pipelines.reenact import ReenactConfig, check_driving_files
    from pipelines.stages import avatar_item_dir, reenact_item
    from pipelines.store import VIDEO_EXTS

    try:
        avatar_path = _avatar_path(avatar)
        cfg = common.settings(ReenactConfig, size=size, fps=fps, motion=motion, camera=camera,
                              background=_color(background), max_frames=max_frames)
        specs = _select(driving, VIDEO_EXTS + (".npz",), common.shard)
        _single_outputs(output, png_dir, len(specs), "driving inputs")
        root = _output_folder(out if out is not None else avatar_item_dir(avatar_path).parent)
        # Tracked motion is checked against the avatar now, naming the file; videos once they are tracked.
        check_driving_files(avatar_path, [s for s in specs if not _is_video(s)])
        head = _load_head(avatar_head_kind(avatar_path) if head_model == "auto" else head_model, dev)
    except FhavatarError as e:
        fail(e)

    def job_for(spec: Path):
        def job():
            with ui.progress(f"reenact {spec.name}", cfg.max_frames or None) as advance:
                return reenact_item(avatar_path, spec, root, head, cfg, output, png_dir, common.renderer, dev, advance,
                                    common.force)
        return job

    _finish(run_batch([(str(s), s.name, job_for(s)) for s in specs], on_result=ui.item, fail_fast=common.fail_fast))


@app.command()
@with_common()
def status(
    out: Path = typer.Argument(..., help="An output folder of fhavatar."),
    inputs: Optional[List[str]] = typer.Argument(None, help="The batch's inputs (files, folders, globs, @list.txt): "
                                                 "also lists those not started yet (hashes each input)."),
    *,
    common: Common,
) -> None:
    """Per item of an output folder: done / failed / running (by whom) / interrupted per stage, reenactments and
    evaluations counted by outcome, and (given the inputs) the items not started yet."""
    from rich.table import Table

    from pipelines.status import MULTI_STAGES, NOT_STARTED, STAGES, collect_status, counts, totals
    from pipelines.store import IMAGE_EXTS, VIDEO_EXTS, expand_inputs, item_id

    ui = common.ui
    try:
        if not out.is_dir():
            raise ConfigError(f"output folder '{out}' not found")
        given = []
        for spec in inputs or []:
            paths = [Path(spec)] if _is_item_folder(Path(spec)) else expand_inputs([spec], IMAGE_EXTS + VIDEO_EXTS)
            given += [(str(p), p.name if p.is_dir() else item_id(p)) for p in paths]
    except FhavatarError as e:
        fail(e)
    rows = collect_status(out, given)

    def cell(st) -> str:
        if st is None:
            return "-"
        return st.state + (f" ({st.holder})" if st.holder else "") + (f": {st.error[:40]}" if st.error else "")

    table = Table("item", *STAGES, *MULTI_STAGES)
    for r in rows:
        if not r.started:
            rest = ["-"] * (len(STAGES) - 1 + len(MULTI_STAGES))
            table.add_row(f"{r.item} ({Path(r.input).name})", NOT_STARTED, *rest)
            ui.event("status", item=r.item, input=r.input, **{STAGES[0]: NOT_STARTED})
            continue
        multi = {s: counts(r.multi.get(s, {}).values()) for s in MULTI_STAGES}
        table.add_row(r.item, *(cell(r.stages.get(s)) for s in STAGES),
                      *(", ".join(f"{v} {k}" for k, v in multi[s].items()) or "-" for s in MULTI_STAGES))
        states = {s: r.stages[s].state if s in r.stages else "-" for s in STAGES}
        ui.event("status", item=r.item, input=r.input, **states, **multi,
                 errors={s: st.error for s, st in r.stages.items() if st.error},
                 running={s: st.holder for s, st in r.stages.items() if st.holder},
                 each={s: {k: v.state for k, v in r.multi.get(s, {}).items()} for s in MULTI_STAGES})
    summary = totals(rows)
    ui.event("summary", items=len(rows), **summary)
    if not ui.log_json:
        ui.out.print(table)
        ui.out.print("; ".join([f"{len(rows)} item(s)"] + [f"{s}: " + ", ".join(f"{v} {k}" for k, v in c.items())
                                                         for s, c in summary.items()]))

_EVAL, _RECON = "pipelines.evaluate.protocol:EvalConfig", "pipelines.reconstruct:ReconstructConfig"


@app.command(cls=defaults_from(protocol=f"{_EVAL}.protocol", size=f"{_EVAL}.size", max_frames=f"{_EVAL}.max_frames",
                               stride=f"{_EVAL}.stride", method=f"{_RECON}.method", uv_size=f"{_RECON}.uv_size",
                               refine_steps=f"{_RECON}.refine_steps"))
@with_common("device", "renderer", "shard", "force", "fail_fast", "config", "sets")
def evaluate(
    inputs: List[str] = typer.Argument(..., help="Videos (files, folders, globs, @list.txt)."),
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (one sub-folder per video, the reports "
                                      "at its top).")] = Path("fhavatar_eval"),
    protocol: Optional[str] = typer.Option(None, help="self (source = first frame, ground truth = the frames) or "
                                           "cross."),
    method: Optional[str] = typer.Option(None, help="network, unproject (no-network baseline) or template."),
    weights: Optional[str] = typer.Option(None, help="Network checkpoint; 'random' = untrained."),
    metrics: Optional[str] = typer.Option(None, help="Comma-separated subset of psnr,ssim,lpips,csim,akd,aed,apd."),
    full_frame: bool = typer.Option(False, "--full-frame", help="Score the full frame instead of the matted head."),
    size: Optional[int] = typer.Option(None, help="Frame and render size (the paper: 512)."),
    max_frames: Optional[int] = typer.Option(None, help="Frames kept per video, the source frame included."),
    stride: Optional[int] = typer.Option(None, help="Keep every n-th frame of each video."),
    uv_size: Optional[int] = typer.Option(None, help="UV map size K (unproject / template; the network's checkpoint "
                                          "sets its own)."),
    refine_steps: Optional[str] = typer.Option(None, help=REFINE_HELP),
    complete: Optional[bool] = typer.Option(None, "--complete/--no-complete", help=COMPLETE_HELP),
    merge: bool = typer.Option(False, "--merge", help="Only merge the shards' per-video results into the report."),
    head_model: HeadModel = "auto",
    tracking_config: TrackingFile = None,
    *,
    common: Common,
) -> None:
    """Run the paper's self- or cross-identity reenactment protocol and write JSON, CSV, markdown and pictures."""
    ui, dev = common.ui, common.device
    from pipelines.evaluate.protocol import run_evaluate
    from pipelines.reconstruct import ReconstructConfig, with_network

    recon = {k: v for k, v in (("uv_size", uv_size), ("refine_steps", refine_steps), ("complete", complete))
             if v is not None}
    given = {k: v for k, v in (("protocol", protocol), ("method", method), ("size", size), ("max_frames", max_frames),
                               ("stride", stride)) if v is not None}
    try:
        _output_folder(out)
        from pipelines.evaluate.protocol import EvalConfig

        # --config / --set name EvalConfig's fields; the options on the command line win.
        from_file = common.setting_overrides(EvalConfig)
        metrics = metrics or (",".join(from_file.pop("metrics")) if from_file.get("metrics") else None)
        full_frame = full_frame or not from_file.pop("foreground", True)
        file_renderer = from_file.pop("renderer", None)
        renderer = file_renderer if file_renderer and common.renderer == "auto" else common.renderer
        given = {**from_file, **given}
        if tracking_config is not None:
            given["tracking"] = _tracking_config(tracking_config)
        if not merge:  # the network's weights are checked once, up front (exit 3), and its K taken from them
            rc, _ = with_network(_config(ReconstructConfig, method=method, weights=weights, **recon).validate(),
                                 "cpu", uv_size)
            if rc.method == "network":
                recon["uv_size"] = rc.uv_size
    except FhavatarError as e:
        fail(e)
    with ui.progress(f"evaluate ({protocol or 'self'})", None) as advance:
        text, code = run_evaluate(
            inputs, out, weights=weights, metrics=[m.strip() for m in metrics.split(",")] if metrics else None,
            foreground=not full_frame, shard=common.shard, merge_only=merge, device=dev, renderer=renderer,
            head_model=head_model, force=common.force, fail_fast=common.fail_fast, progress=lambda msg: advance(1),
            on_result=ui.item, reconstruct_options=recon, **given,
        )
    if code in (EXIT_USAGE, EXIT_WEIGHTS):
        ui.error(text)
    elif ui.log_json:
        ui.event("report", markdown=text)
    else:
        typer.echo(text)
    raise typer.Exit(code)


@app.command()
@with_common("device", "renderer")
def train(
    data: List[Path] = typer.Argument(..., help="Preprocessed clip folders (or folders of them)."),
    out: Annotated[Path, typer.Option("--out", "-o", help="Training folder (resumed when present).")] =
    Path("fhavatar_train"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML/JSON TrainConfig file."),
    set_: List[str] = typer.Option([], "--set", help="Override a setting, e.g. --set iterations=3000 "
                                   "--set loss.lambda_3d=100 (values in YAML syntax)."),
    max_minutes: Optional[float] = typer.Option(None, help="Stop cleanly (checkpoint + weights) after this long."),
    stop_at: Optional[int] = typer.Option(None, help="Stop after this many steps (schedule unchanged)."),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore an existing checkpoint and start over."),
    init_weights: Optional[Path] = typer.Option(None, help="Without a checkpoint to resume: start from these "
                                                "network weights (fresh optimiser, step 0)."),
    *,
    common: Common,
) -> None:
    """Train the FHAvatar network (section 3.5) on preprocessed clips; resumes exactly from its last checkpoint.

    Under torchrun each process takes one GPU (--device auto)."""
    ui, dev = common.ui, common.device
    from pipelines.train.config import load_train_config
    from pipelines.train.loop import train as run_training

    try:
        cfg = load_train_config(config, list(set_))
    except FhavatarError as e:
        fail(e)
    last = {"step": 0}
    with ui.progress("train", cfg.iterations if stop_at is None else min(stop_at, cfg.iterations)) as advance:
        def progress(step: int, total: int, row: dict) -> None:
            advance(step - last["step"])
            last["step"] = step
            ui.event("train", step=step, **{k: round(float(v), 6) for k, v in row.items() if k != "step"})

        try:
            result = run_training(cfg, list(data), out, device=dev, resume=not fresh, max_minutes=max_minutes,
                                  progress=progress, stop_at_step=stop_at, backend=common.renderer,
                                  init_weights=init_weights)
        except FhavatarError as e:
            fail(e)
    ui.info(f"train: {result.step} steps ({result.stopped}); weights {result.weights}")
    ui.event("summary", step=result.step, stopped=result.stopped, weights=str(result.weights),
             validation=result.validation)


@app.command("run", cls=defaults_from("pipelines.reconstruct:ReconstructConfig",
                                      turntable_frames="pipelines.turntable:TurntableConfig.frames",
                                      size="pipelines.turntable:TurntableConfig.size"))
@with_common("device", "renderer", "shard", "force", "fail_fast")
def run_chain(
    inputs: List[str] = typer.Argument(..., help="Portraits / videos (files, folders, globs, @list.txt)."),
    out: Out = Path("fhavatar_out"),
    driving: List[str] = typer.Option([], "--driving", "-d", help="Driving videos or tracking files (repeatable)."),
    turntable_frames: Optional[int] = typer.Option(None, help="Turntable frames (0 = no turntable)."),
    size: Optional[int] = typer.Option(None, help="Render resolution (reenactments and turntables)."),
    method: Optional[str] = typer.Option(None, help="Reconstruction method: network, unproject or template."),
    weights: Optional[str] = typer.Option(None, help="Network checkpoint (default: the embedded weights)."),
    head_model: HeadModel = "auto",
    *,
    common: Common,
) -> None:
    """Chain preprocess -> reconstruct -> reenact (each --driving input) -> turntable for every input."""
    ui, dev = common.ui, common.device
    from pipelines.batch import run_batch
    from pipelines.reconstruct import ReconstructConfig, with_network
    from pipelines.reenact import ReenactConfig, check_driving, driving_tracking
    from pipelines.stages import reconstruct_item, reenact_item, turntable_item
    from pipelines.store import IMAGE_EXTS, VIDEO_EXTS
    from pipelines.turntable import TurntableConfig

    try:
        items = _select(inputs, IMAGE_EXTS + VIDEO_EXTS, common.shard)
        drivers = _select(driving, VIDEO_EXTS + (".npz",), "0/1") if driving else []  # every task drives with all
        _output_folder(out)
        head = _load_head(head_model, dev, weights)
        for d in drivers:  # tracked motion must fit the avatars this run makes (with ``head``)
            if not _is_video(d):
                check_driving(driving_tracking(d), str(d), head.name, head.n_shape, head.n_expr)
        rcfg = _config(ReenactConfig, size=size)
        tcfg = None if turntable_frames == 0 else _config(TurntableConfig, frames=turntable_frames, size=size)
        cfg, net = with_network(_config(ReconstructConfig, method=method, weights=weights).validate(), dev, None, head)
    except FhavatarError as e:
        fail(e)

    def job_for(spec: Path):
        def job():
            status, outputs = reconstruct_item(spec, out, head, cfg, dev, lambda c: net, force=common.force,
                                               backend=common.renderer)
            avatar = Path(outputs["avatar"])
            for d in drivers:
                with ui.progress(f"reenact {spec.name} <- {d.name}", None) as advance:
                    reenact_item(avatar, d, out, head, rcfg, None, None, common.renderer, dev, advance, common.force)
            if tcfg is not None:
                with ui.progress(f"turntable {spec.name}", tcfg.frames) as advance:
                    turntable_item(avatar, tcfg, None, None, common.renderer, dev, advance, common.force, out=out)
            return status, outputs
        return job

    _finish(run_batch([(str(p), p.name, job_for(p)) for p in items], on_result=ui.item, fail_fast=common.fail_fast))


if __name__ == "__main__":
    app()
