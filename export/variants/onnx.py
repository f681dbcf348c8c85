"""ONNX Runtime variants, in Optimum's folder layout (text_encoder/, unet/, vae_decoder/,
vae_encoder/ each with model.onnx + config.json; tokenizer/, scheduler/, model_index.json).

Each network is exported with ``torch.onnx.export`` (dynamo) with a dynamic batch axis and checked
against torch on random inputs within ``COMPONENT_ATOL`` before the folder is kept.
- fp32: as exported.
- fp16: weights and activations in fp16 (GPU only).
- int8: dynamic int8 of the MatMul/Gemm (attention and linear) nodes only: on this CPU, int8
  convolutions (ConvInteger) were measured slower than fp32, so convolutions stay fp32.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from export.common import copy_shared, load_torch_parts, make_generator, write_meta
from core.errors import UserError

COMPONENT_ATOL = {"text_encoder": 1e-3, "unet": 1e-3, "vae_decoder": 2e-3, "vae_encoder": 2e-3}


class _Unet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _TextEncoder(torch.nn.Module):
    def __init__(self, te):
        super().__init__()
        self.te = te

    def forward(self, input_ids):
        out = self.te(input_ids, return_dict=False)
        return out[0], out[1]


class _Decoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class _Encoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample, return_dict=False)[0].parameters


def _export(module, args: tuple, names: list[str], outputs: list[str], path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=256)
    shapes = {n: {0: batch} for n in names}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(module.eval(), args, str(path), input_names=names, output_names=outputs,
                      dynamic_shapes=shapes, dynamo=True, external_data=False, verbose=False)


def _session(path: Path, device: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    try:  # ONNX is a protobuf graph of standard operators: reading it runs no code of the file's
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a loadable ONNX model ({first}); re-run `t2i export`") from None


def _check(module, args: tuple, path: Path, name: str, atol: float) -> float:
    sess = _session(path, "cpu")
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
    got = sess.run(None, feeds)[0]
    with torch.no_grad():
        ref = module(*args)
        ref = (ref[0] if isinstance(ref, tuple) else ref).float().numpy()
    err = float(np.abs(got.astype(np.float32) - ref).max())
    if err > atol:
        raise UserError(f"ONNX {name} differs from torch by {err:.2e} (> {atol:.0e}); not kept")
    return err


class OnnxBackend:
    def __init__(self, var_dir: Path, device: str, precision: str):
        self.te = _session(var_dir / "text_encoder" / "model.onnx", device)
        self.un = _session(var_dir / "unet" / "model.onnx", device)
        self.dec = _session(var_dir / "vae_decoder" / "model.onnx", device)
        self.np_dtype = np.float16 if precision == "fp16" else np.float32

    def encode_text(self, input_ids):
        return torch.from_numpy(self.te.run(None, {"input_ids": input_ids.numpy().astype(np.int64)})[0])

    def unet(self, latents, t, text_emb):
        b = latents.shape[0]
        out = self.un.run(None, {"sample": latents.numpy().astype(self.np_dtype),
                                 "timestep": np.full((b,), int(t), dtype=np.int64),
                                 "encoder_hidden_states": text_emb.numpy().astype(self.np_dtype)})[0]
        return torch.from_numpy(out.astype(np.float32))

    def decode(self, latents):
        out = self.dec.run(None, {"latent_sample": latents.numpy().astype(self.np_dtype)})[0]
        return torch.from_numpy(out.astype(np.float32))


class Onnx:
    def __init__(self, precision: str):
        self.precision = precision
        self.TOLERANCE = {"fp32": 1.0, "fp16": 6.0, "int8": 12.0}[precision]

    def unsupported(self, device: str) -> str | None:
        try:
            import onnxruntime as ort
        except Exception as e:
            return f"onnxruntime does not import: {e}"
        if self.precision == "fp16" and device != "cuda":
            return "ONNX fp16 runs on the CUDA execution provider only (CPU fp16 kernels are missing or slow)"
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CUDAExecutionProvider here"
        return None

    def build(self, model_dir: Path, out_dir: Path, device: str, ctx: dict) -> dict:
        te, unet, vae = load_torch_parts(model_dir)
        size = unet.config.sample_size
        ch = unet.config.in_channels
        lat = torch.randn(2, ch, size, size)
        emb = torch.randn(2, te.config.max_position_embeddings, te.config.hidden_size)
        ids = torch.randint(0, te.config.vocab_size, (2, te.config.max_position_embeddings))
        vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        img = torch.randn(2, 3, size * vae_scale, size * vae_scale)
        parts = {
            "text_encoder": (_TextEncoder(te), (ids,), ["input_ids"], ["last_hidden_state", "pooler_output"]),
            "unet": (_Unet(unet), (lat, torch.tensor([500, 500]), emb), ["sample", "timestep",
                                                                      "encoder_hidden_states"], ["out_sample"]),
            "vae_decoder": (_Decoder(vae), (lat,), ["latent_sample"], ["sample"]),
            "vae_encoder": (_Encoder(vae), (img,), ["sample"], ["latent_parameters"]),
        }
        copy_shared(model_dir, out_dir)
        errors = {}
        for name, (mod, args, ins, outs) in parts.items():
            path = out_dir / name / "model.onnx"
            _export(mod, args, ins, outs, path)
            errors[name] = _check(mod, args, path, name, COMPONENT_ATOL[name])
            src = {"text_encoder": "text_encoder", "unet": "unet"}.get(name, "vae")
            shutil.copy(model_dir / src / "config.json", out_dir / name / "config.json")
        if self.precision == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            import onnx

            for name in ("text_encoder", "unet"):
                path = out_dir / name / "model.onnx"
                m = onnx.load(str(path))
                del m.graph.value_info[:]  # the exporter's shape annotations confuse the quantizer's inference
                onnx.save(m, str(path))
                q = path.with_name("model.int8.onnx")
                quantize_dynamic(str(path), str(q), op_types_to_quantize=["MatMul", "Gemm"],
                                 weight_type=QuantType.QInt8)
                q.replace(path)
        if self.precision == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16
            import onnx

            for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
                path = out_dir / name / "model.onnx"
                onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=False), str(path))
        index = json.loads((model_dir / "model_index.json").read_text())
        index.update({"_class_name": "ORTStableDiffusionPipeline", "vae_decoder": ["onnxruntime", "ORTModel"],
                      "vae_encoder": ["onnxruntime", "ORTModel"]})
        index.pop("vae", None)
        (out_dir / "model_index.json").write_text(json.dumps(index, indent=2))
        write_meta(model_dir, out_dir, onnx_precision=self.precision)
        return {"format": "onnx (Optimum layout)", "precision": self.precision,
                "max_abs_error_vs_torch": errors, "component_atol": COMPONENT_ATOL}

    def load(self, var_dir: Path, device: str, trusted: bool = False):
        return make_generator(var_dir, OnnxBackend(var_dir, device, self.precision),
                              {"variant": f"onnx-{self.precision}"})
