"""``train``: the training loop (paper section 3.5) with exact resume, validation and logs.

Output folder layout::

    <out>/config.json                 the TrainConfig used (a resumed run must use the same optimisation settings)
    <out>/notes.json                  data used, and what could not be done here (LPIPS, L_id, novel views, flip)
    <out>/train_log.csv               step, lr, every loss term (unweighted, averaged over the logging window),
                                      the weighted total, gradient norm, seconds per step
    <out>/val.csv                     step, clip, method (network | untrained | init | baseline), PSNR, SSIM,
                                      silhouette coverage and IoU (validate.py), frames
                                      ("init": the network at step 0 when it started from --init-weights)
    <out>/val_grid_<step>.png         source | target | ours | baseline, two targets per validation clip
    <out>/losses.png                  loss curves (PIL)
    <out>/checkpoints/last.pt         full training state (exact resume), written atomically
    <out>/fhavatar.safetensors        fp16 network weights with the config (what ``load_network`` reads)
    <out>/best.safetensors, best.json the weights at the validation with the highest mean PSNR so far (and its step),
                                      kept across resumed calls: validation is noisy and later is not always better

Multi-process: under ``torchrun`` (``WORLD_SIZE > 1``) the network is wrapped in DistributedDataParallel and
``batch_size`` is per process: process ``rank`` trains on its share of the step's global batch of
``batch_size * WORLD_SIZE`` samples (``data.rank_plans``), so N processes follow one process of batch N x B (up to
floating-point summation order; see tests/test_train_ddp.py). Rank 0 alone writes files and validates; the logged
losses are averaged over the ranks. Decisions that one rank could take alone (``--max-minutes`` on its own clock, a
non-finite loss) are taken by all ranks together at the same step (``distributed.any_rank``), so no rank is left
waiting in a gradient all-reduce. No rank returns before rank 0 has written its files, so a next ``train`` call on
the same folder resumes from the same checkpoint on every rank. Tested on the CPU with gloo (2 processes);
tools/ddp_scaling.py compares 2 GPUs with 1.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..avatar.head import weights_head_record
from ..errors import ConfigError
from ..head.base import HeadParams
from ..network.model import FHAvatarNet
from ..network.weights import save_checkpoint
from ..store import atomic_path, write_json
from ..uv.space import load_or_build_uv_space
from .checkpoint import load_training_state, save_training_state, unwrap
from .config import TrainConfig
from .data import find_items, load_clips, load_val_clip, make_batch, rank_plans, resize_images, split_items
from .distributed import all_ranks_int, any_rank, from_main, mean_over_ranks, setup
from .forward import predict_avatar, render_rig
from .losses import compute_losses, face_geometry, perceptual_backend, warn_skipped_terms
from .mirror import HeadMirror
from .plot import plot_losses, read_log
from .validate import comparison_grid, validate_baseline, validate_network

LOSS_TERMS = ("l1", "perceptual", "alpha", "id", "aux_perceptual", "aux_alpha", "3d", "eye", "pos", "shape",
              "shape_tv", "slide")
LOG_COLUMNS = ("step", "lr", "total", *LOSS_TERMS, "grad_norm", "sec_per_step")
VAL_COLUMNS = ("step", "clip", "method", "psnr", "ssim", "coverage", "iou", "frames")
PLOT_TERMS = ["total", "l1", "perceptual", "alpha", "id", "aux_perceptual", "3d", "eye", "pos", "shape_tv", "slide"]

Progress = Callable[[int, int, dict], None] | None

# The clock that ``max_minutes`` is measured on (a module attribute so that a test can skew one process's clock).
clock: Callable[[], float] = time.monotonic


@dataclass
class TrainResult:
    step: int  # completed steps
    stopped: str  # "done" | "time" | "stop_at"
    out_dir: Path
    weights: Path | None
    validation: dict = field(default_factory=dict)  # method -> clip -> {psnr, ssim, frames}


# ------------------------------------------------------------------------------------------------------- helpers
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _append_rows(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in columns})


def _truncate_log(path: Path, columns: tuple[str, ...], max_step: int) -> None:
    """Drop rows logged after ``max_step`` (a resumed run redoes those steps and logs them again)."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(float(r["step"])) <= max_step]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(columns))
            w.writeheader()
            w.writerows(rows)


