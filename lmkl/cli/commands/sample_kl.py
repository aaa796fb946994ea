"""``lmkl sample-kl REFERENCE CANDIDATE --prompts DATA``: sampled, sequence-level KL estimates."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from lmkl.cli.funnel import friendly_errors
from lmkl.cli.options import (
    COMPUTE,
    DATA,
    AllowPickleOpt,
    AttnOpt,
    CandDTypeOpt,
    ChunkOpt,
    DatasetConfigOpt,
    DeviceOpt,
    DType,
    DTypeOpt,
    MemoryOpt,
    OfflineOpt,
    OutOpt,
    OverwriteOpt,
    QuietOpt,
    RefDTypeOpt,
    ResumeOpt,
    RevisionOpt,
    SplitOpt,
    TextFieldOpt,
    TrustOpt,
    apply_offline,
    model_pair,
)
from lmkl.cli.options import data_spec as build_data_spec
from lmkl.cli.output import TokenProgress, stderr, stdout

SAMPLING = "Sampling"


class Direction(str, Enum):
    forward = "forward"
    reverse = "reverse"


@friendly_errors
def sample_kl(
    reference: Annotated[str, typer.Argument(help="Reference model P: hub id or local directory.")],
    candidate: Annotated[str, typer.Argument(help="Candidate model Q: hub id or local directory.")],
    prompts: Annotated[
        str | None,
        typer.Option(
            "--prompts",
            "-p",
            help="Prompts: hub dataset or local .txt/.jsonl/.json/.csv/.parquet "
            "(a messages column is rendered with the chat template).",
            rich_help_panel=DATA,
        ),
    ] = None,
    split: SplitOpt = None,
    dataset_config: DatasetConfigOpt = None,
    text_field: TextFieldOpt = "text",
    max_prompts: Annotated[
        int | None,
        typer.Option(
            "--max-prompts", min=1, help="Use only the first N prompts.", rich_help_panel=DATA
        ),
    ] = None,
    num_samples: Annotated[
        int,
        typer.Option(
            "--num-samples",
            "-n",
            min=2,
            help="Continuations sampled per prompt.",
            rich_help_panel=SAMPLING,
        ),
    ] = 16,
    max_new_tokens: Annotated[
        int,
        typer.Option(
            "--max-new-tokens",
            min=1,
            help="Longest continuation (stops earlier at EOS).",
            rich_help_panel=SAMPLING,
        ),
    ] = 64,
    direction: Annotated[
        Direction,
        typer.Option(
            help="forward: sample from the reference, estimate KL(P‖Q); reverse: sample from the "
            "candidate, estimate KL(Q‖P).",
            rich_help_panel=SAMPLING,
        ),
    ] = Direction.forward,
    temperature: Annotated[
        float,
        typer.Option(
            min=1e-6,
            help="Sampling temperature. ≠ 1 samples from another distribution: the "
            "estimates are then flagged biased.",
            rich_help_panel=SAMPLING,
        ),
    ] = 1.0,
    top_p: Annotated[
        float,
        typer.Option(
            "--top-p",
            min=1e-6,
            max=1.0,
            help="Nucleus sampling (< 1 flags the estimates biased).",
            rich_help_panel=SAMPLING,
        ),
    ] = 1.0,
    top_k: Annotated[
        int,
        typer.Option(
            "--top-k",
            min=0,
            help="Top-k sampling, 0 = off (> 0 flags the estimates biased).",
            rich_help_panel=SAMPLING,
        ),
    ] = 0,
    seed: Annotated[
        int,
        typer.Option(min=0, help="Sampling seed (reproducible runs).", rich_help_panel=SAMPLING),
    ] = 0,
    stop_token_id: Annotated[
        list[int] | None,
        typer.Option(
            "--stop-token-id",
            help="Extra stop token id (repeatable); EOS always stops.",
            rich_help_panel=SAMPLING,
        ),
    ] = None,
    dtype: DTypeOpt = DType.auto,
    reference_dtype: RefDTypeOpt = None,
    candidate_dtype: CandDTypeOpt = None,
    device: DeviceOpt = "auto",
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False,
    attn_implementation: AttnOpt = None,
    allow_pickle: AllowPickleOpt = False,
    offline: OfflineOpt = False,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            "-b",
            min=1,
            help="Continuations sampled and scored together.",
            rich_help_panel=COMPUTE,
        ),
    ] = 16,
    chunk_tokens: ChunkOpt = None,
    memory_budget: MemoryOpt = 1024,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Estimate sequence-level KL by sampling continuations (the "expectation form").

    Samples continuations of each prompt from the reference (the candidate with --direction
    reverse), scores them under both models and reports the estimators k1, k2, k3 and the exact
    per-step sum, with standard errors over samples and over prompts.
    """
    apply_offline(offline)
    from lmkl.engine.sample_kl import run_sample_kl
    from lmkl.engine.sampling import SampleSpec
    from lmkl.errors import UsageError
    from lmkl.report.terminal import print_sample_summary
    from lmkl.specs import ComputeSpec, OutputSpec

    if prompts is None:
        raise UsageError("no prompts given", "pass --prompts FILE_OR_DATASET")
    common = {
        "revision": revision,
        "device": device,
        "trust_remote_code": trust_remote_code,
        "attn_implementation": attn_implementation,
        "allow_pickle": allow_pickle,
    }
    ref_spec, cand_spec = model_pair(
        reference, candidate, dtype, reference_dtype, candidate_dtype, **common
    )
    data_spec = build_data_spec(prompts, split, dataset_config, text_field, max_prompts)
    spec = SampleSpec(
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        direction=direction.value,
        seed=seed,
        batch_size=batch_size,
        stop_token_ids=stop_token_id or [],
    )
    compute = ComputeSpec(chunk_tokens=chunk_tokens, memory_budget_mb=memory_budget, seed=seed)
    output = OutputSpec(dir=str(out) if out else None, overwrite=overwrite)
    if not spec.exact:
        stderr.print(
            "[bold yellow]warning:[/bold yellow] temperature/top-k/top-p change the "
            "sampling distribution: the estimates will NOT be "
            f"{'KL(P‖Q)' if spec.direction == 'forward' else 'KL(Q‖P)'} "
            "(results are flagged biased)",
            highlight=False,
        )
    with TokenProgress(quiet, description="sampling") as progress:
        outcome = run_sample_kl(
            ref_spec,
            cand_spec,
            data_spec,
            spec,
            compute,
            output,
            resume=resume,
            progress=progress,
            log=progress.log,
        )
    if quiet:
        stdout.print(str(outcome.path))
        return
    print_sample_summary(outcome.results, stdout)
    stdout.print(f"run directory: [bold]{outcome.path}[/bold]")


def register(app: typer.Typer) -> None:
    app.command("sample-kl", no_args_is_help=True)(sample_kl)
