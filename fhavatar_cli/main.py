"""fhavatar: one portrait photo -> animatable 3D full-head Gaussian avatar.

Commands read and write artifacts under an output folder (``--out``); re-running skips finished work.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from pipelines.batch import EXIT_USAGE, EXIT_WEIGHTS
from pipelines.errors import ConfigError, FhavatarError, WeightsError
from pipelines.store import ensure_dir

from .native_logs import silence_native_logs
from .ui import UI

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help=__doc__, context_settings={"help_option_names": ["-h", "--help"]})


class State:
    ui = UI()


@app.callback()
def main(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors."),
    log_json: bool = typer.Option(False, "--log-json", help="Line-delimited JSON events on stdout (cluster logs)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show the native logs of MediaPipe, TFLite and "
                                 "ffmpeg (hidden by default)."),
) -> None:
    State.ui = UI(quiet=quiet, log_json=log_json)
    if not verbose:
        silence_native_logs()


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
    force: bool = typer.Option(False, help="Redo finished turntables."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Render a 360-degree orbit of an avatar to mp4 and/or PNGs."""
    from pipelines.batch import exit_code, run_batch
    from pipelines.stages import turntable_item
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
            with ui.progress(f"turntable {Path(spec).name}", cfg.frames) as advance:
                if no_video:
                    n = run_turntable(path, None, png_dir, cfg, backend=renderer, device=dev, progress=advance)
                    return "done", {"frames": n}
                return turntable_item(path, cfg, output, png_dir, renderer, dev, advance, force)
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



# ------------------------------------------------------------------------------------------------ shared options
def _out_option(default: str = "fhavatar_out"):
    return typer.Option(Path(default), "--out", "-o", help="Output folder (one sub-folder per input item).")


SHARD_HELP = ("This job's part of the inputs, i/n (0-based). Default: from SLURM_ARRAY_TASK_ID/COUNT "
              "(or SGE/LSF/PBS equivalents), else all inputs.")


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


def _load_head(head_model: str, device: str):
    from pipelines.head.registry import load_head_model

    return load_head_model(head_model, device=device)


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


