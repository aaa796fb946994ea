"""The process environment models load in: offline mode, quiet Hugging Face logging, devices.

``set_offline`` must run before huggingface_hub/transformers/datasets read their flags (and
updates them when they were imported first); ``resolve_device`` turns ``auto`` into the best
available device and refuses, in one line, a device that does not exist.
"""

from __future__ import annotations

import os
import sys

import torch

from lmkl.errors import UsageError
from lmkl.quantization import quiet_backend_logs


def set_offline(offline: bool = True) -> None:
    """Tell huggingface_hub, transformers and datasets not to touch the network.

    They read the variables at import time, so modules already imported (in a notebook, a test
    session, or a program that imported transformers first) get their flags updated too;
    otherwise an unreachable hub costs about a minute of retries before failing.
    """
    if offline:
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            os.environ[name] = "1"
        hub_constants = sys.modules.get("huggingface_hub.constants")
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = True  # read by is_offline_mode(), used by transformers
        datasets_config = sys.modules.get("datasets.config")
        if datasets_config is not None:
            datasets_config.HF_HUB_OFFLINE = True
            datasets_config.HF_DATASETS_OFFLINE = True


def quiet_hf_logging() -> None:
    """Silence transformers' and datasets' own progress bars and info logs (lmkl has its own).

    ``datasets`` is quieted only once something imported it (importing it costs about a second
    and a run on a local file does not need it); whatever imports it later calls this again.
    """
    # transformers imports every installed quantization backend with its models.
    quiet_backend_logs()
    import huggingface_hub
    import transformers

    # huggingface_hub logs every network retry; lmkl reports the final failure in one line.
    huggingface_hub.utils.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets = sys.modules.get("datasets")
    if datasets is not None:
        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA if present, else MPS, else CPU; otherwise the named device, checked."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise UsageError(
            f"unknown device '{device}'", "use auto, cpu, cuda, cuda:N or mps"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"device '{device}' requested but CUDA is not available", "use --device cpu"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(
            f"device '{device}' does not exist ({torch.cuda.device_count()} CUDA devices)",
            "pick an index below the device count",
        )
    return dev


def hub_offline() -> bool:
    """Whether huggingface_hub is told not to touch the network (``HF_HUB_OFFLINE``/--offline)."""
    hub_constants = sys.modules.get("huggingface_hub.constants")
    return os.environ.get("HF_HUB_OFFLINE") == "1" or bool(
        getattr(hub_constants, "HF_HUB_OFFLINE", False)
    )
