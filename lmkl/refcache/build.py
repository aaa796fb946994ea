"""Build a reference cache: run the reference once over the data and store what comparisons need.

The cache is written under a temporary name beside its destination, fsync-ed, and installed by
renames that never leave the destination without a complete cache (see :func:`install`).
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmkl.data.corpus import load_corpus
from lmkl.data.windows import make_windows, scored_positions
from lmkl.environment import versions
from lmkl.errors import Interrupted, OutputError, UsageError
from lmkl.files import fsync_dir, fsync_tree, to_json_safe
from lmkl.refcache.format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    NP_DTYPES,
    aside_path,
    is_cache_dir,
    recover,
    tokenizer_fingerprint,
    torch_dtype_name,
    window_key,
)
from lmkl.specs import ComputeSpec, DataSpec, ModelSpec, WindowSpec


def install(tmp: Path, out: Path) -> None:
    """Make the complete cache in ``tmp`` the cache at ``out``, durably.

    Every file is fsync-ed first. An existing cache is renamed aside, the new one renamed into
    place, then the old one removed: a crash leaves either cache complete, and
    :func:`recover` (run by every open and build) puts the old one back if the new one had not
    arrived yet. No moment exists where a reader finds a half-written cache at ``out``.
    """
    fsync_tree(tmp)
    recover(out)
    aside = aside_path(out)
    if out.exists():
        out.rename(aside)
    try:
        tmp.rename(out)
    except BaseException:
        if aside.exists() and not out.exists():
            aside.rename(out)
        raise
    fsync_dir(out.parent)
    shutil.rmtree(aside, ignore_errors=True)


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

    from lmkl.models import (
        check_context_length,
        load_model,
        resolve_device,
        shared_vocab_size,
        tokenizer_adds_bos,
    )
    from lmkl.scoring.batches import make_batches, model_rows
    from lmkl.scoring.topk import topk_stats

    log = log or (lambda _msg: None)
    out = Path(out).expanduser()
    recover(out)
    _prepare_out(out, overwrite)
    if top_k is not None and top_k < 1:
        raise UsageError("--top-k must be at least 1", "pass --top-k 32, for example")
    started = _dt.datetime.now(_dt.timezone.utc)
    log(f"loading reference {reference.model}")
    model = load_model(reference, resolve_device(reference.device))
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
        rows_dtype = torch_dtype_name(next(model.model.parameters()).dtype)
        arrays: dict[str, np.memmap] = {}
        if mode == "exact":
            width = (
                model.model.get_output_embeddings().weight.shape[1]
                if kind == "hidden"
                else model.logits_width
            )
            arrays["rows"] = np.memmap(
                tmp / "rows.bin",
                dtype=NP_DTYPES[rows_dtype],
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
                        part = topk_stats(
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
            # The scored targets only: chat data scores the assistant's tokens (score_mask).
            js = scored_positions(w)
            target_bytes = [w.target_bytes[j - w.first_target] for j in js]
            meta["window_id"].extend([w.window_id] * len(js))
            meta["doc_id"].extend([w.doc_id] * len(js))
            meta["position"].extend(w.offset + j for j in js)
            meta["window_pos"].extend(js)
            meta["token_id"].extend(w.input_ids[j] for j in js)
            meta["bytes"].extend(target_bytes)
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
                    "score_mask": pa.array(
                        [w.score_mask for w in window_list], pa.list_(pa.bool_())
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
            row_bytes = int(np.dtype(NP_DTYPES[rows_dtype]).itemsize * width)
            rows_info = {"kind": kind, "dtype": rows_dtype, "shape": [total, width]}
        else:
            row_bytes = int(k * (4 + 4))
            rows_info = None
        files = [p for p in tmp.rglob("*") if p.is_file()]
        total_bytes = int(sum(p.stat().st_size for p in files))
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "mode": mode,
            "top_k": k if mode == "topk" else None,
            "reference": model.description,
            "tokenizer": {
                "fingerprint": tokenizer_fingerprint(model.tokenizer),
                "size": len(model.tokenizer),
                "adds_bos": adds_bos,
            },
            "vocab": {"size": vocab_size, "logits_width": model.logits_width, "padded": padded},
            "rows": rows_info,
            "head": head_info,
            "data_spec": data.model_dump(),
            "data": corpus.description,
            "window_spec": windows.model_dump(),
            "windowing": window_key(windows) | {"adds_bos": adds_bos},
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
            "versions": versions(),
        }
        (tmp / MANIFEST).write_text(
            json.dumps(to_json_safe(manifest), indent=2, allow_nan=False, default=str) + "\n"
        )
        install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
