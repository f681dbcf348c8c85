"""The state of one training run, built completely in one place (``Run(cfg)``).

Everything that can fail on bad input (model, resolution, dataset, checkpoint) is checked before
the run folder is touched. Frozen parts (VAE, text encoder) run once per image / caption and their
outputs are cached (kohya / SimpleTuner's main speed lever), as the first epoch's batches need them.
"""
from __future__ import annotations

import contextlib

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from core.config import dump_config
from core.errors import UserError
from core.images import to_pixels
from core.models import size_factor
from training.checkpoints import choose_checkpoint, resume, set_aside_newer
from training.config import TrainConfig
from core.datasets import format_summary, summary
from training.fit import poor_fit_message, vae_round_trip


TEXT_CHUNK = 16
"""Captions per text-encoder call while caching embeddings."""


def prepare_data(cfg: TrainConfig, resolution: int):
    """Renders the synthetic dataset first when the config asks for it, then loads the folder."""
    from synthetic.dataset import generate_dataset, synthetic_spec_matches
    from core.datasets import load_imagefolder

    d = cfg.data
    if d.synthetic is not None:
        s, spec = d.synthetic, d.synthetic.spec()
        if not Path(d.path).exists():
            generate_dataset(d.path, s.n, s.seed, s.size, spec)
        elif synthetic_spec_matches(d.path, s.n, s.seed, s.size, spec) is False:
            # our own rendering, of other settings: a stale dataset would silently train the old recipe
            print(f"{d.path} was rendered with other data.synthetic settings; rendering it again")
            generate_dataset(d.path, s.n, s.seed, s.size, spec, overwrite=True)
    return load_imagefolder(d.path, resolution, d.image_column, d.caption_column, d.on_bad_image, d.crop,
                            cfg.train.seed)


def check_resolution(comps, res: int) -> None:
    factor = size_factor(comps.vae.config, comps.unet.config)
    if res % factor or res < factor:
        raise UserError(f"resolution {res} is not supported by this model: it must be a positive "
                        f"multiple of {factor} (VAE x UNet downsampling)")


def _optimizer(cfg: TrainConfig, groups: list[dict]):
    t = cfg.train
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
            return bnb.optim.AdamW8bit(groups, lr=t.learning_rate, weight_decay=t.weight_decay)
        except Exception as e:  # no kernel for this device
            raise UserError(f"8-bit AdamW is not available here ({e}); use train.optimizer=adamw") from None
    return torch.optim.AdamW(groups, lr=t.learning_rate, weight_decay=t.weight_decay)


def _flat_hparams(cfg: TrainConfig) -> dict:
    out = {}
    for sec, vals in cfg.model_dump().items():
        if isinstance(vals, dict):
            for k, v in vals.items():
                if isinstance(v, (int, float, str, bool)):
                    out[f"{sec}.{k}"] = v
    return out


