"""``t2i train-autoencoder``: a general autoencoder for the shipped base, without retraining its UNet.

The tiny base's VAE was trained on flat-coloured shapes only and cannot represent photos. This
recipe fine-tunes the whole VAE on crops of the packaged photos (several scales, flips, colour
jitter, grayscale), procedural textures and the synthetic world, with a latent anchor on the
synthetic images (``AutoencoderConfig.anchor_weight``): the encoder keeps the old latents of the
world and the decoder keeps decoding them, so the base UNet, trained on those latents, stays
valid. Whole photos are held out for the PSNR figure. Writes OUT/vae (the checkpoint with the best
held-out photo PSNR, or with the best synthetic one above a photo floor: ``select_by``,
``min_psnr_photos``), OUT/metrics.jsonl and, at every evaluation, OUT/resume/ (weights, optimizer,
schedule and sampling state as safetensors + JSON): a run that is stopped continues from there when started
again with the same config.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from core.errors import UserError
from core.io import replace_dir, write_safetensors
from training.config import AutoencoderConfig
from training.photos import packaged_photos, random_crop, texture


def _synthetic(rng: random.Random, size: int) -> np.ndarray:
    from synthetic.world import WorldSpec, render_scene, sample_scene

    return np.asarray(render_scene(sample_scene(rng, WorldSpec(max_shapes=rng.choice([1, 1, 2, 3]))), size, rng))


def _to_x(batch: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [-1, 1]."""
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).mean(dim=[1, 2, 3])
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def eval_sets(sources: dict, held_out: list[str], size: int) -> dict[str, torch.Tensor]:
    """Fixed evaluation images: 32 crops of each held-out photo, 64 of them in grayscale, 128 scenes."""
    rng = random.Random(1234)
    held = [random_crop(rng, sources[n], size, jitter=False) for n in held_out if n in sources for _ in range(32)]
    gray = [np.repeat(np.asarray(Image.fromarray(im).convert("L"))[..., None], 3, -1) for im in held[:64]]
    syn = [_synthetic(random.Random(10_000 + i), size) for i in range(128)]
    return {"photos": _to_x(held), "gray": _to_x(gray), "synthetic": _to_x(syn)}


@torch.no_grad()
def evaluate(vae, old, sets: dict) -> dict:
    """Held-out photo, grayscale and synthetic PSNR; grayscale chroma error (0-255); how far the
    encoder's synthetic latents moved from the old encoder's, and how the old latents decode."""
    vae.eval()
    out = {}

    def chunks(x):
        return [x[i:i + 64] for i in range(0, len(x), 64)]
    for name, x in sets.items():
        rec = torch.cat([vae(c).sample for c in chunks(x)])
        out[f"psnr_{name}"] = round(float(psnr(rec, x).mean()), 3)
        if name == "gray":
            r = (rec.clamp(-1, 1) + 1) * 127.5
            out["gray_chroma_err"] = round(float((r - r.mean(1, keepdim=True)).abs().mean()), 3)
        if name == "synthetic" and _latent_shape(vae) == _latent_shape(old):
            z_new = torch.cat([vae.encode(c).latent_dist.mean for c in chunks(x)])
            z_old = torch.cat([old.encode(c).latent_dist.mean for c in chunks(x)])
            out["latent_drift_rel"] = round(float((z_new - z_old).norm() / z_old.norm()), 4)
            dec_old = torch.cat([vae.decode(z).sample for z in chunks(z_old)])
            out["psnr_synthetic_old_latents"] = round(float(psnr(dec_old, x).mean()), 3)
    vae.train()
    return out


RESUME_EVERY = 50
"""Steps between writes of OUT/resume (and at every evaluation)."""


