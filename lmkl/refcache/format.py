"""Reference caches: run the reference once, compare any number of candidates against it later.

``lmkl cache REFERENCE --data ... --out CACHE_DIR`` writes a directory that stands in for the
reference model wherever one is accepted (``lmkl compare CACHE_DIR CANDIDATE``, or
``reference: {cache: DIR}`` in YAML), so later comparisons load only the candidate. Two modes:

``exact`` (default)
    Per scored token, the reference's final hidden state in the model's dtype (``hidden_size x
    dtype bytes`` per token: 1,152 bytes for a 576-wide bfloat16 model), plus once the output
    layer's weights and its post-processing (soft-capping, logit scaling). The reference logits
    are rebuilt exactly as the live model computes them, so every number of a comparison equals
    the live comparison's. (A model whose output layer cannot be split off stores its logits rows
    instead: exact, but ``vocab x dtype bytes`` per token.)

``top-k`` (``--top-k K``)
    Per token, the reference's K largest log-probabilities and their token ids, the log of the
    remaining (tail) mass, and the reference's exact entropy and target log-probability. KL(P‖Q)
    is then not known exactly; each token gets a guaranteed interval ``[kl_lower, kl_upper]``
    computed against the live candidate (see :func:`topk_kl_bounds`), never a point estimate.

Layout (``manifest.json`` is written last and marks a complete cache; the whole directory is
built under a temporary name and renamed into place)::

    CACHE_DIR/
      manifest.json        format, mode, provenance, data/window settings, shapes, sizes
      tokenizer/           the reference tokenizer (save_pretrained)
      windows.parquet      the windows (token ids, scored range, offsets, target bytes)
      tokens.parquet       per scored token: ids, positions, bytes, reference entropy/NLL/top-1
      head.safetensors     exact mode: output layer weight (and bias)
      rows.bin             exact mode: [tokens, hidden] raw little-endian, model dtype
      topk_ids.bin         top-k mode: [tokens, K] int32
      topk_logprobs.bin    top-k mode: [tokens, K] float32 (sorted, largest first)

Tokens are stored in window order; any later batching (other batch sizes, length-sorted
batches, other process counts) gathers its rows by index.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmkl.data.corpus import load_corpus
from lmkl.data.windows import Window
from lmkl.errors import Busy, DataError, TokenizerMismatchError, UsageError
from lmkl.files import DirectoryLock, empty_directory
from lmkl.specs import ComputeSpec, DataSpec, WindowSpec

MANIFEST = "manifest.json"


FORMAT = "lmkl-reference-cache"


FORMAT_VERSION = 1


NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_cache_dir(path: str | Path) -> bool:
    """Whether ``path`` is a reference cache directory (it holds an lmkl cache manifest)."""
    manifest = Path(str(path)).expanduser() / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    import hashlib

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = [getattr(tokenizer, f"{n}_token_id", None) for n in ("bos", "eos", "unk", "pad")]
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()


def data_key(spec: DataSpec) -> dict[str, Any]:
    """The data settings that decide which tokens a cache holds (labels and weights excluded)."""
    source = spec.source
    path = Path(source).expanduser()
    if path.exists():
        source = str(path.resolve())
    return {
        "source": source,
        "split": spec.split,
        "dataset_config": spec.dataset_config,
        "text_field": spec.text_field,
        "max_samples": spec.max_samples,
        "score_on": spec.score_on,
    }


def window_key(spec: WindowSpec) -> dict[str, Any]:
    return {
        "windowing": spec.windowing,
        "context_length": spec.context_length,
        "stride": spec.effective_stride,
    }


@dataclass
class CacheSettings:
    """The data, windows and compute settings a comparison against a cache runs with."""

    data: DataSpec
    windows: WindowSpec
    compute: ComputeSpec


class ReferenceCache:
    """An opened reference cache: it serves reference rows (or top-k data) for any batch."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.mode: str = manifest["mode"]
        self.top_k: int | None = manifest.get("top_k")
        self.num_tokens: int = manifest["counts"]["tokens"]
        self._tokenizer: Any = None
        self._windows: list[Window] | None = None
        self._starts: dict[int, int] | None = None
        self._head: Any = None
        self.device = torch.device("cpu")

    # -- description -------------------------------------------------------------------------
    @property
    def label(self) -> str:
        return self.manifest["reference"].get("label") or "reference"

    @property
    def description(self) -> dict[str, Any]:
        return self.manifest["reference"] | {"cache": self.summary()}

    def summary(self) -> dict[str, Any]:
        """Where the reference's numbers come from (for results.json)."""
        m = self.manifest
        return {
            "path": str(self.path.resolve()),
            "mode": self.mode,
            "top_k": self.top_k,
            "created": m["created"],
            "bytes_per_token": m["bytes"]["per_token"],
            "row_bytes_per_token": m["bytes"]["row_per_token"],
        }

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab"]["size"])

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.path / "tokenizer"))
            except Exception as exc:  # transformers raises many types for a damaged folder
                raise DataError(
                    f"reference cache '{self.path}': its tokenizer cannot be read "
                    f"({type(exc).__name__})",
                    "rebuild the cache with `lmkl cache`",
                ) from exc
        return self._tokenizer

    # -- settings ------------------------------------------------------------------------------
    def settings(
        self, data: DataSpec | None, windows: WindowSpec | None, compute: ComputeSpec
    ) -> CacheSettings:
        """The cache's own settings, refusing (one line) any given setting that differs."""
        m = self.manifest
        cached_data = DataSpec(**m["data_spec"])
        cached_windows = WindowSpec(**m["window_spec"])
        fix = f"drop the option to use the cache's setting, or rebuild the cache ({self.path})"
        if data is not None:
            ours = data_key(data)
            theirs = data_key(cached_data) | {"source": m["data"]["source"]}
            diff = [
                f"{k}: {ours[k]!r} vs cached {theirs[k]!r}" for k in ours if ours[k] != theirs[k]
            ]
            if diff:
                raise UsageError(f"data differs from the reference cache's ({diff[0]})", fix)
            corpus = load_corpus(data)
            if corpus.description["fingerprint"] != m["data"]["fingerprint"]:
                raise DataError(
                    f"data '{data.source}' changed since the reference cache was built "
                    "(content fingerprint differs)",
                    "rebuild the cache from the current data",
                )
        if windows is not None:
            ours, theirs = window_key(windows), window_key(cached_windows)
            diff = [
                f"{k}: {ours[k]!r} vs cached {theirs[k]!r}" for k in ours if ours[k] != theirs[k]
            ]
            if diff:
                raise UsageError(
                    f"window settings differ from the reference cache's ({diff[0]})", fix
                )
        cached_max = m["compute"]["max_tokens"]
        if compute.max_tokens is not None and compute.max_tokens != cached_max:
            raise UsageError(
                f"--max-tokens {compute.max_tokens} differs from the reference "
                f"cache's ({cached_max})",
                fix,
            )
        if self.mode == "topk" and compute.temperature != m["compute"]["temperature"]:
            raise UsageError(
                f"temperature {compute.temperature} differs from the top-k cache's "
                f"({m['compute']['temperature']}); its log-probabilities are fixed",
                "use the cache's temperature, or an exact cache (no --top-k)",
            )
        return CacheSettings(
            cached_data, cached_windows, compute.model_copy(update={"max_tokens": cached_max})
        )

    def check_tokenizer(self, tokenizer: Any, label: str) -> None:
        """Refuse a candidate whose tokenizer differs from the cached reference's (one line)."""
        try:
            from lmkl.models import check_tokenizers_match

            check_tokenizers_match(self.tokenizer, tokenizer, (self.label, label))
        except TokenizerMismatchError as exc:
            raise TokenizerMismatchError(
                f"{exc.message} (reference cache {self.path})", exc.hint
            ) from None

    # -- windows and rows ----------------------------------------------------------------------
    def windows(self) -> list[Window]:
        """The cached windows, in window order."""
        if self._windows is None:
            import pyarrow.parquet as pq

            table = pq.read_table(self.path / "windows.parquet").to_pydict()
            masks = [
                None if m is None else [bool(x) for x in m]
                for m in table.get("score_mask", [None] * len(table["window_id"]))
            ]
            self._windows = [
                Window(
                    window_id=int(table["window_id"][i]),
                    doc_id=int(table["doc_id"][i]),
                    input_ids=list(table["input_ids"][i]),
                    first_target=int(table["first_target"][i]),
                    offset=int(table["offset"][i]),
                    target_bytes=list(table["target_bytes"][i]),
                    score_mask=masks[i],
                )
                for i in range(len(table["window_id"]))
            ]
            starts, total = {}, 0
            for w in self._windows:
                starts[w.window_id] = total
                total += w.num_targets
            self._starts = starts
        return self._windows

    def token_index(self, windows: list[Window]) -> np.ndarray:
        """Row numbers in the cache of the scored tokens of ``windows``, in batch order."""
        self.windows()
        assert self._starts is not None
        return (
            np.concatenate(
                [
                    np.arange(self._starts[w.window_id], self._starts[w.window_id] + w.num_targets)
                    for w in windows
                ]
            )
            if windows
            else np.zeros(0, dtype=np.int64)
        )

    def expected_sizes(self) -> dict[str, int]:
        """Byte size of each raw array file, from the manifest (a truncated file is refused)."""
        n = max(self.num_tokens, 1)
        if self.mode == "exact":
            info = self.manifest["rows"]
            item = np.dtype(NP_DTYPES.get(info["dtype"], info["dtype"])).itemsize
            return {"rows.bin": n * int(info["shape"][1]) * item}
        k = int(self.top_k or 0)
        return {"topk_ids.bin": n * k * 4, "topk_logprobs.bin": n * k * 4}

    def _array(self, name: str, dtype: str, width: int) -> np.ndarray:
        return np.memmap(
            self.path / name,
            dtype=NP_DTYPES.get(dtype, dtype),
            mode="r",
            shape=(self.num_tokens, width),
        )

    def rows(self, windows: list[Window], device: torch.device | None = None) -> torch.Tensor:
        """Exact mode: the reference rows (hidden states or logits) of these windows' tokens."""
        info = self.manifest["rows"]
        array = self._array("rows.bin", info["dtype"], info["shape"][1])
        rows = torch.from_numpy(np.ascontiguousarray(array[self.token_index(windows)]))
        if info["dtype"] == "bfloat16":
            rows = rows.view(torch.bfloat16)
        return rows.to(device or self.device)

    def topk(self, windows: list[Window]) -> dict[str, torch.Tensor]:
        """Top-k mode: per token ids, log-probs, log tail mass and the exact reference stats."""
        import pyarrow.parquet as pq

        k = int(self.top_k or 0)
        index = self.token_index(windows)
        ids = self._array("topk_ids.bin", "int32", k)[index]
        logprobs = self._array("topk_logprobs.bin", "float32", k)[index]
        if not hasattr(self, "_stats"):
            # Read and converted once: every batch then indexes the NumPy columns.
            table = pq.read_table(
                self.path / "tokens.parquet",
                columns=["log_tail", "entropy_reference", "nll_reference", "nonfinite_reference"],
            )
            self._stats = {
                name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names
            }
        out = {
            "ids": torch.from_numpy(np.ascontiguousarray(ids)).long(),
            "logprobs": torch.from_numpy(np.ascontiguousarray(logprobs)),
        }
        for name in ("log_tail", "entropy_reference", "nll_reference", "nonfinite_reference"):
            column = self._stats[name][index]
            out[name] = torch.from_numpy(np.ascontiguousarray(column))
        return out

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """Exact mode: the reference logits of ``rows``, with the model's own post-processing."""
        if self.manifest["rows"]["kind"] == "logits":
            return rows
        if self._head is None:
            self._head = self._load_head()
        head = self._head
        if head.linear.weight.device != rows.device:
            head.linear.to(rows.device)
        return head(rows)

    def _load_head(self) -> Any:
        from safetensors.torch import load_file

        from lmkl.models import OutputHead

        info = self.manifest["head"]
        tensors = load_file(str(self.path / "head.safetensors"))
        weight = tensors["weight"]
        linear = torch.nn.Linear(
            weight.shape[1], weight.shape[0], bias="bias" in tensors, dtype=weight.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if "bias" in tensors:
                linear.bias.copy_(tensors["bias"])
        linear.eval()
        return OutputHead(
            linear=linear, softcap=info["softcap"], scale=info["scale"], divide_by=info["divide_by"]
        )


def aside_path(out: Path) -> Path:
    """Where the previous cache waits while the new one is renamed into place."""
    return out.parent / f".{out.name}.previous.tmp"


#: The finished cache inside a build directory, until it is renamed into place.
BUILT = "cache"


def build_dir(out: Path) -> Path:
    """Where a build of the cache ``out`` keeps its parts until the cache is installed.

    A run directory of the engine (see :mod:`lmkl.engine.cache_build`), beside ``out`` so that
    the finished cache is renamed into place on the same filesystem. It survives an interrupted
    build (``lmkl cache --resume`` continues from its parts) and is removed once the cache is in
    place.
    """
    return out.parent / f".{out.name}.build"


def remove_leftovers(out: Path, *, locked: bool = False) -> list[str]:
    """Remove what a killed build of ``out`` left that nothing can use any more (names removed).

    That is a build directory whose cache was already installed (the build was killed just
    before removing it) and the temporary directories of builds made before builds could resume
    (``.NAME.XXXXXXXX.tmp``). The parts of an interrupted build are kept: they are what
    ``--resume`` continues from (``--overwrite`` discards them, and a plain rerun names them).
    A build directory is emptied only under its lock: by a build that holds it (``locked``),
    or by taking it here (a live build between its results and its install keeps it).
    """
    removed = []
    work = build_dir(out)
    if (work / "results.json").is_file() and not (work / BUILT).exists():
        try:
            if locked:
                empty_directory(work)
            else:
                with DirectoryLock(work, "reference cache build"):
                    empty_directory(work)
                work.rmdir()
            removed.append(work.name)
        except (Busy, OSError):
            pass
    legacy = re.compile(rf"^\.{re.escape(out.name)}\.[a-z0-9_]{{8}}\.tmp$")
    try:
        entries = list(out.parent.iterdir())
    except OSError:  # an unlistable folder: tidying is not worth failing an open for
        entries = []
    for path in entries:
        if legacy.match(path.name) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return sorted(removed)


def recover(out: Path) -> None:
    """Finish an install that a killed process left half done (see
    :func:`lmkl.refcache.build.install`)."""
    aside = aside_path(out)
    if aside.is_dir():
        if is_cache_dir(out):
            shutil.rmtree(aside, ignore_errors=True)  # the new cache made it: drop the old
        elif not out.exists():
            aside.rename(out)  # killed between the two renames: put the old cache back


#: Manifest entries every reader relies on.
REQUIRED_KEYS = (
    "mode",
    "reference",
    "counts",
    "vocab",
    "data_spec",
    "data",
    "window_spec",
    "compute",
    "created",
    "bytes",
)


def open_cache(path: str | Path) -> ReferenceCache:
    """Open a reference cache, checking its format and files (one-line errors otherwise)."""
    root = Path(str(path)).expanduser()
    recover(root)
    remove_leftovers(root)
    if not is_cache_dir(root):
        raise UsageError(
            f"'{path}' is not an lmkl reference cache (no {MANIFEST})",
            "build one with `lmkl cache REFERENCE --data ... --out DIR`",
        )
    rebuild = "rebuild the cache with `lmkl cache`"
    manifest = json.loads((root / MANIFEST).read_text())
    if manifest.get("version") != FORMAT_VERSION:
        raise UsageError(
            f"reference cache '{path}' has format version "
            f"{manifest.get('version')}; this lmkl reads {FORMAT_VERSION}",
            "rebuild the cache with this lmkl version",
        )
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if manifest.get("mode") == "exact" and not manifest.get("rows"):
        missing.append("rows")
    if missing:
        raise DataError(
            f"reference cache '{path}' is damaged: its manifest lacks {', '.join(missing)}",
            rebuild,
        )
    try:
        cache = ReferenceCache(root, manifest)
        for name, size in cache.expected_sizes().items():
            have = (root / name).stat().st_size if (root / name).exists() else None
            if have != size:
                raise DataError(
                    f"reference cache '{path}' is damaged: {name} holds "
                    f"{'no file' if have is None else f'{have:,} bytes'}, expected {size:,}",
                    rebuild,
                )
        for name in ("windows.parquet", "tokens.parquet"):
            if not (root / name).is_file():
                raise DataError(f"reference cache '{path}' is damaged: {name} is missing", rebuild)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise DataError(
            f"reference cache '{path}' is damaged: its manifest is incomplete ({exc})", rebuild
        ) from exc
    return cache
