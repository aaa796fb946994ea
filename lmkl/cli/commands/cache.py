"""``lmkl cache REFERENCE --data DATA --out CACHE_DIR``: run a reference once, reuse it later."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmkl.cli.funnel import friendly_errors
from lmkl.cli.options import (
    AllowPickleOpt,
    AttnOpt,
    BatchOpt,
    ContextOpt,
    DataOpt,
    DatasetConfigOpt,
    DeviceMapOpt,
    DeviceOpt,
    DType,
    DTypeOpt,
    MaxBatchTokensOpt,
    MaxSamplesOpt,
    MaxTokensOpt,
    MemoryOpt,
    OfflineOpt,
    OverwriteOpt,
    QuietOpt,
    RevisionOpt,
    SplitOpt,
    StrideOpt,
    TemperatureOpt,
    TextFieldOpt,
    TrustOpt,
    WindowingMode,
    WindowingOpt,
    apply_offline,
    window_spec,
)
from lmkl.cli.options import data_spec as build_data_spec
from lmkl.cli.output import TokenProgress, stdout


@friendly_errors
def cache(
    reference: Annotated[str, typer.Argument(help="Reference model P: hub id or local directory.")],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Cache directory to write.", rich_help_panel="Output"),
    ],
    data: DataOpt = None,
    split: SplitOpt = None,
    dataset_config: DatasetConfigOpt = None,
    text_field: TextFieldOpt = "text",
    max_samples: MaxSamplesOpt = None,
    max_tokens: MaxTokensOpt = None,
    context_length: ContextOpt = 512,
    stride: StrideOpt = None,
    windowing: WindowingOpt = WindowingMode.documents,
    dtype: DTypeOpt = DType.auto,
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False,
    attn_implementation: AttnOpt = None,
    allow_pickle: AllowPickleOpt = False,
    offline: OfflineOpt = False,
    batch_size: BatchOpt = 8,
    max_batch_tokens: MaxBatchTokensOpt = None,
    memory_budget: MemoryOpt = 1024,
    top_k: Annotated[
        int | None,
        typer.Option(
            "--top-k",
            min=1,
            help="Compact cache: keep the reference's K largest log-probs and the "
            "tail mass; KL is then reported as a guaranteed interval. Default: exact cache "
            "(hidden states + output layer).",
            rich_help_panel="Cache",
        ),
    ] = None,
    temperature: TemperatureOpt = 1.0,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run REFERENCE once over DATA and store what later comparisons need (`compare CACHE CAND`)."""
    apply_offline(offline)
    from lmkl.formatting import byte_size, number
    from lmkl.refcache.build import build_cache
    from lmkl.specs import ComputeSpec, ModelSpec

    spec = ModelSpec(
        model=reference,
        dtype=dtype.value,
        device=device,
        device_map=device_map,
        revision=revision,
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
        allow_pickle=allow_pickle,
    )
    data_spec = build_data_spec(data, split, dataset_config, text_field, max_samples)
    windows = window_spec(windowing, context_length, stride)
    compute = ComputeSpec(
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
        memory_budget_mb=memory_budget,
        max_tokens=max_tokens,
        temperature=temperature,
    )
    with TokenProgress(quiet, "caching") as progress:
        manifest = build_cache(
            spec,
            data_spec,
            windows,
            compute,
            out,
            top_k=top_k,
            overwrite=overwrite,
            progress=progress,
            log=progress.log,
        )
    if quiet:
        stdout.print(str(out))
        return
    counts, size = manifest["counts"], manifest["bytes"]
    mode = "exact" if manifest["mode"] == "exact" else f"top-{manifest['top_k']}"
    stdout.print(
        f"cached {counts['tokens']:,} tokens of {manifest['reference']['label']} ({mode}): "
        f"{number(size['row_per_token'])} row bytes/token, "
        f"{number(size['per_token'], 1)} bytes/token on disk in all ({byte_size(size['total'])})"
    )
    stdout.print(
        f"cache directory: [bold]{out}[/bold]  (use it as the reference: "
        f"lmkl compare {out} CANDIDATE)"
    )


def register(app: typer.Typer) -> None:
    app.command("cache", no_args_is_help=True)(cache)