def main(cfg: AutoencoderConfig, stop_at: int | None = None) -> dict:
    """Trains; returns the kept evaluation (``select_by``, ``min_psnr_photos``; step 0 when none reached
    the photo floor and OUT/vae was not written). ``stop_at`` ends the run after
    that step as an interrupted run would end (OUT/resume written); the next call continues it."""
    from diffusers import AutoencoderKL

    vae_dir = Path(cfg.base) / "vae"
    if not (vae_dir / "config.json").is_file():
        raise UserError(f"{cfg.base} has no vae/ folder (a diffusers model dir is expected)")
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32).eval().requires_grad_(False)
    vae = _fresh_vae(old, cfg) if cfg.new_architecture else AutoencoderKL.from_pretrained(
        vae_dir, torch_dtype=torch.float32)
    size = vae.config.sample_size
    sources = packaged_photos()
    unknown = [n for n in cfg.held_out if n not in sources]
    if unknown:
        raise UserError(f"held_out names {unknown} are not packaged photos; known: {sorted(sources)}")
    train_src = [k for k in sources if k not in cfg.held_out]
    sets = eval_sets(sources, cfg.held_out, size)
    if cfg.decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    rng = random.Random(cfg.seed)
    start, best = _resume(out / "resume", cfg, vae, opt, sched, rng)
    if start == 0:
        best = {"step": 0, **evaluate(vae, old, sets)}
        _write_metrics(out / "metrics.jsonl", [best])
    else:
        rows = [json.loads(line) for line in open(out / "metrics.jsonl")] if (out / "metrics.jsonl").is_file() else []
        _write_metrics(out / "metrics.jsonl", [r for r in rows if r["step"] <= start])
        print(f"continuing from step {start} (OUT/resume); kept so far: step {best['step']}, "
              f"{best[f'psnr_{cfg.select_by}']} dB ({cfg.select_by})")
    n_syn = int(round(cfg.batch_size * cfg.synthetic_fraction))
    n_tex = int(round(cfg.batch_size * cfg.texture_fraction))
    t0 = time.time()
    vae.train()  # (from_pretrained leaves it in eval mode, whose attention kernel differs in the last bits)
    bar = tqdm(range(start + 1, cfg.steps + 1), desc="training the autoencoder", unit="step", dynamic_ncols=True,
               initial=start, total=cfg.steps)
    for step in bar:
        nat = [random_crop(rng, sources[rng.choice(train_src)], size) for _ in range(cfg.batch_size - n_syn - n_tex)]
        x = _to_x(nat + [texture(rng, size) for _ in range(n_tex)] + [_synthetic(rng, size) for _ in range(n_syn)])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + cfg.kl_weight * post.kl().mean()
        if n_syn and cfg.anchor_weight > 0:
            xs = x[-n_syn:]
            with torch.no_grad():
                z_old = old.encode(xs).latent_dist.mean
            if not cfg.decoder_only:
                loss = loss + cfg.anchor_weight * F.mse_loss(post.mean[-n_syn:], z_old)
            rec_old = vae.decode(z_old).sample
            loss = loss + F.l1_loss(rec_old, xs) + F.mse_loss(rec_old, xs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", kept_psnr=best[f"psnr_{cfg.select_by}"])
        if step % cfg.eval_every == 0 or step == cfg.steps:
            m = {"step": step, "wall_s": round(time.time() - t0, 1), **evaluate(vae, old, sets)}
            if _better(m, best, cfg):
                best = m
                if cfg.new_architecture:  # a new latent space: SD's rule, 1 / std of its latents
                    vae.register_to_config(scaling_factor=_latent_scale(vae, sets))
                tmp = out / "vae.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                vae.save_pretrained(tmp, safe_serialization=True)
                replace_dir(tmp, out / "vae")
            _write_metrics(out / "metrics.jsonl", [m], append=True)
        if step % cfg.eval_every == 0 or step % RESUME_EVERY == 0 or step == stop_at:
            _save_resume(out / "resume", cfg, step, best, vae, opt, sched, rng)
        if step == stop_at:
            break
    return best


def _better(m: dict, best: dict, cfg: AutoencoderConfig) -> bool:
    """Whether evaluation ``m`` replaces the kept checkpoint ``best`` (step 0 is the base itself, never
    written: the first evaluation that passes the photo floor replaces it)."""
    if cfg.min_psnr_photos is not None and m["psnr_photos"] < cfg.min_psnr_photos:
        return False
    key = f"psnr_{cfg.select_by}"
    return best["step"] == 0 or m[key] > best[key]


@torch.no_grad()
def _latent_scale(vae, sets: dict) -> float:
    """1 / std of the latents (posterior means) of the held-out photos and the synthetic scenes."""
    vae.eval()
    z = torch.cat([vae.encode(x[i:i + 64]).latent_dist.mean  # the mean: no draw from the training RNG
                   for x in (sets["photos"], sets["synthetic"]) for i in range(0, len(x), 64)])
    vae.train()
    return round(float(1.0 / z.std()), 6)


def _latent_shape(vae) -> tuple[int, int]:
    return vae.config.latent_channels, len(vae.config.block_out_channels)


def _fresh_vae(old, cfg: AutoencoderConfig):
    """A randomly initialised AutoencoderKL: the base VAE's config with ``new_architecture``'s fields."""
    from diffusers import AutoencoderKL

    arch = cfg.new_architecture
    n = len(arch.block_out_channels)
    if cfg.decoder_only:
        raise UserError("decoder_only would freeze the randomly initialised encoder of new_architecture; "
                        "set decoder_only: false")
    if any(c % arch.norm_num_groups for c in arch.block_out_channels):
        raise UserError(f"new_architecture.norm_num_groups {arch.norm_num_groups} must divide every "
                        f"block_out_channels entry {arch.block_out_channels}")
    if (arch.latent_channels, n) != _latent_shape(old) and cfg.anchor_weight > 0:
        raise UserError(f"new_architecture's latents (channels, levels) {(arch.latent_channels, n)} differ from the "
                        f"base's {_latent_shape(old)}, so there are no old latents to anchor to: set anchor_weight: 0")
    conf = {k: v for k, v in old.config.items() if not k.startswith("_")}
    conf.update(arch.model_dump(), down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                scaling_factor=1.0)
    return AutoencoderKL.from_config(conf)


def _write_metrics(path: Path, rows: list[dict], append: bool = False) -> None:
    with open(path, "a" if append else "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _save_resume(path: Path, cfg: AutoencoderConfig, step: int, best: dict, vae, opt, sched, rng) -> None:
    """Everything the loop needs to continue exactly, as data, replaced atomically."""
    from training.checkpoints import _save_state

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_safetensors(tmp / "vae.safetensors", {k: v.detach().contiguous() for k, v in vae.state_dict().items()})
    _save_state(tmp / "state.safetensors", {
        "step": step, "best": best, "config": cfg.model_dump(mode="json"), "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(), "rng": rng.getstate(), "torch_rng": torch.get_rng_state()})
    replace_dir(tmp, path)


def _resume(path: Path, cfg: AutoencoderConfig, vae, opt, sched, rng) -> tuple[int, dict | None]:
    """(step, best) restored from OUT/resume, or (0, None) when there is none."""
    if not (path / "state.safetensors").is_file():
        return 0, None
    from training.checkpoints import _load_state
    from core.io import read_safetensors

    state = _load_state(path / "state.safetensors")
    same = {k: v for k, v in cfg.model_dump(mode="json").items() if k != "eval_every"}
    # a setting added to the code since the run started is absent from its state: it ran with the default
    defaults = AutoencoderConfig().model_dump(mode="json")
    was = {k: state["config"].get(k, defaults.get(k))
           for k in same.keys() | state["config"].keys() if k != "eval_every"}
    diff = sorted(k for k in same.keys() | was.keys() if same.get(k) != was.get(k))
    if diff:
        raise UserError(f"{path} was written by a run with other settings ({', '.join(diff)}); "
                        f"use the same config to continue it, or delete {path} (or set output_dir) to start over")
    vae.load_state_dict(read_safetensors(path / "vae.safetensors")[0])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    version, internal, gauss = state["rng"]
    rng.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), state["best"]
