"""Keeps third-party chatter off the terminal while real warnings still show.

Silenced: the libraries' informational logging (weight-loading reports and progress bars,
optional-kernel probes) and a list of known, harmless warnings by message. Everything else,
including our own warnings and the libraries' errors, still prints.
"""
from __future__ import annotations

import logging
import os
import warnings

# (message regex, category) of warnings that say nothing a user can act on
_KNOWN_NOISE = [
    (r".*is an Enum subclass and is now natively supported by torch.compile.*", None),
    (r".*Please consider pre-processing before quantization.*", None),
    (r".*upcast_vae.*", None),
    (r".*The axis name: .* will not be used, since it shares the same shape constraints.*", UserWarning),
    (r".*TypedStorage is deprecated.*", UserWarning),
    (r".*`resume_download` is deprecated.*", FutureWarning),
    (r".*isinstance\(treespec, LeafSpec\)` is deprecated.*", FutureWarning),
    (r".*copying from a non-meta parameter in the checkpoint to a meta parameter.*", UserWarning),
]


class _DropMessages(logging.Filter):
    """Drops records whose message contains one of ``parts`` (a logger filter: torch's own logging
    setup resets levels when dynamo or the ONNX exporter first runs, but leaves filters alone)."""

    def __init__(self, *parts: str):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(p in record.getMessage() for p in self.parts)


def quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for message, category in _KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category or Warning)
    # Inductor's own oneDNN int8 lowering (int8-static) copies its zero points this way; only there
    warnings.filterwarnings("ignore", message=r".*To copy construct from a tensor.*", category=UserWarning,
                            module=r"torch\._inductor\.mkldnn_lowerings")
    for name in ("torch.utils._pytree", "torchao", "bitsandbytes", "accelerate", "datasets", "onnxruntime",
                 "onnxscript", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # the ONNX exporter lists every torchvision operator it cannot register (16 lines per export)
    logging.getLogger("torch.onnx._internal.exporter._registration").addFilter(
        _DropMessages("torchvision is not installed"))
    # ONNX Runtime's quantizer logs this on the root logger for every graph it quantizes
    logging.getLogger().addFilter(_DropMessages("Please consider to run pre-processing before quantization"))
