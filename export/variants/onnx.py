"""ONNX Runtime variants, in Optimum's folder layout (text_encoder/, unet/, vae_decoder/,
vae_encoder/ each with model.onnx + config.json; tokenizer/, scheduler/, model_index.json).

Each network is exported with ``torch.onnx.export`` (dynamo) with dynamic batch, height and width
(``torch.export.Dim``; sides up to ``core.models.MAX_SIDE_MULTIPLE`` times the native one) and
checked against torch on random inputs at the native size and at the largest within
``COMPONENT_ATOL`` before the folder is kept. The UNet takes one timestep per sample (``[batch]``),
which Optimum's ``ORTStableDiffusionPipeline`` accepts: it logs once at load that it will unsqueeze
its scalar timestep each step (harmless; silence the ``optimum.onnxruntime.modeling_diffusion``
logger to hide it).
- fp32: as exported.
- fp16: weights and activations in fp16 (GPU only).
- int8: dynamic int8 of the MatMul/Gemm (attention and linear) nodes only: on this CPU, int8
  convolutions (ConvInteger) were measured slower than fp32, so convolutions stay fp32.

A network whose weights exceed ``EXTERNAL_DATA_MB`` (an SD 1.x UNet: 3.4 GB in fp32) is saved with its
weights in a side file (``model.onnx.data``), since one protobuf cannot exceed 2 GB; the fp16 and
int8 conversions then work through paths (``infer_shapes_path``, external data in and out) and never
serialize the whole model into one message.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from export.common import copy_shared, load_torch_parts, make_generator, model_meta, write_meta
from core.errors import UserError

COMPONENT_ATOL = {"text_encoder": 1e-3, "unet": 1e-3, "vae_decoder": 2e-3, "vae_encoder": 2e-3}
EXTERNAL_DATA_MB = 1024
"""Networks with more weight than this (MB) keep it in model.onnx.data (the protobuf limit is 2 GB)."""


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


def _export(module, args: tuple, names: list[str], outputs: list[str], shapes: dict | None, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mb = sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20
    torch.onnx.export(module.eval(), args, str(path), input_names=names, output_names=outputs,
                      dynamic_shapes=shapes, dynamo=True, external_data=mb > EXTERNAL_DATA_MB, verbose=False)


def _data_files(path: Path) -> set[str]:
    """The external data files a model.onnx refers to (read without loading them)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return {e.value for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
            for e in t.external_data if e.key == "location"}


def _save(model, path: Path, external: bool) -> None:
    """Saves ``model`` at ``path``; with ``external``, its weights go to ``model.onnx.data`` beside it."""
    import onnx

    if not external:
        onnx.save(model, str(path))
        return
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=1024)


def _drop_unreferenced(folder: Path, path: Path) -> None:
    """Removes data files in ``folder`` that model.onnx no longer refers to (the fp32 weights after a conversion)."""
    keep = _data_files(path)
    for f in folder.glob("*.data"):
        if f.name not in keep:
            f.unlink()