def _keep_best(out: Path, step: int, per_clip: dict[str, dict], save: Callable[[Path], None]) -> bool:
    """Write ``best.safetensors`` (via ``save``) and ``best.json`` when this validation's mean PSNR over the clips
    beats the best one recorded in ``best.json`` (a resumed run keeps the earlier calls' best). Returns whether it did."""
    mean_psnr = float(np.mean([r["psnr"] for r in per_clip.values()]))
    record = out / "best.json"
    best = json.loads(record.read_text())["mean_psnr"] if record.is_file() else -math.inf
    if not mean_psnr > best:
        return False
    save(out / "best.safetensors")
    write_json(record, {"step": step, "mean_psnr": mean_psnr, "psnr": {k: r["psnr"] for k, r in per_clip.items()}})
    return True


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


# ---------------------------------------------------------------------------------------------------------- train
def train(
    cfg: TrainConfig,
    data_dirs: list[str | Path],
    out_dir: str | Path,
    device: str | torch.device = "cpu",
    resume: bool = True,
    max_minutes: float | None = None,
    progress: Progress = None,
    stop_at_step: int | None = None,
    head=None,
    backend: str = "auto",
    init_weights: str | Path | None = None,
) -> TrainResult:
    """Train FHAvatarNet on preprocessed clips; resumable, stoppable by time or step.

    Args:
        cfg: the training configuration (``TrainConfig``; ``load_train_config`` reads YAML/JSON + overrides).
        data_dirs: preprocessed item folders, or folders of them; items named in ``cfg.data.val_items`` are held out
            for validation and never trained on.
        out_dir: output folder (see the module docstring); an existing ``checkpoints/last.pt`` is resumed from.
        device: "cpu", "cuda", "cuda:1" ... (under torchrun each process uses cuda:LOCAL_RANK).
        resume: continue from ``checkpoints/last.pt`` when present (else it is ignored and overwritten).
        max_minutes: stop cleanly (checkpoint, weights, validation) once this much wall time has passed.
        progress: called as ``progress(step, iterations, logged_terms)`` at every logged step.
        stop_at_step: stop after this many completed steps (for staged runs and tests); the schedule is still
            that of ``cfg.iterations``.
        head: a head model to use instead of ``load_head_model(cfg.head)`` (tests use a synthetic one).
        backend: render backend ("auto": gsplat on CUDA, the PyTorch reference on CPU).
        init_weights: when no checkpoint is resumed, start the network from these weights (a ``.safetensors``
            written by training) with a fresh optimiser and step 0 (a warm start: not an exact resume).
    """
    t_start, t_clock = time.time(), clock()
    dinfo, device = setup(device)
    world, rank, main_proc = dinfo.world, dinfo.rank, dinfo.main
    out = Path(out_dir)
    ckpt_path = out / "checkpoints" / "last.pt"
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)

    # --- models and data
    if head is None:
        from ..head.registry import load_head_model

        head = load_head_model(cfg.head, device=device)
    head = head.to(device)
    uv = load_or_build_uv_space(head, cfg.uv_config(), device=device)
    head_of_weights = weights_head_record(head)  # the weights say which head they work on
    mirror, mirror_note = (None, "flip_prob = 0")
    if cfg.data.flip_prob > 0:
        mirror, mirror_note = HeadMirror.build(head, tolerance=getattr(head, "mirror_tolerance", 1e-4))
        mirror = mirror.to(device) if mirror is not None else None
    items = find_items(data_dirs)
    train_items, val_items = split_items(items, cfg.data.val_items)
    if not train_items:
        raise ConfigError("no training clips left after holding out the validation items",
                          "add more preprocessed clips or change data.val_items")
    clips = load_clips(train_items, cfg.network.image_size, cfg.data.preload)
    val_clips = [load_val_clip(c, cfg.data.val_frames).to(device)
                 for c in load_clips(val_items, cfg.network.image_size, True, min_frames=2)] if val_items else []
    size = cfg.supervision_size

    _seed_everything(cfg.seed)
    net = FHAvatarNet(cfg.network).to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=cfg.adam_betas)
    eye_mask = uv.region_mask("eyes")[None, None].float()
    valid = uv.valid[None, None].float()
    amp = cfg.amp and device.type == "cuda"

    step = 0
    resumed = False
    if resume and ckpt_path.is_file():
        state = load_training_state(ckpt_path, net, opt, cfg.digest(), device=device)
        step = int(state["step"])
        resumed = True
    steps = all_ranks_int(step, dinfo, device)
    if len(set(steps)) > 1:
        raise ConfigError(f"the processes start from different steps {steps}: they did not all read the same "
                          f"'{ckpt_path}'", "give every process the same (shared) --out folder")
    if resumed:
        if main_proc:
            _truncate_log(out / "train_log.csv", LOG_COLUMNS, step)
            _truncate_log(out / "val.csv", VAL_COLUMNS, step)
    else:
        if init_weights is not None:
            from ..network.weights import load_network

            warm = load_network(init_weights, "cpu")
            if dataclasses.asdict(warm.config) != dataclasses.asdict(cfg.network):
                raise ConfigError(f"--init-weights '{init_weights}' were trained with another network config",
                                  "train with the same network settings, or start without --init-weights")
            net.load_state_dict(warm.state_dict())
        if main_proc:
            for f in ("train_log.csv", "val.csv"):
                (out / f).unlink(missing_ok=True)

    notes = {
        "perceptual": perceptual_backend(cfg.loss),
        "skipped": warn_skipped_terms(cfg.loss, head, device) if main_proc else [],
        "novel_views": "3D reconstruction mode supervises the frame itself only: the paper's inverted PanoHead "
                       "novel views need PanoHead + its inversion, which are not available",
        "flip": "enabled" if mirror is not None else f"disabled: {mirror_note}",
        "train_items": {c.name: len(c) for c in clips},
        "val_items": {c.name: len(c.frames) - 1 for c in val_clips},
        "schedule": {"iterations": cfg.iterations, "reg_start_step": cfg.reg_start_step,
                     "lambda_3d_boost_step": cfg.boost_step},
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "world_size": world,
    }
    if main_proc:
        write_json(out / "config.json", cfg.to_dict())
        write_json(out / "notes.json", notes)

    baselines: dict = {}

    def run_validation(at_step: int, first: bool = False) -> dict:
        if not val_clips or not main_proc:
            return {}
        rows, summary, grids = [], {}, []
        method = ("init" if init_weights is not None else "untrained") if first else "network"
        for vc in val_clips:
            if vc.name not in baselines:
                baselines[vc.name] = validate_baseline(head, uv, vc, size, backend=backend)
                rows.append({"step": at_step, "clip": vc.name, "method": "baseline", **baselines[vc.name].summary()})
            res = validate_network(unwrap(net), head, uv, vc, size, amp=amp, backend=backend)
            rows.append({"step": at_step, "clip": vc.name, "method": method, **res.summary()})
            summary.setdefault(method, {})[vc.name] = res.summary()
            summary.setdefault("baseline", {})[vc.name] = baselines[vc.name].summary()
            grids.append(comparison_grid(vc, res, baselines[vc.name], size))
        _append_rows(out / "val.csv", VAL_COLUMNS, rows)
        _save_png(out / f"val_grid_{at_step:06d}.png", np.concatenate(grids, 0))
        if not first:
            _keep_best(out, at_step, summary["network"], lambda path: save_checkpoint(
                path, net, extra={"step": at_step, "config_digest": cfg.digest(), **head_of_weights}))
        return summary

    validation: dict = {}
    if not resumed:
        validation = run_validation(0, first=True)

    model = net
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    def save_state() -> None:
        if main_proc:
            save_training_state(ckpt_path, net, opt, step, cfg.digest(), {"notes": notes})

    # --- the loop
    window: dict[str, torch.Tensor] = {}
    window_n, window_t0 = 0, time.time()
    stopped = "done"
    limit_step = cfg.iterations if stop_at_step is None else min(cfg.iterations, stop_at_step)
    while step < limit_step:
        # Collective: one rank whose clock says stop stops them all at this step (alone it would hang the others).
        time_up = max_minutes is not None and (clock() - t_clock) / 60.0 >= max_minutes
        if any_rank([time_up], dinfo, device)[0]:
            stopped = "time"
            break
        plans = rank_plans(clips, cfg.data, cfg.seed, step, rank, cfg.batch_size, mirror is not None)
        batch = make_batch(clips, plans, device, mirror)
        lr = cfg.lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        weights = cfg.weights_at(step)

        src_img = resize_images(batch.src_img, cfg.network.image_size)
        pred = predict_avatar(model, head, uv, src_img, batch.src_params, batch.src_c2w, batch.K, with_aux=True,
                              amp=amp)
        tgt = HeadParams(**{**batch.tgt_params.to_dict(), "shape": batch.src_params.shape})
        verts_t = head(tgt)
        main = render_rig(pred.rig(head, uv), verts_t, batch.tgt_c2w, batch.K, size,
                          with_positions=weights["3d"] > 0, backend=backend)
        aux = render_rig(pred.rig(head, uv, aux=True), verts_t, batch.tgt_c2w, batch.K, size, backend=backend)
        target = resize_images(batch.tgt_img, size)
        matte = resize_images(batch.tgt_matte, size)
        face = face_geometry(head, verts_t, batch.tgt_c2w, batch.K, size, cfg.loss) if weights["id"] > 0 else None
        total, terms = compute_losses(main.rgb, main.alpha, target, matte, cfg.loss, weights, pred.A, pred.delta_p,
                                      valid, eye_mask, i3d=main.positions, rgb_aux=aux.rgb, alpha_aux=aux.alpha,
                                      face=face, p_source=pred.out.p_r - pred.delta_p)
        finite = bool(torch.isfinite(total))
        if any_rank([not finite], dinfo, device)[0]:  # every rank raises, none waits in the all-reduce
            where = "" if finite else f": { {k: float(v) for k, v in terms.items()} }"
            raise FloatingPointError(f"non-finite loss at step {step} on "
                                     f"{'another process' if finite else f'process {rank}'}{where}")
        opt.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        else:
            grad_norm = torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in model.parameters() if p.grad is not None))
        opt.step()
        step += 1

        terms["grad_norm"] = grad_norm.detach()
        for k, v in terms.items():
            window[k] = window.get(k, 0.0) + v
        window_n += 1
        if step % cfg.log_every == 0 or step == 1 or step == limit_step:
            window = mean_over_ranks(window, dinfo, device)  # collective: every rank, same steps
            if main_proc:
                _flush_log(out, step, lr, window, window_n, window_t0, progress, cfg.iterations)
            window, window_n, window_t0 = {}, 0, time.time()
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save_state()
        if cfg.export_every and step % cfg.export_every == 0 and main_proc:
            save_checkpoint(out / "fhavatar.safetensors", net, extra={"step": step, **head_of_weights})
        if cfg.val_every and step % cfg.val_every == 0 and step < limit_step:
            validation = run_validation(step)
    else:
        stopped = "done" if step >= cfg.iterations else "stop_at"

    # --- stop cleanly: last log window, checkpoint, weights, validation, plot
    weights_path = None
    if window_n:
        window = mean_over_ranks(window, dinfo, device)
    if main_proc:
        if window_n:
            _flush_log(out, step, cfg.lr_at(max(step - 1, 0)), window, window_n, window_t0, progress, cfg.iterations)
        save_state()
        weights_path = out / "fhavatar.safetensors"
        save_checkpoint(weights_path, net, extra={"step": step, "config_digest": cfg.digest(), **head_of_weights,
                                                  "train_items": sorted(notes["train_items"])})
        if step > 0 or not validation:
            validation = run_validation(step) or validation
        log = read_log(out / "train_log.csv") if (out / "train_log.csv").is_file() else {}
        if log:
            plot_losses(log, PLOT_TERMS, out / "losses.png",
                        title=f"FHAvatar training losses (unweighted terms; total is weighted), step {step}")
        write_json(out / "status.json", {"step": step, "stopped": stopped, "minutes": (time.time() - t_start) / 60,
                                         "validation": validation})
    # Every rank returns what rank 0 wrote, once it is written.
    weights_path, validation = from_main((weights_path, validation), dinfo)
    return TrainResult(step, stopped, out, weights_path, validation)


def _flush_log(out: Path, step: int, lr: float, window: dict, n: int, t0: float, progress: Progress,
               iterations: int) -> None:
    row = {k: float(v) / n for k, v in window.items()}
    row.update(step=step, lr=lr, sec_per_step=(time.time() - t0) / max(n, 1))
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite logged values at step {step}: {bad}")
    _append_rows(out / "train_log.csv", LOG_COLUMNS, [row])
    if progress is not None:
        progress(step, iterations, row)
