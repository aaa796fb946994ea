"""Write a reference cache: each batch's rows as a part, the parts as a cache, installed durably.

The reference runs in :mod:`lmkl.engine.cache_build`, a run kind of the one engine loop: every
batch becomes a durable part (a small Parquet table holding the batch's cache rows), so a build
can stop and resume and be shared over processes like any run. This module knows what a part
holds (:meth:`CacheWriter.part`) and how the complete parts become the cache directory described
in :mod:`lmkl.refcache.format` (:meth:`CacheWriter.write`); :func:`install` then renames that
directory into place without ever leaving the destination without a complete cache.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lmkl.data.windows import Window, scored_positions
from lmkl.environment import versions
from lmkl.files import atomic_path, fsync_dir, fsync_tree, to_json_safe
from lmkl.refcache.format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    NP_DTYPES,
    aside_path,
    recover,
    tokenizer_fingerprint,
    torch_dtype_name,
    window_key,
)
from lmkl.specs import ComputeSpec, DataSpec, WindowSpec

#: Per-token reference statistics of tokens.parquet (NaN in an exact cache, which has the rows).
STAT_COLUMNS = ("log_tail", "entropy_reference", "nll_reference", "reference_top1_prob")


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


def _binary(values: np.ndarray) -> pa.Array:
    """Rows of a 2-D array as one fixed-size binary value each (raw bytes, no per-value cost)."""
    values = np.ascontiguousarray(values)
    width = values.shape[1] * values.itemsize if values.ndim == 2 else 0
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), values.shape[0], [None, pa.py_buffer(values)]
    )


def _unbinary(column: pa.ChunkedArray, dtype: Any, width: int) -> np.ndarray:
    """The inverse of :func:`_binary`: ``[rows, width]`` values of ``dtype``."""
    array = column.combine_chunks()
    flat = np.frombuffer(array.buffers()[1], dtype=dtype)
    start = array.offset * width
    return flat[start : start + len(array) * width].reshape(len(array), width)


class CacheWriter:
    """What a cache build stores per batch, and how its parts become the cache directory.

    Made once the reference is loaded and the windows are made; the same on every process and
    every resume (the windows and batches are deterministic), so a part means the same rows
    wherever it was computed.
    """

    def __init__(
        self,
        model: Any,
        window_list: list[Window],
        *,
        data: DataSpec,
        corpus_description: dict[str, Any],
        windows: WindowSpec,
        compute: ComputeSpec,
        top_k: int | None,
        vocab_size: int,
        padded: bool,
        adds_bos: bool,
    ) -> None:
        self.model = model
        self.window_list = window_list
        self.data, self.corpus_description = data, corpus_description
        self.windows, self.compute = windows, compute
        self.vocab_size, self.padded, self.adds_bos = vocab_size, padded, adds_bos
        self.mode = "exact" if top_k is None else "topk"
        self.rows_kind = "hidden" if model.head is not None else "logits"
        self.rows_dtype = torch_dtype_name(next(model.model.parameters()).dtype)
        self.k = min(int(top_k), vocab_size) if top_k is not None else None
        if self.mode == "exact":
            self.width = (
                model.model.get_output_embeddings().weight.shape[1]
                if self.rows_kind == "hidden"
                else model.logits_width
            )
        self.tokens = sum(w.num_targets for w in window_list)
        starts = np.cumsum([0] + [w.num_targets for w in window_list])
        self._start = {w.window_id: int(starts[i]) for i, w in enumerate(window_list)}
        self._chunk = compute.chunk_size(vocab_size, 6)

    # -- parts -----------------------------------------------------------------------------------
    @property
    def part_schema(self) -> pa.Schema:
        """Columns of a part: cache row numbers, the stored values, the per-token statistics."""
        fields = [pa.field("row", pa.int64())]
        if self.mode == "exact":
            item = np.dtype(NP_DTYPES[self.rows_dtype]).itemsize
            fields.append(pa.field("values", pa.binary(self.width * item)))
        else:
            assert self.k is not None
            fields += [
                pa.field("ids", pa.binary(self.k * 4)),
                pa.field("logprobs", pa.binary(self.k * 4)),
            ]
        fields += [pa.field(name, pa.float32()) for name in STAT_COLUMNS]
        fields.append(pa.field("nonfinite_reference", pa.bool_()))
        return pa.schema(fields)

    def row_numbers(self, windows: list[Window]) -> np.ndarray:
        """Cache rows of the scored tokens of ``windows``, in batch order."""
        return np.concatenate(
            [
                np.arange(self._start[w.window_id], self._start[w.window_id] + w.num_targets)
                for w in windows
            ]
        )

    def part(self, batch: Any) -> pa.Table:
        """Run the reference on ``batch`` and return what the cache keeps of its tokens."""
        from lmkl.scoring.batches import model_rows
        from lmkl.scoring.topk import topk_stats

        model = self.model
        grad_off = torch.no_grad() if model.no_inference_mode else torch.inference_mode()
        index = self.row_numbers(batch.windows)
        n = index.size
        stats = {name: np.full(n, np.nan, dtype=np.float32) for name in STAT_COLUMNS}
        nonfinite = np.zeros(n, dtype=bool)
        columns: dict[str, Any] = {"row": pa.array(index, pa.int64())}
        with grad_off:
            rows = model_rows(model, batch)
            if self.mode == "exact":
                values = rows.detach().cpu()
                if self.rows_dtype == "bfloat16":
                    values = values.view(torch.uint16)
                columns["values"] = _binary(values.numpy())
            else:
                assert self.k is not None
                ids = np.zeros((n, self.k), dtype=np.int32)
                logprobs = np.zeros((n, self.k), dtype=np.float32)
                for s in range(0, n, self._chunk):
                    logits = model.logits(rows[s : s + self._chunk])[..., : self.vocab_size]
                    got = topk_stats(
                        logits.float(),
                        batch.targets[s : s + self._chunk],
                        self.k,
                        self.compute.temperature,
                    )
                    ids[s : s + self._chunk] = got["ids"].numpy()
                    logprobs[s : s + self._chunk] = got["logprobs"].numpy()
                    for name in STAT_COLUMNS:
                        stats[name][s : s + self._chunk] = got[name].numpy()
                    nonfinite[s : s + self._chunk] = got["nonfinite"].numpy()
                columns["ids"] = _binary(ids)
                columns["logprobs"] = _binary(logprobs)
        for name in STAT_COLUMNS:
            columns[name] = pa.array(stats[name], pa.float32())  # NaN stays NaN, not null
        columns["nonfinite_reference"] = pa.array(nonfinite, pa.bool_())
        return pa.table(columns, schema=self.part_schema)

    # -- the cache directory ---------------------------------------------------------------------
    def write(
        self, directory: Path, parts: Iterable[pa.Table], *, seconds: float, created: str
    ) -> dict[str, Any]:
        """Write the complete cache into the new directory ``directory`` from every part's
        table (in any order); returns the manifest, written last."""
        directory.mkdir(parents=True)
        self.model.tokenizer.save_pretrained(str(directory / "tokenizer"))
        total = self.tokens
        arrays = self._arrays(directory, max(total, 1))
        stats = {name: np.full(total, np.nan, dtype=np.float32) for name in STAT_COLUMNS}
        nonfinite = np.zeros(total, dtype=bool)
        filled = np.zeros(total, dtype=bool)
        for table in parts:
            index = table["row"].to_numpy()
            for name, (array, dtype, width) in arrays.items():
                array[index] = _unbinary(table[name], dtype, width)
            for name in STAT_COLUMNS:
                stats[name][index] = table[name].to_numpy(zero_copy_only=False)
            nonfinite[index] = table["nonfinite_reference"].to_numpy(zero_copy_only=False)
            filled[index] = True
        if not filled.all():  # the engine hands over every part; a gap would be a bug here
            raise RuntimeError(f"cache rows missing: {int((~filled).sum())} of {total}")
        for array, _, _ in arrays.values():
            array.flush()
        del arrays
        self._write_tokens(directory, stats, nonfinite)
        head = self._write_head(directory)
        manifest = self._manifest(directory, head, seconds, created)
        (directory / MANIFEST).write_text(
            json.dumps(to_json_safe(manifest), indent=2, allow_nan=False, default=str) + "\n"
        )
        return manifest

    def _arrays(self, directory: Path, rows: int) -> dict[str, tuple[np.memmap, Any, int]]:
        """The raw array files, by the part column that fills each: (memmap, dtype, width)."""

        def memmap(name: str, dtype: Any, width: int) -> tuple[np.memmap, Any, int]:
            array = np.memmap(directory / name, dtype=dtype, mode="w+", shape=(rows, width))
            return array, dtype, width

        if self.mode == "exact":
            return {"values": memmap("rows.bin", NP_DTYPES[self.rows_dtype], self.width)}
        assert self.k is not None
        return {
            "ids": memmap("topk_ids.bin", np.int32, self.k),
            "logprobs": memmap("topk_logprobs.bin", np.float32, self.k),
        }

    def _write_tokens(self, directory: Path, stats: dict[str, np.ndarray], nonfinite: Any) -> None:
        meta: dict[str, list[Any]] = {
            k: [] for k in ("window_id", "doc_id", "position", "window_pos", "token_id", "bytes")
        }
        for w in self.window_list:
            # The scored targets only: chat data scores the assistant's tokens (score_mask).
            js = scored_positions(w)
            meta["window_id"].extend([w.window_id] * len(js))
            meta["doc_id"].extend([w.doc_id] * len(js))
            meta["position"].extend(w.offset + j for j in js)
            meta["window_pos"].extend(js)
            meta["token_id"].extend(w.input_ids[j] for j in js)
            meta["bytes"].extend(w.target_bytes[j - w.first_target] for j in js)
        columns: dict[str, Any] = {k: np.asarray(v, dtype=np.int64) for k, v in meta.items()}
        columns.update(stats)
        columns["nonfinite_reference"] = nonfinite
        pq.write_table(pa.table(columns), directory / "tokens.parquet")
        windows = self.window_list
        pq.write_table(
            pa.table(
                {
                    "window_id": [w.window_id for w in windows],
                    "doc_id": [w.doc_id for w in windows],
                    "input_ids": pa.array([w.input_ids for w in windows], pa.list_(pa.int32())),
                    "first_target": [w.first_target for w in windows],
                    "offset": [w.offset for w in windows],
                    "target_bytes": pa.array(
                        [w.target_bytes for w in windows], pa.list_(pa.int32())
                    ),
                    "score_mask": pa.array([w.score_mask for w in windows], pa.list_(pa.bool_())),
                }
            ),
            directory / "windows.parquet",
        )

    def _write_head(self, directory: Path) -> dict[str, Any] | None:
        """Exact caches of hidden states keep the output layer (and its post-processing)."""
        if self.mode != "exact" or self.rows_kind != "hidden":
            return None
        from safetensors.torch import save_file

        head = self.model.head
        linear = head.linear
        tensors = {"weight": linear.weight.detach().cpu().contiguous().clone()}
        if getattr(linear, "bias", None) is not None:
            tensors["bias"] = linear.bias.detach().cpu().contiguous().clone()
        with atomic_path(directory / "head.safetensors") as tmp:  # (the user's file mode)
            save_file(tensors, str(tmp))
        return {
            "softcap": head.softcap,
            "scale": head.scale,
            "divide_by": head.divide_by,
            "shape": list(tensors["weight"].shape),
            "dtype": self.rows_dtype,
            "bias": "bias" in tensors,
        }

    def _manifest(
        self, directory: Path, head: dict[str, Any] | None, seconds: float, created: str
    ) -> dict[str, Any]:
        total, model = self.tokens, self.model
        if self.mode == "exact":
            row_bytes = int(np.dtype(NP_DTYPES[self.rows_dtype]).itemsize * self.width)
            rows = {"kind": self.rows_kind, "dtype": self.rows_dtype, "shape": [total, self.width]}
        else:
            row_bytes, rows = int((self.k or 0) * (4 + 4)), None
        total_bytes = int(sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()))
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "mode": self.mode,
            "top_k": self.k,
            "reference": model.description,
            "tokenizer": {
                "fingerprint": tokenizer_fingerprint(model.tokenizer),
                "size": len(model.tokenizer),
                "adds_bos": self.adds_bos,
            },
            "vocab": {
                "size": self.vocab_size,
                "logits_width": model.logits_width,
                "padded": self.padded,
            },
            "rows": rows,
            "head": head,
            "data_spec": self.data.model_dump(),
            "data": self.corpus_description,
            "window_spec": self.windows.model_dump(),
            "windowing": window_key(self.windows) | {"adds_bos": self.adds_bos},
            "compute": {
                "max_tokens": self.compute.max_tokens,
                "temperature": self.compute.temperature,
                "batch_size": self.compute.batch_size,
                "max_batch_tokens": self.compute.max_batch_tokens,
            },
            "counts": {
                "documents": len({w.doc_id for w in self.window_list}),
                "windows": len(self.window_list),
                "tokens": total,
            },
            "bytes": {
                "row_per_token": row_bytes,
                "total": total_bytes,
                "per_token": total_bytes / max(total, 1),
            },
            "seconds": seconds,
            "created": created,
            "versions": versions(),
        }


def remove_tree(path: Path) -> None:
    """Delete a directory (or file) lmkl made, ignoring one that is already gone."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