def _to_int8(path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import onnx

    external = bool(_data_files(path))
    m = onnx.load(str(path), load_external_data=False)  # the graph alone; the weights stay where they are
    del m.graph.value_info[:]  # the exporter's shape annotations confuse the quantizer's inference
    onnx.save(m, str(path))
    q = path.with_name("model.int8.onnx")
    quantize_dynamic(str(path), str(q), op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8,
                     use_external_data_format=external)
    q.replace(path)
    _drop_unreferenced(path.parent, path)


def _to_fp16(path: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    external = bool(_data_files(path))
    # a path (not a loaded model) makes the converter infer shapes with infer_shapes_path: no 2 GB message
    model = convert_float_to_float16(str(path), keep_io_types=False)
    # the converter can add the same Cast twice (one per blocked consumer) and appends its Casts after
    # their consumers: keep one of each and put the nodes in order, or the graph is not valid ONNX
    produced, nodes = set(), []
    for n in model.graph.node:
        if n.op_type == "Cast" and produced.issuperset(n.output):
            continue
        produced.update(n.output)
        nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    OnnxModel(model).topological_sort()
    _save(model, path, external)
    _drop_unreferenced(path.parent, path)


def _session(path: Path, device: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # no busy-waiting after a run: an idle session's spinning threads would take the cores from the next
    # graph (text encoder, UNet, decoder and the feature-caching split alternate); measured no slower alone
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    try:  # ONNX is a protobuf graph of standard operators: reading it runs no code of the file's
        sess = ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a loadable ONNX model ({first}); re-run `t2i export`") from None
    if sess.get_providers()[0] != providers[0]:  # ONNX Runtime falls back to the CPU without a word
        raise UserError(f"{path}: ONNX Runtime could not start {providers[0]} (active: {sess.get_providers()}); "
                        "on a GPU install onnxruntime-gpu matching the CUDA/cuDNN here (and not onnxruntime next to "
                        "it), or serve on the CPU with T2I_DEVICE=cpu")
    return sess


def _check(module, examples: list[tuple], path: Path, name: str, atol: float) -> float:
    """Largest difference from torch over ``examples`` (inputs of different batch sizes and image sizes)."""
    sess = _session(path, "cpu")
    err = 0.0
    for args in examples:
        feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
        try:
            got = sess.run(None, feeds)[0]
        except Exception as e:  # e.g. an axis the exporter had to make static
            shapes = {k: list(v.shape) for k, v in feeds.items()}
            raise UserError(f"ONNX {name} does not run on inputs {shapes}: {str(e).splitlines()[0]}") from None
        with torch.no_grad():
            ref = module(*args)
            ref = (ref[0] if isinstance(ref, tuple) else ref).float().numpy()
        if got.shape != ref.shape:
            raise UserError(f"ONNX {name} gives shape {got.shape} where torch gives {ref.shape}; not kept")
        err = max(err, float(np.abs(got.astype(np.float32) - ref).max()))
    if err > atol:
        raise UserError(f"ONNX {name} differs from torch by {err:.2e} (> {atol:.0e}); not kept")
    return err


def _parts(te, unet, vae, max_size: int, dynamic_size: bool = True) -> dict:
    """Per network: module, example inputs at the native size (batch 2) and at ``max_size`` (batch 1),
    input and output names, and the dynamic axes: batch, and height and width in the multiples the
    network needs (the UNet's latents: its downsampling factor; the VAE encoder's images: the VAE's;
    the VAE decoder takes any latent size), up to ``max_size``. ``dynamic_size=False``: only the batch
    is dynamic, at the native size (what benchmarks/onnx_shapes.py compares with)."""
    Dim = torch.export.Dim
    s, ch = unet.config.sample_size, unet.config.in_channels
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    down = 2 ** (len(unet.config.block_out_channels) - 1)
    big = max_size // scale  # latent side at max_size
    batch = Dim("batch", min=1, max=256)
    lat_h = down * Dim("latent_height", min=1, max=big // down)
    lat_w = down * Dim("latent_width", min=1, max=big // down)
    img_h, img_w = scale * Dim("height", min=1, max=big), scale * Dim("width", min=1, max=big)
    seq, width = te.config.max_position_embeddings, te.config.hidden_size

    def lat(b, side):
        return torch.randn(b, ch, side, side)

    def emb(b):
        return torch.randn(b, seq, width)

    ids = [torch.randint(0, te.config.vocab_size, (b, seq)) for b in (2, 1)]
    # float timesteps: a scheduler's may be fractional (Euler, Karras sigmas); checked at a fractional one
    unet_in = [(lat(2, s), torch.tensor([500.0, 500.0]), emb(2)), (lat(1, big), torch.tensor([250.5]), emb(1))]
    parts = {
        "text_encoder": (_TextEncoder(te), [(ids[0],), (ids[1],)], ["input_ids"],
                         ["last_hidden_state", "pooler_output"], {"input_ids": {0: batch}}),
        # One timestep per sample ([batch]): the engine batches requests at different steps. Optimum's
        # ORTUnet takes it too (it unsqueezes its scalar timestep and logs a warning at load).
        "unet": (_Unet(unet), unet_in, ["sample", "timestep", "encoder_hidden_states"], ["out_sample"],
                 {"sample": {0: batch, 2: lat_h, 3: lat_w}, "timestep": {0: batch},
                  "encoder_hidden_states": {0: batch}}),
        "vae_decoder": (_Decoder(vae), [(lat(2, s),), (lat(1, big),)], ["latent_sample"], ["sample"],
                        {"latent_sample": {0: batch, 2: Dim("latent_height", min=1, max=big),
                                           3: Dim("latent_width", min=1, max=big)}}),
        "vae_encoder": (_Encoder(vae), [(torch.randn(2, 3, s * scale, s * scale),),
                                        (torch.randn(1, 3, big * scale, big * scale),)],
                        ["sample"], ["latent_parameters"], {"sample": {0: batch, 2: img_h, 3: img_w}}),
    }
    if not dynamic_size:
        parts = {name: (mod, examples[:1], ins, outs, {k: {0: axes[0]} for k, axes in shapes.items()})
                 for name, (mod, examples, ins, outs, shapes) in parts.items()}
    return parts


ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def input_type(session, name: str):
    """The numpy dtype a session's input ``name`` takes (exports before float timesteps take int64)."""
    types = {i.name: i.type for i in session.get_inputs()}
    if types.get(name) not in ORT_TYPES:
        raise UserError(f"this ONNX graph's input {name!r} is {types.get(name, 'missing')}, not one of "
                        f"{', '.join(ORT_TYPES)}; re-run `t2i export`")
    return ORT_TYPES[types[name]]


def unet_feeds(latents, t, text_emb, np_dtype, t_dtype=np.float32) -> dict:
    """The UNet graph's inputs: ``t`` is one timestep, or one per sample (step batching), fed as the
    graph's timestep type (float since fractional timesteps were kept; int64 in earlier exports)."""
    ts = np.asarray(t, dtype=t_dtype).reshape(-1)
    return {"sample": latents.numpy().astype(np_dtype), "encoder_hidden_states": text_emb.numpy().astype(np_dtype),
            "timestep": np.full((latents.shape[0],), ts[0]) if ts.size == 1 else ts}


class OnnxBackend:
    def __init__(self, var_dir: Path, device: str, precision: str):
        self.te = _session(var_dir / "text_encoder" / "model.onnx", device)
        self.un = _session(var_dir / "unet" / "model.onnx", device)
        self.dec = _session(var_dir / "vae_decoder" / "model.onnx", device)
        self.np_dtype = np.float16 if precision == "fp16" else np.float32
        self.t_dtype = input_type(self.un, "timestep")

    def encode_text(self, input_ids):
        return torch.from_numpy(self.te.run(None, {"input_ids": input_ids.numpy().astype(np.int64)})[0])

    def unet(self, latents, t, text_emb):
        out = self.un.run(None, unet_feeds(latents, t, text_emb, self.np_dtype, self.t_dtype))[0]
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
        meta = model_meta(model_dir)
        fp32 = ctx.get("built", {}).get("onnx-fp32")
        if self.precision != "fp32" and fp32 is not None:
            # the same export, already checked against torch: converting it skips a second export (~30 s
            # on the demo model, most of this variant's build)
            shutil.copytree(fp32, out_dir, dirs_exist_ok=True)
            errors, source = ctx["notes"]["onnx-fp32"]["max_abs_error_vs_torch"], "onnx-fp32"
        else:
            errors, source = self._export_checked(model_dir, out_dir, meta), "torch"
        if self.precision == "int8":
            for name in ("text_encoder", "unet"):
                _to_int8(out_dir / name / "model.onnx")
        if self.precision == "fp16":
            for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
                _to_fp16(out_dir / name / "model.onnx")
        index = json.loads((model_dir / "model_index.json").read_text())
        index.update({"_class_name": "ORTStableDiffusionPipeline", "vae_decoder": ["onnxruntime", "ORTModel"],
                      "vae_encoder": ["onnxruntime", "ORTModel"]})
        index.pop("vae", None)
        (out_dir / "model_index.json").write_text(json.dumps(index, indent=2))
        write_meta(model_dir, out_dir, onnx_precision=self.precision)
        return {"format": "onnx (Optimum layout)", "precision": self.precision, "exported_from": source,
                "dynamic_axes": "batch, height, width", "checked_sizes": [meta["native_size"], meta["max_size"]],
                "max_abs_error_vs_torch": errors, "component_atol": COMPONENT_ATOL}

    @staticmethod
    def _export_checked(model_dir: Path, out_dir: Path, meta: dict) -> dict:
        """Exports the four parts in fp32, each checked against torch; their max abs errors."""
        te, unet, vae = load_torch_parts(model_dir)
        parts = _parts(te, unet, vae, meta["max_size"])
        copy_shared(model_dir, out_dir)
        errors = {}
        for name, (mod, examples, ins, outs, shapes) in parts.items():
            path = out_dir / name / "model.onnx"
            _export(mod, examples[0], ins, outs, shapes, path)
            errors[name] = _check(mod, examples, path, name, COMPONENT_ATOL[name])
            src = {"text_encoder": "text_encoder", "unet": "unet"}.get(name, "vae")
            shutil.copy(model_dir / src / "config.json", out_dir / name / "config.json")
        return errors

    def load(self, var_dir: Path, device: str, trusted: bool = False):
        return make_generator(var_dir, OnnxBackend(var_dir, device, self.precision),
                              {"variant": f"onnx-{self.precision}"})
