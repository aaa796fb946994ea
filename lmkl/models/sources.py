"""Where a model's files are: a local directory, or a hub repo (its cached snapshot).

Checks that a local path can be a model before transformers sees it, lists the weight files that
pin a checkpoint, and reads hub repos without downloading anything (the hub's file listing, or
the local hub cache when offline).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from lmkl.errors import ModelLoadError
from lmkl.models.environment import hub_offline
from lmkl.specs import ModelSpec

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def is_local(spec: ModelSpec) -> bool:
    """Whether ``spec.model`` is a path that exists (else it is a hub id)."""
    return Path(spec.model).expanduser().exists()


def looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else with a separator is meant as a path."""
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or name.count("/") > 1
        or name.endswith("/")
        or (len(name) > 1 and name[1] == ":")
    )


def check_source(spec: ModelSpec) -> None:
    """One-line errors for local paths that cannot be models, before transformers sees them."""
    directory = Path(spec.model).expanduser()
    if not directory.exists():
        if looks_like_path(spec.model):
            raise ModelLoadError(
                f"model directory '{spec.model}' does not exist",
                "check the path (a hub id looks like org/name)",
            )
        return
    if not directory.is_dir():
        raise ModelLoadError(
            f"model path '{spec.model}' is a file, not a model directory",
            "pass the directory that holds config.json and the weights",
        )
    if spec.gguf_file:
        if not (directory / spec.gguf_file).is_file():
            raise ModelLoadError(
                f"GGUF file '{spec.gguf_file}' does not exist in '{spec.model}'",
                "check the file name (ls the directory)",
            )
        return  # a GGUF carries its own config and tokenizer
    if not (directory / "config.json").exists():
        raise ModelLoadError(
            f"'{spec.model}' has no config.json, so it is not a Hugging Face model directory",
            "pass a directory written by save_pretrained (config.json + weights)",
        )


def model_files(spec: ModelSpec, directory: Path) -> list[Path]:
    """The files that hold ``spec``'s weights: its GGUF file, else the directory's weights."""
    if spec.gguf_file:
        return [directory / spec.gguf_file]
    return weight_files(directory)


def weight_files(directory: Path) -> list[Path]:
    """The safetensors and pickle weight files directly in ``directory``."""
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and (p.suffix == ".safetensors" or p.suffix in PICKLE_SUFFIXES)
    )


def adapter_files(directory: Path) -> list[Path]:
    """The weight files of a PEFT adapter directory (``adapter_model.*``)."""
    return sorted(
        p for p in directory.iterdir() if p.is_file() and p.name.startswith("adapter_model")
    )


def hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The local hub-cache folder of ``repo_id`` at ``revision`` (a commit, branch or tag), or
    None when it is not cached. Never touches the network."""
    from huggingface_hub import snapshot_download

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            folder = snapshot_download(repo_id, revision=revision, local_files_only=True)
    except Exception:  # not cached (or not a valid repo id): unknown, not an error here
        return None
    return Path(folder) if Path(folder).is_dir() else None


def hub_repo_files(repo_id: str, revision: str | None) -> list[str] | None:
    """Names of the files of hub repo ``repo_id`` at ``revision``, without downloading any.

    Online: the hub's file listing. Offline (or when the hub cannot be reached): the files of the
    cached snapshot, which is all that an offline load could read. None when neither is known.
    """
    if not hub_offline():
        from huggingface_hub import HfApi

        try:
            return sorted(HfApi().list_repo_files(repo_id, revision=revision))
        except Exception:  # unreachable hub, unknown repo: fall back to the cache
            pass
    folder = hub_snapshot(repo_id, revision)
    if folder is None:
        return None
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def hub_weight_bytes(spec: ModelSpec, commit: str | None) -> int | None:
    """Bytes of the weight files a hub model was loaded from, as they lie in the hub cache
    (None when the snapshot is not in the cache, e.g. a model loaded from another cache_dir).

    Safetensors files are counted when the snapshot has any (transformers loads those first),
    else its pickle files; a GGUF model counts its one file.
    """
    folder = hub_snapshot(spec.model, commit or spec.revision)
    if folder is None:
        return None
    if spec.gguf_file:
        files = [folder / spec.gguf_file] if (folder / spec.gguf_file).is_file() else []
    else:
        found = weight_files(folder)
        safe = [p for p in found if p.suffix == ".safetensors"]
        files = safe or found
    return int(sum(p.stat().st_size for p in files)) if files else None
