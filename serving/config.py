"""Serving settings. They come from environment variables (``T2I_*``) because BentoML imports the
service module in every worker process: the decorators' batch sizes and limits are read at import,
so ``t2i serve`` and the Bento's ``envs`` set them, not function arguments."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from core.config import Strict
from core.errors import UserError

ENV_PREFIX = "T2I_"
BUNDLED_ARTIFACT = "artifact"  # where a Bento carries its export dir (relative to the Bento's src)


class ServingConfig(Strict):
    export_dir: str = BUNDLED_ARTIFACT
    """Export dir to serve (T2I_EXPORT_DIR); a Bento carries its own copy under ./artifact."""
    variant: str | None = None
    """Variant to serve (T2I_VARIANT); default: the manifest's selected one."""
    device: str | None = None
    """cpu or cuda (T2I_DEVICE); default: cuda where available."""
    batching: Literal["step", "request", "off"] = "step"
    """How requests share the UNet (T2I_BATCHING). step: continuous batching, requests join and leave
    the running set between denoising steps, whatever their step count, guidance or seed; request:
    BentoML's adaptive batcher groups whole requests (same steps and size) for up to max_latency_ms;
    off: one request at a time."""
    max_batch_size: int = Field(8, ge=1, le=256)
    """Most UNet rows in one UNet call, for step and request batching (T2I_MAX_BATCH_SIZE): an image takes
    two with classifier-free guidance (guidance_scale > 1), one without; 1 turns batching off."""
    max_latency_ms: int = Field(60_000, ge=10)
    """Latency budget of the batcher (T2I_MAX_LATENCY_MS): a request that cannot be served within
    it is answered 503 at once instead of waiting."""
    timeout_s: int = Field(300, ge=1)
    """Request timeout of both services (T2I_TIMEOUT_S)."""
    max_concurrency: int = Field(64, ge=1)
    """Images the API service has in flight at once, counted like max_batch_size (two per guided image)
    (T2I_MAX_CONCURRENCY); a request that would go over gets 429. Requests whose client left are
    cancelled and free their share at once."""
    max_prompt_chars: int = Field(1000, ge=1)
    """Longest prompt accepted, in characters (T2I_MAX_PROMPT_CHARS); longer is a 400. Prompts
    over the tokenizer's 77 tokens but under this are truncated and the response says so."""
    max_images: int = Field(4, ge=1, le=16)
    """Most images per request (n / num_images) (T2I_MAX_IMAGES)."""
    warmup: bool = True
    """Run one generation per batch size before reporting ready (T2I_WARMUP)."""
    max_body_bytes: int = Field(65536, ge=1024)
    """Largest request body accepted, in bytes (T2I_MAX_BODY_BYTES); larger is a 413."""
    body_timeout_s: float = Field(10.0, gt=0)
    """Seconds a request body may take to arrive (T2I_BODY_TIMEOUT_S); slower is a 408."""
    api_key_file: str | None = None
    """File holding the API key (T2I_API_KEY_FILE), or set T2I_API_KEY: then generation and /info need
    'Authorization: Bearer KEY'; the probes and /metrics stay open."""
    trusted_artifacts: bool = False
    """Run code that a variant ships (the compile variant's Inductor cache, int8-static's AOTInductor
    package) even when it was not built on this machine (T2I_TRUSTED_ARTIFACTS); only for export dirs
    from a source you trust."""

    @model_validator(mode="after")
    def _one_request_fits(self) -> "ServingConfig":
        if self.max_concurrency < 2 * self.max_images:
            raise ValueError(f"max_concurrency ({self.max_concurrency}) counts images, two per guided image: it "
                             f"must be at least 2 x max_images ({2 * self.max_images}) for the largest request to run")
        return self

    def api_key(self, environ: dict | None = None) -> str | None:
        """The API key: T2I_API_KEY, else the first line of api_key_file; None when neither is set."""
        env = os.environ if environ is None else environ
        if env.get(ENV_PREFIX + "API_KEY"):
            return env[ENV_PREFIX + "API_KEY"].strip()
        if self.api_key_file:
            try:
                key = Path(self.api_key_file).read_text().strip().splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"cannot read the API key file {self.api_key_file}: {e}") from None
            if not key or not key[0].strip():
                raise UserError(f"the API key file {self.api_key_file} is empty")
            return key[0].strip()
        return None


def from_env(environ: dict | None = None) -> ServingConfig:
    env = os.environ if environ is None else environ
    values = {}
    for name in ServingConfig.model_fields:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            is_bool = ServingConfig.model_fields[name].annotation is bool
            values[name] = raw.lower() in ("1", "true", "yes") if is_bool else raw
    return ServingConfig.model_validate(values, strict=False)


def to_env(cfg: ServingConfig) -> dict[str, str]:
    """The environment that makes ``from_env`` return ``cfg`` in the server's processes."""
    out = {}
    for name, value in cfg.model_dump().items():
        if value is not None:
            out[ENV_PREFIX + name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    out[ENV_PREFIX + "EXPORT_DIR"] = str(Path(cfg.export_dir).resolve())
    if cfg.api_key_file:
        out[ENV_PREFIX + "API_KEY_FILE"] = str(Path(cfg.api_key_file).resolve())
    return out


class ServeConfig(ServingConfig):
    """``t2i serve EXPORT_DIR``: the service settings plus where to listen."""

    export_dir: str
    """Export dir written by `t2i export`."""
    host: str = "127.0.0.1"
    """Address to bind (0.0.0.0 listens on every interface: set an API key then)."""
    port: int = Field(3000, ge=1, le=65535)
    """HTTP port."""


class BentoConfig(Strict):
    """``t2i bento EXPORT_DIR``: build a Bento of one variant."""

    export_dir: str
    """Export dir written by `t2i export`."""
    variant: str | None = None
    """Bundle this variant instead of the selected one."""
    version: str | None = None
    """Bento version (default: generated)."""
