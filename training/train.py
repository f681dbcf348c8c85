"""The training recipe: ``main(cfg)`` = setup -> run -> save.

One accelerate loop covers the three things this project trains: the VAE of a from-scratch preset
(``train.what: vae``), the full UNet (``unet``) and LoRA adapters on the UNet (``lora``), each
optionally with the text encoder. ``training.run`` builds the run; this file advances and saves it.
"""
from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from core.config import dump_config
from core.errors import UserError
from core.images import image_grid, to_pil, to_pixels
from core.io import replace_dir, save_image, write_json
from core.models import standardize_text_encoder
from training.checkpoints import ema_weights, find_checkpoint, save_checkpoint
from training.config import TrainConfig
from training.model import unwrap
from training.run import Run


class TrainingDiverged(UserError):
    pass


def setup(cfg: TrainConfig) -> Run:
    """Builds the run: model, data, caches, optimizer, schedule, EMA, resumed state."""
    return Run(cfg)


def train_step(run: Run, micro: int):
    """One micro-batch: forward, backward, and (at accumulation boundaries) clip + optimizer step.

    Returns (loss, images processed by all processes, grad norm or None).
    """
    acc, t = run.acc, run.cfg.train
    with acc.accumulate(*run.trainable):
        idx = run.batch_indices(micro)
        inputs, emb = run.batch(idx)
        # prior preservation: the class images (rows >= n_instance, at the end) weigh prior.weight as a group
        prior = (int((idx < run.n_instance).sum()), run.cfg.prior.weight) if run.n_class else None
        with acc.autocast():  # also covers vae.encode/decode, which are not forward()
            loss = (run.model.vae_loss(inputs, t.vae_kl_weight) if t.what == "vae"
                    else run.model.loss(inputs, emb, prior))
        acc.backward(loss)
        grad_norm = None
        if acc.sync_gradients and t.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_([p for g in run.optimizer.param_groups for p in g["params"]],
                                            t.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss, len(inputs) * acc.num_processes, grad_norm


def run_loop(run: Run) -> dict:
    """Trains up to train.max_steps, logging, checkpointing and drawing sample grids on the way."""
    acc, t, cfg = run.acc, run.cfg.train, run.cfg
    for m in run.trainable:
        m.train()
    start_step = run.global_step
    bar = tqdm(total=t.max_steps, initial=start_step, desc="training", unit="step",
               disable=not acc.is_local_main_process, dynamic_ncols=True)
    t0, last_loss, images_seen, side_s = time.time(), float("nan"), 0, 0.0  # side_s: checkpoints and sample grids
    micro = run.global_step * t.grad_accum
    while run.global_step < t.max_steps:
        loss, n_images, grad_norm = train_step(run, micro)
        micro += 1
        images_seen += n_images
        if not acc.sync_gradients:
            continue
        loss_val = acc.reduce(loss.detach(), reduction="mean").item()
        if not math.isfinite(loss_val):
            last = find_checkpoint(run.ckpt_dir, "latest")
            raise TrainingDiverged(f"loss became {loss_val} at step {run.global_step + 1}; training stopped. "
                                   f"Last good checkpoint: {last or 'none'}. Lower train.learning_rate or use "
                                   "train.mixed_precision=no.")
        if run.ema is not None:
            run.ema.step(run.ema_params)
        run.global_step += 1
        last_loss = loss_val
        bar.update(1)
        bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{run.lr_scheduler.get_last_lr()[0]:.2e}")
        step, last = run.global_step, run.global_step == t.max_steps
        if step % cfg.logging.log_every == 0:
            logs = {"loss": loss_val, "lr": run.lr_scheduler.get_last_lr()[0]}
            if grad_norm is not None:
                logs["grad_norm"] = float(grad_norm)
            acc.log(logs, step=step)
        t_side = time.time()
        if step % cfg.checkpoint.every == 0 or (last and cfg.checkpoint.save_final):
            save_checkpoint(run)
        se = cfg.logging.sample_every
        if (se and step % se == 0) or (last and cfg.logging.final_samples):
            log_samples(run)
        side_s += time.time() - t_side
    bar.close()
    wall = time.time() - t0
    steps_s = wall - side_s
    return {"steps": run.global_step, "steps_this_run": run.global_step - start_step, "wall_time_s": round(wall, 2),
            "checkpoint_and_samples_s": round(side_s, 2),
            "images_per_s": round(images_seen / steps_s, 2) if steps_s > 0 else None, "final_loss": last_loss,
            "num_processes": acc.num_processes, "num_images": run.n_instance, "class_images": run.n_class,
            "focus_words": run.focus_words,
            "ema_decay_last": None if run.ema is None or run.ema.cur_decay_value is None
            else round(run.ema.cur_decay_value, 6),
            "skipped_images": run.data.skipped, "data": run.data_summary, "vae_fit": run.fit,
            "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
            "cache_peak_gpu_mem_gb": run.cache_peak_gpu_mem_gb}


def sample_grid(run: Run):
    """The grid of the run's fixed validation prompts (VAE stage: originals over reconstructions)."""
    from core.sampling import GenerationRequest

    lg = run.cfg.logging
    if run.cfg.train.what == "vae":
        with torch.no_grad():
            x = to_pixels(run.pixels[:8]).to(run.acc.device)
            rec = unwrap(run.model.vae)(x).sample
        return image_grid([to_pil(im) for im in torch.cat([x, rec])], cols=min(8, len(x)))
    gen = run.model.generator()
    reqs = [GenerationRequest(p, num_inference_steps=lg.sample_steps, guidance_scale=lg.sample_guidance, seed=i,
                              width=run.resolution, height=run.resolution)
            for i, p in enumerate(lg.validation_prompts)]
    images = [imgs[0] for imgs in gen.generate(reqs)]
    return image_grid(images, cols=min(len(images), 6))


def log_samples(run: Run) -> None:
    acc = run.acc
    if acc.is_main_process:
        with ema_weights(run):
            for m in run.trainable:
                m.eval()
            grid = sample_grid(run)
            for m in run.trainable:
                m.train()
        (run.out / "samples").mkdir(exist_ok=True)
        save_image(grid, run.out / "samples" / f"step-{run.global_step:07d}.png")
        tb = acc.get_tracker("tensorboard")
        tb.writer.add_image("samples", np.asarray(grid), run.global_step, dataformats="HWC")
        tb.writer.flush()
    acc.wait_for_everyone()


# ============================================================================ save

def save(run: Run, report: dict) -> Path:
    """Writes model/ (a diffusers dir; LoRA fused, adapter also in lora/) and train_report.json."""
    acc, cfg = run.acc, run.cfg
    acc.wait_for_everyone()
    if acc.is_main_process:
        with ema_weights(run):
            if cfg.train.what == "vae":
                _set_latent_scale(run)
            if cfg.train.what == "lora":
                _save_lora(run)
            pipe = run.model.pipeline()
            if cfg.train.save_dtype == "fp16":
                pipe.to(torch.float16)
            tmp = run.out / "model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            pipe.save_pretrained(tmp, safe_serialization=True)
            standardize_text_encoder(tmp / "text_encoder")
            src_tok = Path(run.model.c.source) / "tokenizer"
            for name in ("vocab.json", "merges.txt"):
                if (src_tok / name).exists() and not (tmp / "tokenizer" / name).exists():
                    shutil.copy(src_tok / name, tmp / "tokenizer" / name)
            dump_config(cfg, tmp / "t2i_train.yaml")
            replace_dir(tmp, run.out / "model")
        report = {**report, "model_dir": str(run.out / "model"), "what": cfg.train.what}
        write_json(run.out / "train_report.json", report)
    acc.end_training()
    return run.out / "model"


def _save_lora(run: Run) -> None:
    """Writes the adapter alone to lora/ (diffusers' LoRA format), then fuses it into the UNet."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet = unwrap(run.model.unet)
    lora_tmp = run.out / "lora.tmp"
    shutil.rmtree(lora_tmp, ignore_errors=True)
    # The adapter's config (rank, alpha, targets) travels in the file's metadata: without it a reader
    # assumes alpha = rank and applies the adapter at the wrong scale whenever they differ.
    StableDiffusionPipeline.save_lora_weights(
        lora_tmp, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        safe_serialization=True, unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    replace_dir(lora_tmp, run.out / "lora")
    unet.fuse_lora()
    unet.unload_lora()


@torch.no_grad()
def _set_latent_scale(run: Run) -> None:
    """SD's scaling_factor: 1 / std of the latents, so the UNet sees unit-variance inputs."""
    vae = unwrap(run.model.vae).eval()
    x = to_pixels(run.pixels[:256]).to(run.acc.device)
    z = torch.cat([vae.encode(x[i:i + 64]).latent_dist.sample() for i in range(0, len(x), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))


def main(cfg: TrainConfig) -> dict:
    """Runs a whole training job; returns the train report."""
    run = setup(cfg)
    report = run_loop(run)
    save(run, report)
    return report
