"""What a user of other tools does with the artifacts this project writes, with no code of ours.

Runs in the compatibility environment (``.venv-compat``: transformers 4.x, the diffusers that resolves
beside it, Optimum's ONNX Runtime pipelines), called by ``tests/test_compat.py`` through a
subprocess. It imports nothing from this repository. One command per call; the result is one JSON
line on stdout, and images go to ``.npy`` files (uint8, HWC, one image per request).

    python tests/compat_worker.py versions
    python tests/compat_worker.py text-encoder MODEL_DIR
    python tests/compat_worker.py tokenizer MODEL_DIR PROMPT...
    python tests/compat_worker.py sd MODEL_DIR OUT.npy REQUEST_JSON
    python tests/compat_worker.py ort ONNX_DIR OUT.npy REQUEST_JSON
    python tests/compat_worker.py optimum-export MODEL_DIR ONNX_OUT_DIR
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")


def _generate(pipe, request: dict, out: str) -> dict:
    import numpy as np
    import torch

    images = pipe(request["prompt"], negative_prompt=request.get("negative_prompt") or None,
                  num_inference_steps=request["steps"], guidance_scale=request["guidance"],
                  height=request.get("height"), width=request.get("width"),
                  generator=torch.Generator().manual_seed(request["seed"]), output_type="np").images
    images = (np.asarray(images) * 255).round().astype(np.uint8)
    np.save(out, images)
    return {"shape": list(images.shape)}


def versions() -> dict:
    import diffusers
    import onnxruntime
    import optimum.version
    import torch
    import transformers

    return {"transformers": transformers.__version__, "diffusers": diffusers.__version__,
            "optimum": optimum.version.__version__, "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__}


def text_encoder(model_dir: str) -> dict:
    """Default loading, as diffusers does it: which weights matched, and the dtype it ran in."""
    from transformers import CLIPTextModel

    model, info = CLIPTextModel.from_pretrained(Path(model_dir) / "text_encoder", output_loading_info=True)
    return {"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
            "dtype": str(model.dtype), "params": sum(p.numel() for p in model.parameters())}


def tokenizer(model_dir: str, *prompts: str) -> dict:
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    out = {}
    for cls in (CLIPTokenizer, CLIPTokenizerFast):
        tok = cls.from_pretrained(Path(model_dir) / "tokenizer")
        out[cls.__name__] = {"ids": [tok(p).input_ids for p in prompts], "model_max_length": tok.model_max_length,
                             "pad": tok.pad_token_id, "bos": tok.bos_token_id, "eos": tok.eos_token_id}
    return out


def sd(model_dir: str, out: str, request: str) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)  # default arguments, as a user would
    pipe.set_progress_bar_config(disable=True)
    dtypes = {n: str(getattr(pipe, n).dtype) for n in ("text_encoder", "unet", "vae")}
    with torch.no_grad():
        return {**_generate(pipe, json.loads(request), out), "dtypes": dtypes}


def ort(onnx_dir: str, out: str, request: str) -> dict:
    from optimum.onnxruntime import ORTDiffusionPipeline

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger("optimum.onnxruntime.modeling_diffusion").addHandler(Keep())
    pipe = ORTDiffusionPipeline.from_pretrained(onnx_dir)  # the class comes from model_index.json
    pipe.set_progress_bar_config(disable=True)
    return {**_generate(pipe, json.loads(request), out), "load_warnings": records,
            "pipeline": type(pipe).__name__}


def optimum_export(model_dir: str, out_dir: str) -> dict:
    """``optimum-cli export onnx`` of a diffusers model dir, as its docs show it."""
    cli = Path(sys.executable).with_name("optimum-cli")
    res = subprocess.run([str(cli), "export", "onnx", "--model", model_dir, "--task", "text-to-image", out_dir],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"optimum-cli failed:\n{res.stderr[-3000:]}")
    return {"files": sorted(str(p.relative_to(out_dir)) for p in Path(out_dir).rglob("*.onnx"))}


COMMANDS = {"versions": versions, "text-encoder": text_encoder, "tokenizer": tokenizer, "sd": sd, "ort": ort,
            "optimum-export": optimum_export}

if __name__ == "__main__":
    print(json.dumps(COMMANDS[sys.argv[1]](*sys.argv[2:])))