@app.command()
def preprocess(
    inputs: List[str] = typer.Argument(..., help="Photos, videos, folders, globs or @list.txt."),
    out: Path = _out_option(),
    size: int = typer.Option(512, help="Crop size in pixels."),
    background: str = typer.Option("white", help="Composite background colour."),
    max_frames: Optional[int] = typer.Option(None, help="Keep at most this many frames per video."),
    stride: int = typer.Option(1, help="Keep every n-th frame."),
    fps: Optional[float] = typer.Option(None, help="Resample videos to this frame rate."),
    face_index: int = typer.Option(0, help="Which face when several: 0 = largest."),
    overlay: Optional[str] = typer.Option(None, help="Also draw the tracked mesh + landmarks over the frames "
                                          "(overlay.mp4 / overlay.png): shaded, wireframe or none (landmarks only)."),
    landmarks: str = typer.Option("mediapipe", help="Landmarks the head model is tracked on: mediapipe (478-point "
                                  "mesh), dlib (68 points, shipped) or fan (68 points, FAN 2DFAN-4: needs "
                                  "face-alignment and its weights already in the torch hub cache)."),
    photometric: bool = typer.Option(False, "--photometric", help="Refine the tracking of videos with the frames' "
                                     "colours (face-skin vertices keep one colour across frames); ~0.3 s per frame "
                                     "on a CPU core. Writes photometric.json."),
    head_model: str = typer.Option("auto", help="auto (FLAME if found, else embedded), flame or embedded."),
    shard: Optional[str] = typer.Option(None, help=SHARD_HELP),
    force: bool = typer.Option(False, help="Redo finished items."),
    fail_fast: bool = typer.Option(False, help="Stop at the first failed item."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N (tracking)."),
) -> None:
    """Crop, align, matte, estimate the camera and track the head model (frames, mattes, landmarks, tracking)."""
    from pipelines.batch import run_batch
    from pipelines.preprocess.config import PreprocessConfig
    from pipelines.preprocess.landmarks68 import require_landmark_source
    from pipelines.tracking.photometric import PhotometricConfig
    from pipelines.stages import preprocess_item
    from pipelines.store import IMAGE_EXTS, VIDEO_EXTS, item_id

    ui = State.ui
    try:
        items = _select(inputs, IMAGE_EXTS + VIDEO_EXTS, shard)
        ensure_dir(out)
        bg = tuple(int(round(c * 255)) for c in parse_color(background))
        cfg = PreprocessConfig(size=size, background=bg, max_frames=max_frames, stride=stride, fps=fps,
                               face_index=face_index)
        require_landmark_source(landmarks)  # an unavailable model fails here, once, not per item
        photo_cfg = PhotometricConfig() if photometric else None
        head = _load_head(head_model, "cpu")
        resolve_device(device)
    except FhavatarError as e:
        fail(e)

    def job_for(path: Path):
        def job():
            with ui.progress(f"preprocess {path.name}", None) as advance:
                return preprocess_item(path, out, head, cfg, progress=advance, force=force, overlay=overlay,
                                       landmarks=landmarks, photometric=photo_cfg)
        return job

    _finish(run_batch([(str(p), item_id(p), job_for(p)) for p in items], on_result=ui.item, fail_fast=fail_fast))


@app.command()
def reconstruct(
    inputs: List[str] = typer.Argument(..., help="Photos, videos or preprocessed item folders (globs, @list.txt)."),
    out: Path = _out_option(),
    method: str = typer.Option("network", help="network (FHAvatar), unproject (no network) or template."),
    weights: Optional[str] = typer.Option(None, help="Network checkpoint (.safetensors); 'random' = untrained. "
                                          "Default: $FHAVATAR_WEIGHTS, then weights/fhavatar_default.safetensors."),
    prior: str = typer.Option("builtin", help="Global prior: builtin or panohead (user-supplied checkpoint)."),
    refine_steps: int = typer.Option(0, help="Fine-tune the predicted maps on the source view for N steps."),
    source_frame: int = typer.Option(0, help="Which frame of a video is the source."),
    uv_size: int = typer.Option(256, help="UV map size K."),
    ply: bool = typer.Option(False, "--ply", help="Also export a standard 3DGS .ply."),
    head_model: str = typer.Option("auto", help="auto, flame or embedded."),
    shard: Optional[str] = typer.Option(None, help=SHARD_HELP),
    force: bool = typer.Option(False, help="Redo finished items."),
    fail_fast: bool = typer.Option(False, help="Stop at the first failed item."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Build avatars (avatar/avatar.npz) from portraits: preprocesses raw inputs first."""
    from pipelines.batch import run_batch
    from pipelines.reconstruct import ReconstructConfig
    from pipelines.stages import reconstruct_item
    from pipelines.store import IMAGE_EXTS, VIDEO_EXTS

    ui = State.ui
    try:
        cfg = ReconstructConfig(method=method, uv_size=uv_size, source_frame=source_frame, refine_steps=refine_steps,
                                weights=weights, prior=prior).validate()
        items = _select(inputs, IMAGE_EXTS + VIDEO_EXTS, shard)
        ensure_dir(out)
        dev = resolve_device(device)
        head = _load_head(head_model, dev)
        nets: dict = {}

        def net_loader(c):
            if "net" not in nets:
                from pipelines.network.weights import load_network

                nets["net"] = load_network(c.weights, dev, prior=c.prior if c.prior != "builtin" else None,
                                           config=_net_config_for(c))
            return nets["net"]

        if method == "network":
            from pipelines.network.weights import resolve_weights

            resolve_weights(weights)  # fail early, once, with the fix
    except FhavatarError as e:
        fail(e)

    def job_for(spec: Path):
        def job():
            with ui.progress(f"reconstruct {spec.name}", None) as advance:
                return reconstruct_item(spec, out, head, cfg, dev, net_loader, progress=advance, force=force,
                                        export_ply=ply)
        return job

    _finish(run_batch([(str(p), p.name, job_for(p)) for p in items], on_result=ui.item, fail_fast=fail_fast))


def _net_config_for(cfg):
    from pipelines.network.config import NetworkConfig

    return NetworkConfig(uv_size=cfg.uv_size, prior=cfg.prior)


@app.command()
def reenact(
    avatar: str = typer.Argument(..., help="avatar.npz (or its item folder)."),
    driving: List[str] = typer.Argument(..., help="Driving videos, tracking .npz files or preprocessed folders."),
    out: Path = _out_option(),
    output: Optional[Path] = typer.Option(None, "--output", help="mp4 path (single driving input)."),
    png_dir: Optional[Path] = typer.Option(None, "--png-dir", help="Also write RGBA PNGs here."),
    motion: str = typer.Option("relative", help="relative (cross-identity) or absolute (self-reenactment)."),
    camera: str = typer.Option("driving", help="driving, source or orbit."),
    size: int = typer.Option(512, help="Resolution."),
    fps: float = typer.Option(25.0),
    max_frames: int = typer.Option(0, help="Use at most N driving frames (0 = all)."),
    background: str = typer.Option("white"),
    renderer: str = typer.Option("auto", help=RENDERER_HELP),
    head_model: str = typer.Option("auto", help="Head model for tracking driving videos: auto, flame or embedded."),
    shard: Optional[str] = typer.Option(None, help=SHARD_HELP),
    force: bool = typer.Option(False, help="Redo finished reenactments."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Drive an avatar with videos or tracked motion and render it (mp4, optional PNG + alpha)."""
    from pipelines.batch import run_batch
    from pipelines.reenact import ReenactConfig
    from pipelines.stages import reenact_item
    from pipelines.store import VIDEO_EXTS

    ui = State.ui
    try:
        dev = resolve_device(device)
        avatar_path = _avatar_path(avatar)
        cfg = ReenactConfig(size=size, fps=fps, motion=motion, camera=camera, background=parse_color(background),
                            max_frames=max_frames)
        specs = _select(driving, VIDEO_EXTS + (".npz",), shard)
        ensure_dir(out)
        head = _load_head(head_model, dev)
        if output is not None and len(specs) > 1:
            raise ConfigError("--output names one file but several driving inputs were given", "omit --output")
    except FhavatarError as e:
        fail(e)

    def job_for(spec: Path):
        def job():
            with ui.progress(f"reenact {spec.name}", max_frames or None) as advance:
                return reenact_item(avatar_path, spec, out, head, cfg, output, png_dir, renderer, dev, advance, force)
        return job

    _finish(run_batch([(str(s), s.name, job_for(s)) for s in specs], on_result=ui.item))


@app.command()
def status(out: Path = typer.Argument(..., help="An output folder of fhavatar.")) -> None:
    """Summarize done / failed / running stages per item of an output folder."""
    from rich.table import Table

    from pipelines.store import Manifest

    ui = State.ui
    if not out.is_dir():
        fail(ConfigError(f"output folder '{out}' not found"))
    stages = ("preprocess", "avatar", "turntable", "eval")
    table = Table("item", *stages, "reenact")
    totals: dict[str, dict[str, int]] = {s: {} for s in stages + ("reenact",)}
    for item in sorted(p for p in out.iterdir() if p.is_dir()):
        row = []
        for s in stages:
            m = Manifest.load(item / s)
            st = m.status if m else ("-" if not (item / s).exists() else "incomplete")
            totals[s][st] = totals[s].get(st, 0) + 1
            row.append(st if not (m and m.error) else f"{st}: {m.error[:40]}")
        reen = sorted((item / "reenact").glob("*/manifest.json")) if (item / "reenact").is_dir() else []
        row.append(f"{len(reen)}" if reen else "-")
        table.add_row(item.name, *row)
        ui.event("status", item=item.name, **dict(zip(stages, row)))
    if not ui.log_json:
        ui.out.print(table)
        ui.out.print(", ".join(f"{s}: " + " ".join(f"{v} {k}" for k, v in c.items() if k != "-") for s, c in
                               totals.items() if any(k != "-" for k in c)))



@app.command()
def evaluate(
    inputs: List[str] = typer.Argument(..., help="Videos (files, folders, globs, @list.txt)."),
    out: Path = _out_option("fhavatar_eval"),
    protocol: str = typer.Option("self", help="self (source = first frame, ground truth = the frames) or cross."),
    method: str = typer.Option("network", help="network, unproject (no-network baseline) or template."),
    weights: Optional[str] = typer.Option(None, help="Network checkpoint; 'random' = untrained."),
    metrics: Optional[str] = typer.Option(None, help="Comma-separated subset of psnr,ssim,lpips,csim,akd,aed,apd."),
    full_frame: bool = typer.Option(False, "--full-frame", help="Score the full frame instead of the matted head."),
    size: int = typer.Option(512, help="Frame and render size (the paper: 512)."),
    max_frames: Optional[int] = typer.Option(None, help="Frames kept per video, the source frame included."),
    stride: int = typer.Option(1, help="Keep every n-th frame of each video."),
    uv_size: int = typer.Option(256, help="UV map size K (network / unproject)."),
    refine_steps: int = typer.Option(0, help="Fine-tune each avatar on its source view for N steps."),
    merge: bool = typer.Option(False, "--merge", help="Only merge the shards' per-video results into the report."),
    renderer: str = typer.Option("auto", help=RENDERER_HELP),
    head_model: str = typer.Option("auto", help="auto, flame or embedded."),
    shard: Optional[str] = typer.Option(None, help=SHARD_HELP),
    force: bool = typer.Option(False, help="Redo finished evaluations."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Run the paper's self- or cross-identity reenactment protocol and write JSON, CSV, markdown and pictures."""
    from pipelines.evaluate.protocol import run_evaluate

    ui = State.ui
    try:
        dev = resolve_device(device)
    except FhavatarError as e:
        fail(e)
    with ui.progress(f"evaluate ({protocol})", None) as advance:
        text, code = run_evaluate(
            inputs, out, protocol=protocol, method=method, weights=weights,
            metrics=[m.strip() for m in metrics.split(",")] if metrics else None, foreground=not full_frame,
            size=size, max_frames=max_frames, stride=stride, shard=shard, merge_only=merge, device=dev,
            renderer=renderer, head_model=head_model, force=force, progress=lambda msg: advance(1),
            on_result=ui.item, reconstruct_options={"uv_size": uv_size, "refine_steps": refine_steps},
        )
    if code in (EXIT_USAGE, EXIT_WEIGHTS):
        ui.error(text)
    elif ui.log_json:
        ui.event("report", markdown=text)
    else:
        typer.echo(text)
    raise typer.Exit(code)


@app.command()
def train(
    data: List[Path] = typer.Argument(..., help="Preprocessed clip folders (or folders of them)."),
    out: Path = typer.Option(Path("fhavatar_train"), "--out", "-o", help="Training folder (resumed when present)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML/JSON TrainConfig file."),
    set_: List[str] = typer.Option([], "--set", help="Override a setting, e.g. --set iterations=3000 "
                                   "--set loss.lambda_3d=100 (values in YAML syntax)."),
    max_minutes: Optional[float] = typer.Option(None, help="Stop cleanly (checkpoint + weights) after this long."),
    stop_at: Optional[int] = typer.Option(None, help="Stop after this many steps (schedule unchanged)."),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore an existing checkpoint and start over."),
    init_weights: Optional[Path] = typer.Option(None, help="Without a checkpoint to resume: start from these "
                                                "network weights (fresh optimiser, step 0)."),
    renderer: str = typer.Option("auto", help=RENDERER_HELP),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N (torchrun: one GPU per process)."),
) -> None:
    """Train the FHAvatar network (section 3.5) on preprocessed clips; resumes exactly from its last checkpoint."""
    from pipelines.train.config import load_train_config
    from pipelines.train.loop import train as run_training

    ui = State.ui
    try:
        dev = resolve_device(device)
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
                                  progress=progress, stop_at_step=stop_at, backend=renderer,
                                  init_weights=init_weights)
        except FhavatarError as e:
            fail(e)
    ui.info(f"train: {result.step} steps ({result.stopped}); weights {result.weights}")
    ui.event("summary", step=result.step, stopped=result.stopped, weights=str(result.weights),
             validation=result.validation)


@app.command("run")
def run_chain(
    inputs: List[str] = typer.Argument(..., help="Portraits / videos (files, folders, globs, @list.txt)."),
    out: Path = _out_option(),
    driving: List[str] = typer.Option([], "--driving", "-d", help="Driving videos or tracking files (repeatable)."),
    turntable_frames: int = typer.Option(120, help="Turntable frames (0 = no turntable)."),
    size: int = typer.Option(512, help="Render resolution."),
    method: str = typer.Option("network", help="Reconstruction method: network, unproject or template."),
    weights: Optional[str] = typer.Option(None, help="Network checkpoint (default: the embedded weights)."),
    head_model: str = typer.Option("auto", help="auto, flame or embedded."),
    renderer: str = typer.Option("auto", help=RENDERER_HELP),
    shard: Optional[str] = typer.Option(None, help=SHARD_HELP),
    fail_fast: bool = typer.Option(False, help="Stop at the first failed item."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Chain preprocess -> reconstruct -> reenact (each --driving input) -> turntable for every input."""
    from pipelines.batch import run_batch
    from pipelines.reconstruct import ReconstructConfig
    from pipelines.reenact import ReenactConfig
    from pipelines.stages import reconstruct_item, reenact_item, turntable_item
    from pipelines.store import IMAGE_EXTS, VIDEO_EXTS
    from pipelines.turntable import TurntableConfig

    ui = State.ui
    try:
        items = _select(inputs, IMAGE_EXTS + VIDEO_EXTS, shard)
        drivers = _select(driving, VIDEO_EXTS + (".npz",), None) if driving else []
        ensure_dir(out)
        dev = resolve_device(device)
        head = _load_head(head_model, dev)
        cfg = ReconstructConfig(method=method, weights=weights).validate()
        if method == "network":
            from pipelines.network.weights import resolve_weights

            resolve_weights(weights)
    except FhavatarError as e:
        fail(e)
    nets: dict = {}

    def net_loader(c):
        if "net" not in nets:
            from pipelines.network.weights import load_network

            nets["net"] = load_network(c.weights, dev)
        return nets["net"]

    def job_for(spec: Path):
        def job():
            status, outputs = reconstruct_item(spec, out, head, cfg, dev, net_loader)
            avatar = Path(outputs["avatar"])
            for d in drivers:
                with ui.progress(f"reenact {spec.name} <- {d.name}", None) as advance:
                    reenact_item(avatar, d, out, head, ReenactConfig(size=size), None, None, renderer, dev, advance)
            if turntable_frames:
                tcfg = TurntableConfig(frames=turntable_frames, size=size)
                with ui.progress(f"turntable {spec.name}", tcfg.frames) as advance:
                    turntable_item(avatar, tcfg, None, None, renderer, dev, advance)
            return status, outputs
        return job

    _finish(run_batch([(str(p), p.name, job_for(p)) for p in items], on_result=ui.item, fail_fast=fail_fast))


if __name__ == "__main__":
    app()
