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

import datetime as _dt
import gc
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmkl.data.corpus import Corpus, Window, load_corpus, make_windows
from lmkl.errors import DataError, Interrupted, OutputError, TokenizerMismatchError, UsageError
from lmkl.specs import ComputeSpec, DataSpec, ModelSpec, OutputSpec, WindowSpec

MANIFEST = "manifest.json"
FORMAT = "lmkl-reference-cache"
FORMAT_VERSION = 1
#: Tail values per side used to tighten the top-k KL interval (see :func:`topk_kl_bounds`).
TAIL_VALUES = 64

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_cache_dir(path: str | Path) -> bool:
    """Whether ``path`` is a reference cache directory (it holds an lmkl cache manifest)."""
    manifest = Path(str(path)).expanduser() / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def cache_reference_spec(cache_dir: str | Path, label: str | None = None) -> ModelSpec:
    """The :class:`ModelSpec` that makes a cache directory the reference of a comparison.

    For YAML experiments: ``reference: {cache: DIR}`` is ``ModelSpec(model=DIR)``; pass
    ``data=None`` and ``windows=None`` to :func:`~lmkl.engine.runner.run_comparison` to use
    the cache's.
    """
    return ModelSpec(model=str(cache_dir), label=label)


# ---------------------------------------------------------------------------------------------
# The KL interval of the top-k mode
# ---------------------------------------------------------------------------------------------