class Run:
    """One training run: the model, data, caches, optimizer, schedule, EMA and step."""

    def __init__(self, cfg: TrainConfig):
        from accelerate import Accelerator, PartialState
        from accelerate.utils import ProjectConfiguration

        from training.model import LatentDiffusion
        from training.presets import load_components

        self.cfg = cfg
        t = cfg.train
        self.out = Path(cfg.output_dir)
        if t.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise UserError("train.mixed_precision=fp16 needs a GPU; use bf16 or no on CPU")
        # cpu=True without a GPU: how accelerate picks gloo data parallelism (MULTI_CPU) when
        # `accelerate launch --multi_gpu` / torchrun start several processes on a CPU machine.
        cpu = not torch.cuda.is_available()
        # a preset or the synthetic dataset is rendered once, by the main process; the others wait for it
        self.rebuilt_unet = False
        with PartialState(cpu=cpu).main_process_first():
            comps = load_components(cfg.model.pretrained, cache_dir=self.out.parent / ".presets")
            if cfg.model.vae:
                from training.presets import swap_vae

                with torch.random.fork_rng():  # the rebuilt conv_in is the same for the same seed
                    torch.manual_seed(t.seed)
                    note, rebuilt = swap_vae(comps, cfg.model.vae)
                self.rebuilt_unet = rebuilt
                if rebuilt and t.what != "unet":
                    raise UserError(f"model.vae has other latent channels than the model's UNet, whose first and "
                                    f"last convolutions are new: train.what=unet trains them; with train.what="
                                    f"{t.what} they would stay untrained")
                print(note)
            self.resolution = cfg.model.resolution or comps.resolution
            check_resolution(comps, self.resolution)
            v_prediction = (t.prediction_type or comps.noise_scheduler.config.prediction_type) == "v_prediction"
            if t.zero_terminal_snr and not v_prediction:
                raise UserError("train.zero_terminal_snr needs train.prediction_type=v_prediction (epsilon is "
                                "undefined at zero SNR)")
            self.data = prepare_data(cfg, self.resolution)
        self.ckpt_dir = self.out / "checkpoints"

        self.acc = acc = Accelerator(
            cpu=cpu, mixed_precision=t.mixed_precision,
            gradient_accumulation_steps=t.grad_accum, log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")))
        # read (and verified) in full before anything is written: a corrupt latest falls back to the one before
        chosen = choose_checkpoint(self.ckpt_dir, cfg.checkpoint.resume_from, acc.process_index, acc.print)
        self.resume_from, resume_state = chosen or (None, None)
        torch.manual_seed(t.seed + acc.process_index)
        self.focus_words = cfg.focus_words_resolved()
        if self.focus_words and t.focus_token_learning_rate:
            acc.print(f"focus words (their token embeddings train): {', '.join(self.focus_words)}"
                      f"{'' if t.focus_words is not None else ' (from data.synthetic.focus)'}")
        for m in (comps.vae, comps.text_encoder, comps.unet):  # frozen parts too; prepare() moves only trained ones
            m.to(acc.device)
        self.data_summary = summary(self.data, comps.tokenizer)
        self.fit = None if t.what == "vae" else vae_round_trip(comps.vae, self.data.pixels)
        acc.print(format_summary(self.data_summary))
        if self.fit is not None:
            acc.print(f"VAE round trip on {self.fit['images']} of these images: {self.fit['psnr_db']} dB PSNR")
            problem = poor_fit_message(self.fit, cfg.model.pretrained, cfg.data.min_vae_psnr)
            if problem and cfg.data.on_poor_fit == "error":
                raise UserError(problem)
            if problem:
                acc.print(f"warning: {problem}")
        self.n_instance, self.n_class = len(self.data.captions), 0
        if cfg.prior.class_prompt is not None:  # drawn by the model as loaded, before the fine-tune changes it
            self._add_class_images(comps, cpu)
        self.model = LatentDiffusion(comps, t.prediction_type, t.snr_gamma, t.noise_offset, t.zero_terminal_snr,
                                     (t.timestep_bias, t.timestep_bias_portion, t.timestep_bias_multiplier))
        self.trainable = self._select_trainable(comps)
        trains_text = t.train_text_encoder or bool(t.focus_token_learning_rate)
        self.cache_latents = t.cache and t.what != "vae"
        self.cache_text = t.cache and t.what != "vae" and not trains_text
        self.steps_per_epoch = max(1, self.n_instance // (t.batch_size * acc.num_processes))
        self.class_steps_per_epoch = max(1, self.n_class // (t.batch_size * acc.num_processes))
        self.global_step = 0

        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out / "config.yaml")
        self.pixels = torch.from_numpy(self.data.pixels)
        self.cache_peak_gpu_mem_gb = None
        self.build_caches()
        groups = self._param_groups()
        self.ema_params = [p for g in groups for p in g["params"]]  # the order the EMA keeps its copies in
        self.optimizer = _optimizer(cfg, groups)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(t.lr_scheduler, self.optimizer,
                                          num_warmup_steps=t.warmup_steps * acc.num_processes,
                                          num_training_steps=t.max_steps * acc.num_processes)
        *mods, self.optimizer, self.lr_scheduler = acc.prepare(*self.trainable, self.optimizer, self.lr_scheduler)
        names = ["vae"] if t.what == "vae" else ["unet", "text_encoder"][:len(mods)]
        for name, m in zip(names, mods):
            setattr(self.model, name, m)
        self.ema = self._ema() if t.ema_decay else None  # checkpointed by training.checkpoints, not accelerate
        if self.resume_from is not None:
            resume(self, self.resume_from, resume_state)
            del resume_state
            acc.wait_for_everyone()
            if acc.is_main_process and (moved := set_aside_newer(self.ckpt_dir, self.resume_from)):
                acc.print(f"moved the newer checkpoints of the abandoned run aside to "
                          f"{self.ckpt_dir / 'abandoned'}: {', '.join(moved)}")
        if acc.is_main_process:
            acc.init_trackers("t2i", config=_flat_hparams(cfg))

    def _add_class_images(self, comps, cpu: bool) -> None:
        """Prior preservation: the class images follow the user's in self.data (rows >= n_instance)."""
        from accelerate import PartialState

        from training.prior import check_folder, class_images, merged

        per = self.cfg.train.batch_size * self.acc.num_processes
        if self.cfg.prior.num_images < per:
            raise UserError(f"prior.num_images ({self.cfg.prior.num_images}) must be at least the images of "
                            f"one batch ({per}): each batch trains on as many class images as of yours")
        if self.rebuilt_unet:
            raise UserError("model.vae has other latent channels than the model's UNet, whose rebuilt first and "
                            "last convolutions are untrained: it cannot draw class images. Re-adapt the UNet "
                            "to the VAE first, then fine-tune with prior.class_prompt")
        check_folder(self.cfg)  # on every process, before the main one draws: a refusal leaves none waiting
        with PartialState(cpu=cpu).main_process_first():
            cls = class_images(comps, self.cfg, self.resolution, self.acc.device, self.acc.is_main_process,
                               self.acc.print)
        self.n_class = len(cls.captions)
        self.data = merged(self.data, cls)

    # ---------------------------------------------------------------- which weights
    def _select_trainable(self, comps) -> list[torch.nn.Module]:
        t = self.cfg.train
        for m in (comps.unet, comps.vae, comps.text_encoder):
            m.requires_grad_(False)
        if t.what == "vae":
            comps.vae.requires_grad_(True)
            return [comps.vae]
        if t.what == "lora":
            from peft import LoraConfig
            comps.unet.add_adapter(LoraConfig(r=self.cfg.lora.rank, lora_alpha=self.cfg.lora.alpha,
                                              init_lora_weights="gaussian",
                                              target_modules=self.cfg.lora.target_modules))
        else:
            comps.unet.requires_grad_(True)
        if t.gradient_checkpointing:
            comps.unet.enable_gradient_checkpointing()
        mods = [comps.unet]
        if t.train_text_encoder:
            comps.text_encoder.requires_grad_(True)
            mods.append(comps.text_encoder)
        elif t.focus_token_learning_rate:  # the token embeddings alone (only the focus words' rows move)
            comps.text_encoder.get_input_embeddings().weight.requires_grad_(True)
            mods.append(comps.text_encoder)
        return mods

    def focus_token_ids(self) -> list[int]:
        """The tokenizer's ids of the focus words (each may be several BPE pieces), without special tokens."""
        tok = self.model.tokenizer
        special = set(tok.all_special_ids)
        return sorted({i for w in self.focus_words for i in tok(w).input_ids if i not in special})

    def _param_groups(self) -> list[dict]:
        """One optimizer group per trained module; with train.focus_token_learning_rate the focus words'
        token embeddings get a group of their own (no weight decay) and the other rows no gradient."""
        t = self.cfg.train
        tokens = self.model.text_encoder.get_input_embeddings().weight if t.focus_token_learning_rate else None
        groups = [{"params": [p for p in m.parameters() if p.requires_grad and p is not tokens], "lr": t.learning_rate}
                  for m in self.trainable]
        groups = [g for g in groups if g["params"]]
        if tokens is not None:
            rows = torch.zeros(tokens.shape[0], 1, dtype=tokens.dtype, device=tokens.device)
            rows[self.focus_token_ids()] = 1.0
            tokens.register_hook(lambda g: g * rows)  # the other rows get no gradient, hence no AdamW step
            groups.append({"params": [tokens], "lr": t.focus_token_learning_rate, "weight_decay": 0.0})
        return groups

    def _ema(self):
        from diffusers.training_utils import EMAModel

        t = self.cfg.train
        # min_decay = decay turns diffusers' (1 + s) / (10 + s) warm-up off
        ema = EMAModel(self.ema_params, decay=t.ema_decay, min_decay=0.0 if t.ema_warmup else t.ema_decay)
        reached = ema.get_decay(t.max_steps)  # diffusers' own schedule, at the last step
        if t.ema_warmup and reached < t.ema_decay:
            self.acc.print(f"note: with train.ema_warmup the EMA decay reaches only {reached:.4f} by step "
                           f"{t.max_steps}, not train.ema_decay={t.ema_decay}; set train.ema_warmup=false to "
                           f"use {t.ema_decay} throughout")
        return ema

    # ---------------------------------------------------------------- caching
    # The caches fill as batches need them (train.cache_fill=lazy): training starts as soon as the model
    # and data are loaded, and the encoding is paid during the first epoch instead of before step 1.
    # Rows are encoded in fixed blocks, never in the order batches ask for them, so a cached value is the
    # same bits whichever step first needed it (exact resume). The blocks follow the first epoch's order
    # (block b holds that epoch's images b*chunk .. (b+1)*chunk-1, their mirror images in blocks of their
    # own; captions by first appearance), so a batch of the first epoch encodes its own images and
    # captions, one or two blocks of each, and little else.
    def build_caches(self) -> None:
        t = self.cfg.train
        on_gpu = self.acc.device.type == "cuda"
        first_epoch = self.epoch_order(0)
        if self.n_class:
            first_epoch = np.concatenate([first_epoch, self.n_instance + self.class_order(0)])
        if self.cache_latents:  # with data.flip, each image's mirror image is cached behind the originals
            n = len(self.pixels)
            self.lat_rows = n * (2 if self.cfg.data.flip else 1)
            self.lat_chunk = t.cache_batch_size or (8 if on_gpu else 16)
            self.lat_order = torch.as_tensor(np.concatenate([first_epoch + k * n for k in range(self.lat_rows // n)]))
            self.lat_block = torch.empty(self.lat_rows, dtype=torch.long)  # row -> its block
            self.lat_block[self.lat_order] = torch.arange(self.lat_rows) // self.lat_chunk
            self.lat_done = torch.zeros((self.lat_rows + self.lat_chunk - 1) // self.lat_chunk, dtype=torch.bool)
            self.lat_mean = self.lat_std = None
        if self.cache_text:
            uniq = list(dict.fromkeys([""] + [self.data.captions[i] for i in first_epoch]))
            self.caption_index = {c: i for i, c in enumerate(uniq)}
            self.captions_uniq = uniq
            self.text_done = torch.zeros((len(uniq) + TEXT_CHUNK - 1) // TEXT_CHUNK, dtype=torch.bool)
            self.text_cache = None
        if t.cache_fill == "upfront":
            show = self.acc.is_local_main_process
            if self.cache_latents:
                for b in tqdm(range(len(self.lat_done)), desc="caching latents", leave=False, disable=not show):
                    self._fill_latents(b)
            if self.cache_text:
                for b in tqdm(range(len(self.text_done)), desc="caching text", leave=False, disable=not show):
                    self._fill_text(b)
            if on_gpu:  # the training step's peak is what the report's peak_gpu_mem_gb should show
                self.cache_peak_gpu_mem_gb = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()

    @torch.no_grad()
    def _fill_latents(self, b: int) -> None:
        rows = self.lat_order[b * self.lat_chunk:(b + 1) * self.lat_chunk]
        x = self._pixels((rows % len(self.pixels)).numpy(), rows >= len(self.pixels))  # rows >= n: mirror images
        on_gpu = self.acc.device.type == "cuda"
        with self.acc.autocast() if on_gpu else contextlib.nullcontext():  # bf16/fp16 encode on a GPU
            m, s = self.model.encode_images(to_pixels(x).to(self.acc.device))
        if self.lat_mean is None:
            self.lat_mean = torch.empty(self.lat_rows, *m.shape[1:], device=m.device)
            self.lat_std = torch.empty_like(self.lat_mean)
        self.lat_mean[rows] = m.float()
        self.lat_std[rows] = s.float()
        self.lat_done[b] = True

    @torch.no_grad()
    def _fill_text(self, b: int) -> None:
        emb = self.model.encode_text(self.captions_uniq[b * TEXT_CHUNK:(b + 1) * TEXT_CHUNK])
        if self.text_cache is None:
            self.text_cache = torch.empty(len(self.captions_uniq), *emb.shape[1:], dtype=emb.dtype, device=emb.device)
        self.text_cache[b * TEXT_CHUNK:b * TEXT_CHUNK + len(emb)] = emb
        self.text_done[b] = True

    def cached_latents(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for b in torch.unique(self.lat_block[rows]).tolist():
            if not self.lat_done[b]:
                self._fill_latents(b)
        return self.lat_mean[rows], self.lat_std[rows]

    def cached_text(self, captions: list[str]) -> torch.Tensor:
        ids = [self.caption_index[c] for c in captions]
        for b in sorted({i // TEXT_CHUNK for i in ids}):
            if not self.text_done[b]:
                self._fill_text(b)
        return self.text_cache[ids]

    # ---------------------------------------------------------------- data order
    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order an epoch visits the user's images in; a pure function of the seed and epoch."""
        return np.random.default_rng(self.cfg.train.seed + epoch).permutation(self.n_instance)

    def class_order(self, epoch: int) -> np.ndarray:
        """The order an epoch of the class images (prior preservation) visits them in."""
        return np.random.default_rng([self.cfg.train.seed, 1, epoch]).permutation(self.n_class)

    def batch_indices(self, micro_step: int) -> np.ndarray:
        """Indices of this process's micro-batch; a pure function of the step (exact resume). With prior
        preservation as many class images follow, from their own epochs."""
        t = self.cfg.train
        per = t.batch_size * self.acc.num_processes
        mine = slice(self.acc.process_index, None, self.acc.num_processes)
        epoch, k = divmod(micro_step, self.steps_per_epoch)
        glob = self.epoch_order(epoch)[k * per:(k + 1) * per]
        if not self.n_class:
            return glob[mine]
        epoch, k = divmod(micro_step, self.class_steps_per_epoch)
        cls = self.n_instance + self.class_order(epoch)[k * per:(k + 1) * per]
        return np.concatenate([glob[mine], cls[mine]])

    def batch(self, idx: np.ndarray):
        """(latents, text embeddings) of a micro-batch; (pixels, None) for the VAE stage."""
        t = self.cfg.train
        device = self.acc.device
        flip = torch.rand(len(idx)) < 0.5 if self.cfg.data.flip else torch.zeros(len(idx), dtype=torch.bool)
        if t.what == "vae":
            return to_pixels(self._pixels(idx, flip)).to(device), None
        captions = [self.data.captions[i] for i in idx]
        drop = torch.rand(len(captions)) < t.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        if self.cache_latents:
            rows = torch.as_tensor(idx) + flip.long() * len(self.pixels)
            latents = self.model.sample_latents(*self.cached_latents(rows))
        else:
            latents = self.model.sample_latents(*self.model.encode_images(to_pixels(self._pixels(idx, flip)).to(device)))
        if self.cache_text:
            emb = self.cached_text(captions)
        else:
            emb = self.model.encode_text(captions)
        return latents, emb

    def _pixels(self, idx: np.ndarray, flip: torch.Tensor) -> torch.Tensor:
        x = self.pixels[idx].clone()
        x[flip] = x[flip].flip(2)  # NHWC: dimension 2 is the width
        return x