def _fill(values: torch.Tensor, mass: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """Σ m_i·v_i when ``mass`` is poured onto ``values`` in order, at most ``cap`` per value.

    Mass left after the last value is put on the last value: the caller passes the extreme
    ``values`` of a set, so every remaining token's value lies beyond the last one and the
    result stays a valid bound. ``0 · -inf`` counts as 0.
    """
    n = values.shape[-1]
    before = cap[:, None] * torch.arange(n, dtype=values.dtype, device=values.device)
    share = (mass[:, None] - before).clamp(min=0.0)
    share = torch.minimum(share, cap[:, None].expand_as(share)).clone()
    share[:, -1] += (mass - cap * n).clamp(min=0.0)
    return torch.where(share > 0, share * values, torch.zeros_like(values)).sum(-1)


def topk_kl_bounds(
    top_logprobs: torch.Tensor,
    top_ids: torch.Tensor,
    log_tail: torch.Tensor,
    entropy: torch.Tensor,
    candidate_logprobs: torch.Tensor,
    tail_values: int = TAIL_VALUES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Guaranteed bounds on KL(P‖Q) from P's top-k, its tail mass and entropy, and all of Q.

    Inputs per row: ``top_logprobs`` [N, K] (log p of P's K most likely tokens, largest first),
    ``top_ids`` [N, K], ``log_tail`` [N] (log of P's remaining mass p_T), ``entropy`` [N] (H(P),
    exact) and ``candidate_logprobs`` [N, V] (log q, all of it: the candidate runs live).
    Returns ``(lower, upper, top_part)`` where ``top_part = Σ_top p·(log p − log q)`` is the exact
    contribution of the top-k tokens.

    The math. Split KL = A + T − S with A = ``top_part``, T = Σ_tail p log p and
    S = Σ_tail p log q. T is known exactly from the entropy: T = −H(P) − Σ_top p log p. S is
    not, but the tail probabilities satisfy 0 ≤ p_x ≤ p_K (no tail token is more likely than the
    K-th) and Σ_tail p_x = p_T, while log q is known for every tail token. So S lies between the
    values of pouring the mass p_T, at most p_K per token, onto the tail tokens with the smallest
    log q (S_min) or the largest log q (S_max): a fractional knapsack, solved greedily from the
    ``tail_values`` extreme values on each side (mass beyond them is put on the last one, which
    only widens the bound). Hence A + T − S_max ≤ KL ≤ A + T − S_min. A second lower bound comes
    from the data-processing inequality on the partition {each top-k token, the tail}:
    KL ≥ A + p_T log(p_T / q_T). ``lower`` is the larger of the two (and ≥ 0).

    Without the entropy (top-k and tail mass only) a finite upper bound still exists whenever Q
    gives every tail token positive probability: Σ_tail p log p ≤ p_T log min(p_T, p_K), so
    KL ≤ A + p_T log min(p_T, p_K) − S_min; lmkl stores the entropy because it is tighter. If Q
    gives some tail token zero probability, the upper bound is +inf (the KL may be infinite).
    Bounds hold for the float32 inputs up to rounding; a slack of 1e-6 relative is added.
    """
    f64 = torch.float64
    lp_top = top_logprobs.to(f64)
    lq = candidate_logprobs
    lq_top = lq.gather(-1, top_ids.long()).to(f64)
    p_top = lp_top.exp()
    finite_p = torch.isfinite(lp_top)
    zero = torch.zeros((), dtype=f64, device=lp_top.device)
    top_terms = torch.where(finite_p & (p_top > 0), p_top * (lp_top - lq_top), zero)
    top_part = top_terms.sum(-1)

    log_tail = log_tail.to(f64)
    p_tail = log_tail.exp()
    tail_plogp = -entropy.to(f64) - torch.where(finite_p, p_top * lp_top, zero).sum(-1)
    cap = p_top[:, -1]

    masked_low = lq.scatter(-1, top_ids.long(), float("-inf"))
    n_tail = lq.shape[-1] - top_ids.shape[-1]
    m = max(1, min(tail_values, n_tail))
    if n_tail > 0:
        highest = masked_low.topk(m, dim=-1).values.to(f64)
        masked_high = lq.scatter(-1, top_ids.long(), float("inf"))
        lowest = masked_high.topk(m, dim=-1, largest=False).values.to(f64)
        log_q_tail = torch.logsumexp(masked_low, -1).to(f64)
        s_max = _fill(highest, p_tail, cap)
        s_min = _fill(lowest, p_tail, cap)
    else:
        log_q_tail = torch.full_like(p_tail, -math.inf)
        s_max = s_min = torch.zeros_like(p_tail)
    no_tail = p_tail <= 0
    s_max = torch.where(no_tail, zero, s_max)
    s_min = torch.where(no_tail, zero, s_min)
    tail_plogp = torch.where(no_tail, zero, tail_plogp)

    lower_entropy = top_part + tail_plogp - s_max
    dpi = torch.where(no_tail, zero, p_tail * (log_tail - log_q_tail))
    lower_dpi = top_part + dpi
    upper = top_part + tail_plogp - s_min
    slack = 1e-6 * (
        1.0 + top_part.abs().nan_to_num(0.0, 0.0, 0.0) + tail_plogp.abs().nan_to_num(0.0, 0.0, 0.0)
    )
    lower = (torch.maximum(lower_entropy, lower_dpi) - slack).clamp(min=0.0)
    upper = torch.maximum(upper + slack, lower)
    return lower, upper, top_part


# ---------------------------------------------------------------------------------------------
# The cache on disk
# ---------------------------------------------------------------------------------------------


def _torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    import hashlib

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = [getattr(tokenizer, f"{n}_token_id", None) for n in ("bos", "eos", "unk", "pad")]
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()


def _data_key(spec: DataSpec) -> dict[str, Any]:
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
    }


def _window_key(spec: WindowSpec) -> dict[str, Any]:
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

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.path / "tokenizer"))
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
            ours = _data_key(data)
            theirs = _data_key(cached_data) | {"source": m["data"]["source"]}
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
            ours, theirs = _window_key(windows), _window_key(cached_windows)
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
            self._windows = [
                Window(
                    window_id=int(table["window_id"][i]),
                    doc_id=int(table["doc_id"][i]),
                    input_ids=list(table["input_ids"][i]),
                    first_target=int(table["first_target"][i]),
                    offset=int(table["offset"][i]),
                    target_bytes=list(table["target_bytes"][i]),
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

    def _array(self, name: str, dtype: str, width: int) -> np.ndarray:
        return np.memmap(
            self.path / name,
            dtype=_NP_DTYPES.get(dtype, dtype),
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
            self._stats = pq.read_table(
                self.path / "tokens.parquet",
                columns=["log_tail", "entropy_reference", "nll_reference", "nonfinite_reference"],
            )
        out = {
            "ids": torch.from_numpy(np.ascontiguousarray(ids)).long(),
            "logprobs": torch.from_numpy(np.ascontiguousarray(logprobs)),
        }
        for name in ("log_tail", "entropy_reference", "nll_reference", "nonfinite_reference"):
            column = self._stats[name].to_numpy(zero_copy_only=False)[index]
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


def open_cache(path: str | Path) -> ReferenceCache:
    """Open a reference cache, checking its format (one-line error otherwise)."""
    root = Path(str(path)).expanduser()
    if not is_cache_dir(root):
        raise UsageError(
            f"'{path}' is not an lmkl reference cache (no {MANIFEST})",
            "build one with `lmkl cache REFERENCE --data ... --out DIR`",
        )
    manifest = json.loads((root / MANIFEST).read_text())
    if manifest.get("version") != FORMAT_VERSION:
        raise UsageError(
            f"reference cache '{path}' has format version "
            f"{manifest.get('version')}; this lmkl reads {FORMAT_VERSION}",
            "rebuild the cache with this lmkl version",
        )
    return ReferenceCache(root, manifest)


# ---------------------------------------------------------------------------------------------
# Building a cache
# ---------------------------------------------------------------------------------------------


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise OutputError(
                f"'{out}' already exists", "pass --overwrite to replace it, or choose another --out"
            )
        if not is_cache_dir(out):
            raise OutputError(
                f"'{out}' is not empty and is not an lmkl cache; refusing to delete it",
                "choose an empty or new --out directory",
            )


@torch.inference_mode()
def build_cache(
    reference: ModelSpec,
    data: DataSpec,
    windows: WindowSpec,
    compute: ComputeSpec,
    out: str | Path,
    *,
    top_k: int | None = None,
    overwrite: bool = False,
    progress: Any = None,
    log: Any = None,
) -> dict[str, Any]:
    """Run ``reference`` once over ``data`` and write a reference cache to ``out``.

    ``top_k=None`` writes the exact cache; ``top_k=K`` the compact one. Returns the manifest.
    The cache is written under a temporary name and renamed into place when complete.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    from lmkl.engine.runner import make_batches, model_rows
    from lmkl.models import load_model, resolve_device, tokenizer_adds_bos

    log = log or (lambda _msg: None)
    out = Path(out).expanduser()
    _prepare_out(out, overwrite)
    if top_k is not None and top_k < 1:
        raise UsageError("--top-k must be at least 1", "pass --top-k 32, for example")
    started = _dt.datetime.now(_dt.timezone.utc)
    log(f"loading reference {reference.model}")
    model = load_model(reference, resolve_device(reference.device))
    from lmkl.engine.runner import check_context_length, shared_vocab_size

    check_context_length([model], windows)
    vocab_size, padded = shared_vocab_size([model])
    log(f"reading data {data.source}")
    corpus = load_corpus(data)
    adds_bos = tokenizer_adds_bos(model.tokenizer)
    window_list = make_windows(corpus, model.tokenizer, windows, adds_bos, compute.max_tokens)
    total = sum(w.num_targets for w in window_list)
    starts = np.cumsum([0] + [w.num_targets for w in window_list])
    start_of = {w.window_id: int(starts[i]) for i, w in enumerate(window_list)}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        mode = "exact" if top_k is None else "topk"
        kind = "hidden" if model.head is not None else "logits"
        rows_dtype = _torch_dtype_name(next(model.model.parameters()).dtype)
        arrays: dict[str, np.memmap] = {}
        if mode == "exact":
            width = (
                model.model.get_output_embeddings().weight.shape[1]
                if kind == "hidden"
                else model.logits_width
            )
            arrays["rows"] = np.memmap(
                tmp / "rows.bin",
                dtype=_NP_DTYPES[rows_dtype],
                mode="w+",
                shape=(max(total, 1), width),
            )
        else:
            k = min(int(top_k or 0), vocab_size)
            arrays["ids"] = np.memmap(
                tmp / "topk_ids.bin", dtype=np.int32, mode="w+", shape=(max(total, 1), k)
            )
            arrays["logprobs"] = np.memmap(
                tmp / "topk_logprobs.bin", dtype=np.float32, mode="w+", shape=(max(total, 1), k)
            )
        stats = {
            name: np.full(total, np.nan, dtype=np.float32)
            for name in ("log_tail", "entropy_reference", "nll_reference", "reference_top1_prob")
        }
        nonfinite = np.zeros(total, dtype=bool)
        pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
        chunk = compute.chunk_size(vocab_size, 6)
        done = 0
        t0 = time.perf_counter()
        try:
            for batch in make_batches(
                window_list, compute.batch_size, pad_id, max_batch_tokens=compute.max_batch_tokens
            ):
                index = np.concatenate(
                    [
                        np.arange(start_of[w.window_id], start_of[w.window_id] + w.num_targets)
                        for w in batch.windows
                    ]
                )
                rows = model_rows(model, batch)
                if mode == "exact":
                    values = rows.detach().cpu()
                    if rows_dtype == "bfloat16":
                        values = values.view(torch.uint16)
                    arrays["rows"][index] = values.numpy()
                else:
                    for s in range(0, index.size, chunk):
                        logits = model.logits(rows[s : s + chunk])[..., :vocab_size].float()
                        part = _topk_stats(
                            logits, batch.targets[s : s + chunk], k, compute.temperature
                        )
                        idx = index[s : s + chunk]
                        arrays["ids"][idx] = part["ids"].numpy()
                        arrays["logprobs"][idx] = part["logprobs"].numpy()
                        for name in stats:
                            stats[name][idx] = part[name].numpy()
                        nonfinite[idx] = part["nonfinite"].numpy()
                done += index.size
                if progress:
                    progress(done, total)
        except KeyboardInterrupt as exc:
            raise Interrupted(
                "interrupted while building the cache; nothing was written", "run the command again"
            ) from exc
        seconds = time.perf_counter() - t0
        for array in arrays.values():
            array.flush()
        del arrays

        meta: dict[str, list[Any]] = {
            k: [] for k in ("window_id", "doc_id", "position", "window_pos", "token_id", "bytes")
        }
        for w in window_list:
            js = range(w.first_target, len(w.input_ids))
            meta["window_id"].extend([w.window_id] * len(js))
            meta["doc_id"].extend([w.doc_id] * len(js))
            meta["position"].extend(w.offset + j for j in js)
            meta["window_pos"].extend(js)
            meta["token_id"].extend(w.input_ids[j] for j in js)
            meta["bytes"].extend(w.target_bytes)
        token_columns: dict[str, Any] = {k: np.asarray(v, dtype=np.int64) for k, v in meta.items()}
        token_columns.update(stats)
        token_columns["nonfinite_reference"] = nonfinite
        pq.write_table(pa.table(token_columns), tmp / "tokens.parquet")
        pq.write_table(
            pa.table(
                {
                    "window_id": [w.window_id for w in window_list],
                    "doc_id": [w.doc_id for w in window_list],
                    "input_ids": pa.array([w.input_ids for w in window_list], pa.list_(pa.int32())),
                    "first_target": [w.first_target for w in window_list],
                    "offset": [w.offset for w in window_list],
                    "target_bytes": pa.array(
                        [w.target_bytes for w in window_list], pa.list_(pa.int32())
                    ),
                }
            ),
            tmp / "windows.parquet",
        )

        head_info = None
        if mode == "exact" and kind == "hidden":
            assert model.head is not None
            linear = model.head.linear
            tensors = {"weight": linear.weight.detach().cpu().contiguous().clone()}
            if getattr(linear, "bias", None) is not None:
                tensors["bias"] = linear.bias.detach().cpu().contiguous().clone()
            save_file(tensors, str(tmp / "head.safetensors"))
            head_info = {
                "softcap": model.head.softcap,
                "scale": model.head.scale,
                "divide_by": model.head.divide_by,
                "shape": list(tensors["weight"].shape),
                "dtype": rows_dtype,
                "bias": "bias" in tensors,
            }

        if mode == "exact":
            row_bytes = int(np.dtype(_NP_DTYPES[rows_dtype]).itemsize * width)
            rows_info = {"kind": kind, "dtype": rows_dtype, "shape": [total, width]}
        else:
            row_bytes = int(k * (4 + 4))
            rows_info = None
        files = [p for p in tmp.rglob("*") if p.is_file()]
        total_bytes = int(sum(p.stat().st_size for p in files))
        from lmkl.engine.runner import _versions

        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "mode": mode,
            "top_k": k if mode == "topk" else None,
            "reference": model.description,
            "tokenizer": {
                "fingerprint": _tokenizer_fingerprint(model.tokenizer),
                "size": len(model.tokenizer),
                "adds_bos": adds_bos,
            },
            "vocab": {"size": vocab_size, "logits_width": model.logits_width, "padded": padded},
            "rows": rows_info,
            "head": head_info,
            "data_spec": data.model_dump(),
            "data": corpus.description,
            "window_spec": windows.model_dump(),
            "windowing": _window_key(windows) | {"adds_bos": adds_bos},
            "compute": {
                "max_tokens": compute.max_tokens,
                "temperature": compute.temperature,
                "batch_size": compute.batch_size,
                "max_batch_tokens": compute.max_batch_tokens,
            },
            "counts": {
                "documents": len({w.doc_id for w in window_list}),
                "windows": len(window_list),
                "tokens": total,
            },
            "bytes": {
                "row_per_token": row_bytes,
                "total": total_bytes,
                "per_token": total_bytes / max(total, 1),
            },
            "seconds": seconds,
            "created": started.isoformat(),
            "versions": _versions(),
        }
        from lmkl.analysis.stats import to_json_safe

        (tmp / MANIFEST).write_text(
            json.dumps(to_json_safe(manifest), indent=2, allow_nan=False, default=str) + "\n"
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _topk_stats(
    logits: torch.Tensor, targets: torch.Tensor, k: int, temperature: float
) -> dict[str, torch.Tensor]:
    """Top-k log-probs and ids, log tail mass, entropy, target NLL and top-1 prob per row."""
    from lmkl.scoring.divergence import nonfinite_rows

    bad = nonfinite_rows(logits)
    if bad.any():
        logits = torch.where(bad[:, None], torch.zeros_like(logits), logits)
    lp = torch.log_softmax(logits / temperature if temperature != 1.0 else logits, -1)
    top = lp.topk(k, dim=-1)
    p = lp.exp()
    plogp = torch.where(torch.isneginf(lp), torch.zeros_like(lp), p * lp)
    entropy = -plogp.sum(-1, dtype=torch.float64)
    del plogp, p
    log_tail = lp.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
    nll = -lp.gather(-1, targets.to(lp.device).long()[:, None]).squeeze(-1)
    out = {
        "ids": top.indices.int().cpu(),
        "logprobs": top.values.float().cpu(),
        "log_tail": log_tail.float().cpu(),
        "entropy_reference": entropy.float().cpu(),
        "nll_reference": nll.float().cpu(),
        "reference_top1_prob": top.values[:, 0].exp().float().cpu(),
        "nonfinite": bad.cpu(),
    }
    for name in ("log_tail", "entropy_reference", "nll_reference", "reference_top1_prob"):
        out[name][out["nonfinite"]] = float("nan")
    return out


# ---------------------------------------------------------------------------------------------
# Comparing candidates against a cache
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def score_batch_topk(
    batch: Any,
    cache: ReferenceCache,
    candidate: Any,
    vocab_size: int,
    chunk_size: int,
    temperature: float,
    worst_k: int,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, list[dict[str, Any]]]]:
    """Per-token metrics of one candidate against a top-k cache: exact ones, and KL bounds."""
    from lmkl.engine.runner import model_rows
    from lmkl.scoring.divergence import nonfinite_rows

    ref = cache.topk(batch.windows)
    rows = model_rows(candidate, batch)
    targets = batch.targets
    parts: list[dict[str, torch.Tensor]] = []
    worst: list[tuple[float, dict[str, Any]]] = []
    for start in range(0, targets.numel(), chunk_size):
        stop = start + chunk_size
        logits = candidate.logits(rows[start:stop])[..., :vocab_size].float()
        bad = nonfinite_rows(logits) | ref["nonfinite_reference"][start:stop].to(logits.device)
        if bad.any():
            logits = torch.where(bad[:, None], torch.zeros_like(logits), logits)
        lq = torch.log_softmax(logits / temperature if temperature != 1.0 else logits, -1)
        ids = ref["ids"][start:stop].to(lq.device)
        lp_top = ref["logprobs"][start:stop].to(lq.device)
        lower, upper, _ = topk_kl_bounds(
            lp_top,
            ids,
            ref["log_tail"][start:stop].to(lq.device),
            ref["entropy_reference"][start:stop].to(lq.device),
            lq,
        )
        q = lq.exp()
        hq = -torch.where(torch.isneginf(lq), torch.zeros_like(lq), q * lq).sum(-1)
        tgt = targets[start:stop].to(lq.device).long()[:, None]
        lq_x = lq.gather(-1, tgt).squeeze(-1)
        nll_p = ref["nll_reference"][start:stop].to(lq.device)
        ref_top = ids[:, 0]
        rank = (lq > lq.gather(-1, ref_top[:, None])).sum(-1)
        nan = torch.full_like(lower, math.nan)
        out = {
            "kl": nan,
            "reverse_kl": nan,
            "jsd": nan,
            "entropy_reference": ref["entropy_reference"][start:stop].to(lq.device),
            "entropy_candidate": hq,
            "nll_reference": nll_p,
            "nll_candidate": -lq_x,
            "delta_p": lq_x.exp() - (-nll_p).exp(),
            "top1_agree": (lq.argmax(-1) == ref_top).float(),
            "top1_in_top5": (rank < 5).float(),
            "reference_top1_prob": lp_top[:, 0].exp(),
            "kl_lower": lower,
            "kl_upper": upper,
        }
        out = {name: value.float().cpu() for name, value in out.items()}
        badc = bad.cpu()
        for value in out.values():
            value[badc] = math.nan
        out["nonfinite"] = badc
        parts.append(out)
        if worst_k:
            order = torch.nan_to_num(out["kl_lower"], nan=-1.0)
            take = min(worst_k, order.numel())
            values, idx = order.topk(take)
            q_top = lq[idx.to(lq.device)].topk(min(5, lq.shape[-1]), -1)
            for n, (value, i) in enumerate(zip(values.tolist(), idx.tolist(), strict=True)):
                if value < 0:
                    continue
                worst.append(
                    (
                        value,
                        {
                            "row": start + i,
                            "kl": value,
                            "kl_upper": float(out["kl_upper"][i]),
                            "reference_top5": list(
                                zip(ids[i, :5].tolist(), lp_top[i, :5].exp().tolist(), strict=True)
                            ),
                            "candidate_top5": list(
                                zip(
                                    q_top.indices[n].tolist(),
                                    q_top.values[n].exp().tolist(),
                                    strict=True,
                                )
                            ),
                        },
                    )
                )
        del logits, lq, q
    metrics = {name: torch.cat([p[name] for p in parts]).numpy() for name in parts[0]}
    worst.sort(key=lambda t: -t[0])
    return {candidate.label: metrics}, {candidate.label: [e for _, e in worst[:worst_k]]}


def run_cached_comparison(
    reference: ModelSpec,
    candidates: list[ModelSpec],
    data: DataSpec | None,
    windows: WindowSpec | None,
    compute: ComputeSpec,
    output: OutputSpec,
    *,
    resume: bool = False,
    progress: Any = None,
    log: Any = None,
) -> Any:
    """:func:`lmkl.engine.runner.run_comparison` with a reference cache as the reference.

    Candidates are loaded one at a time (only one model is ever in memory) and each is scored
    over every batch; parts are numbered ``candidate x batches + batch``. Multi-process runs
    share the parts out as in the live case.
    """
    from lmkl.engine.distributed import device_for_rank, init_shard
    from lmkl.engine.rundir import BOUNDS_SCHEMA
    from lmkl.engine.runner import (
        RunOutcome,
        _build_results,
        _collect_worst,
        _save_batch,
        check_context_length,
        completed_indices,
        default_run_dir,
        gather_parts,
        make_batches,
        make_kernel,
        open_shared_run_dir,
        resolved_config,
        score_batch,
    )
    from lmkl.models import load_model, load_tokenizer, resolve_device

    log = log or (lambda _msg: None)
    cache = open_cache(reference.model)
    settings = cache.settings(data, windows, compute)
    compute = settings.compute
    for spec in candidates:
        cache.check_tokenizer(load_tokenizer(spec), spec.display_name)
    config = resolved_config(reference, candidates, settings.data, settings.windows, compute)
    config["reference_cache"] = cache.summary()
    out_path = (
        Path(output.dir)
        if output.dir
        else default_run_dir(reference.model_copy(update={"label": cache.label}), candidates)
    )
    shard = init_shard()
    try:
        out_path = shard.broadcast(out_path)  # a default name holds a time stamp: use rank 0's
        run_dir = open_shared_run_dir(
            shard, out_path, config, resume=resume, overwrite=output.overwrite
        )
        if cache.mode == "topk":
            run_dir.schema = BOUNDS_SCHEMA
        started = _dt.datetime.now(_dt.timezone.utc)
        torch.manual_seed(compute.seed)
        window_list = cache.windows()
        pad_id = cache.tokenizer.pad_token_id
        groups = list(
            make_batches(
                window_list,
                compute.batch_size,
                pad_id if pad_id is not None else 0,
                max_batch_tokens=compute.max_batch_tokens,
            )
        )
        n_batches = len(groups)
        total_targets = cache.num_tokens
        vocab_size = cache.vocab_size
        padded = bool(cache.manifest["vocab"]["padded"])
        done = completed_indices(run_dir)
        seconds = cpu_seconds = 0.0
        scored_now = real_slots = padded_slots = 0
        loaded: list[Any] = []
        chunk = 0
        backends = set()
        for ci, spec in enumerate(candidates):
            spec = spec.model_copy(update={"device": device_for_rank(spec.device, shard)})
            todo = [
                b
                for b in range(n_batches)
                if shard.owns(ci * n_batches + b) and ci * n_batches + b not in done
            ]
            log(f"loading candidate {spec.model}")
            model = load_model(spec, resolve_device(spec.device))
            check_context_length([model], settings.windows)
            if model.logits_width < vocab_size:
                raise TokenizerMismatchError(
                    f"{model.label} has {model.logits_width} output rows but the cached "
                    f"reference compares {vocab_size} tokens",
                    "use models with one vocabulary",
                )
            padded = padded or model.logits_width != len(cache.tokenizer)
            kernel, chunk = make_kernel(compute, vocab_size, total_targets, log)
            if cache.mode == "topk":
                chunk = compute.chunk_size(vocab_size, 8)
            try:
                for b in todo:
                    batch = groups[b]
                    t0, c0 = time.perf_counter(), time.process_time()
                    if cache.mode == "topk":
                        per_candidate, worst = score_batch_topk(
                            batch,
                            cache,
                            model,
                            vocab_size,
                            chunk,
                            compute.temperature,
                            compute.worst_k,
                        )
                    else:
                        rows = cache.rows(batch.windows, model.device)
                        per_candidate, worst = score_batch(
                            batch,
                            cache,
                            [model],
                            vocab_size,
                            chunk,
                            compute.temperature,
                            compute.worst_k,
                            kernel=kernel,
                            reference_rows=rows,
                        )
                    seconds += time.perf_counter() - t0
                    cpu_seconds += time.process_time() - c0
                    real_slots += int(batch.attention_mask.sum())
                    padded_slots += batch.attention_mask.numel()
                    scored_now += batch.targets.numel()
                    _save_batch(run_dir, ci * n_batches + b, batch, per_candidate, worst)
                    if progress and shard.is_main:
                        progress(
                            min(total_targets * len(candidates), scored_now * shard.world_size),
                            total_targets * len(candidates),
                        )
            except KeyboardInterrupt as exc:
                raise Interrupted(
                    f"interrupted; completed parts are kept in {run_dir.path}",
                    f"continue with the same command plus --resume --out {run_dir.path}",
                ) from exc
            backends.add(kernel.backend if cache.mode == "exact" else "topk-bounds")
            loaded.append(_Described(model.label, model.description))
            # Sequential mode: free this candidate before the next one is loaded.
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

        totals = gather_parts(
            shard,
            run_dir,
            n_batches * len(candidates),
            {
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "scored_now": scored_now,
                "real_slots": real_slots,
                "padded_slots": padded_slots,
            },
        )

        def finish() -> dict[str, Any]:
            assert totals is not None
            ended = _dt.datetime.now(_dt.timezone.utc)
            corpus = Corpus(documents=[], description=cache.manifest["data"], stream_text="")
            results = _build_results(
                run_dir,
                config,
                cache,
                loaded,
                corpus,
                window_list,
                settings.windows,
                vocab_size,
                padded,
                chunk,
                totals["seconds"],
                int(totals["scored_now"]) // max(len(candidates), 1),
                started,
                ended,
                int(totals["real_slots"]),
                int(totals["padded_slots"]),
            )
            results["compute"]["kernel"] = (
                sorted(backends)[0] if len(backends) == 1 else (sorted(backends))
            )
            results["throughput"]["processes"] = shard.world_size
            results["throughput"]["cpu_seconds"] = totals["cpu_seconds"]
            results["reference_cache"] = cache.summary()
            if cache.mode == "topk":
                _add_bounds(run_dir, results)
            worst_entries = _collect_worst(run_dir, window_list, cache.tokenizer, compute.worst_k)
            run_dir.finalize(results, worst_entries)
            return results

        results = shard.on_main(finish)
        return RunOutcome(path=run_dir.path, results=results, is_main=shard.is_main)
    finally:
        shard.close()


@dataclass
class _Described:
    """A candidate after it has been unloaded: what the results need of it."""

    label: str
    description: dict[str, Any]


def _add_bounds(run_dir: Any, results: dict[str, Any]) -> None:
    """Summaries of the per-token KL bounds (their means and quantiles bound the KL's)."""
    import pyarrow.compute as pc

    from lmkl.analysis.stats import distribution

    table = run_dir.read_parts()
    for entry in results["candidates"]:
        rows = table.filter(pc.equal(table["candidate"], entry["label"]))
        keep = ~rows["nonfinite"].to_numpy(zero_copy_only=False)
        lower = rows["kl_lower"].to_numpy(zero_copy_only=False).astype(np.float64)[keep]
        upper = rows["kl_upper"].to_numpy(zero_copy_only=False).astype(np.float64)[keep]
        entry["metrics"]["kl_bounds"] = {
            "lower": distribution(lower),
            "upper": distribution(upper),
            "note": "compact (top-k) reference cache: KL(P‖Q) is only known to lie in "
            "[lower, upper] per token; means and quantiles of the bounds bound the KL's",
        }
