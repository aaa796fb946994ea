"""The ``attribution`` run kind: a ``compare`` of one candidate, plus every unit per batch.

It is a :class:`~lmkl.engine.token_compare.TokenComparison` with one candidate: the same data,
windows, batches, kernels and part files, so its ``full`` metrics are exactly what ``compare``
reports, and ``--resume``, Ctrl-C and ``torchrun`` come from the one engine loop. Per batch
(part) it also scores every unit of :func:`~lmkl.attribution.structure.attribution_units`:

1. the reference runs once, its decoder layers' outputs recorded (the boundaries);
2. the candidate runs once, its layers' outputs recorded too (the prefix units' boundaries
   and the hidden-state error of each layer);
3. each unit that is not identical in both models runs the reference from its boundary with
   its modules borrowed from the candidate (:mod:`lmkl.attribution.substitute`), and is
   scored against the reference's logits by the same kernel as the full candidate.

Units are scored in groups whose final hidden states fit in ``--memory-budget``; the boundaries
stay on the model's device when they fit in it as well, else in CPU memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lmkl.attribution.recipe import choose_modules, measure_recipe
from lmkl.attribution.results import unit_summaries
from lmkl.attribution.structure import (
    Structure,
    Unit,
    attribution_units,
    check_matching,
    decoder_layers,
    same_module,
)
from lmkl.attribution.substitute import borrowed, bridged, layer_outputs, replaying
from lmkl.engine.distributed import Shard
from lmkl.engine.loop import LogCallback, Part, Plan, RunOutcome, Summary
from lmkl.engine.loop import execute as execute_kind
from lmkl.engine.rundir import RunDirectory
from lmkl.engine.token_compare import TokenComparison
from lmkl.errors import UsageError
from lmkl.models import LoadedModel
from lmkl.refcache.format import is_cache_dir
from lmkl.scoring.batches import Batch, make_batch, model_rows
from lmkl.scoring.token_scoring import score_batch
from lmkl.specs import (
    ComputeSpec,
    DataSpec,
    ModelSpec,
    OutputSpec,
    Recipe,
    WindowSpec,
    write_recipe,
)

#: Columns of a unit's per-token rows (units.parquet).
UNIT_SCHEMA = pa.schema(
    [
        ("unit", pa.string()),
        ("doc_id", pa.int64()),
        ("window_id", pa.int64()),
        ("position", pa.int64()),
        ("window_pos", pa.int32()),
        ("token_id", pa.int32()),
        ("nonfinite", pa.bool_()),
        ("kl", pa.float32()),
        ("reverse_kl", pa.float32()),
        ("top1_agree", pa.float32()),
    ]
)


class UnitForward:
    """A unit as a scored model: its final hidden states are computed when first asked for
    (inside :func:`score_batch`, so only one group's are held), its logits by ``head``."""

    def __init__(
        self,
        label: str,
        compute: Callable[[], torch.Tensor],
        head: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
        outside_inference_mode: bool,
    ) -> None:
        self.label = label
        self.compute = compute
        self.head = head
        self.device = device
        self.outside_inference_mode = outside_inference_mode

    def _plain(self, call: Callable[[], torch.Tensor]) -> torch.Tensor:
        # Never tracked by autograd; optimum-quanto's modules refuse inference mode (see
        # LoadedModel.no_inference_mode), so those run under no_grad only.
        if self.outside_inference_mode:
            with torch.inference_mode(False), torch.no_grad():
                return call()
        with torch.inference_mode():
            return call()

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._plain(self.compute)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._plain(lambda: self.head(hidden))


class Attribution(TokenComparison):
    """The ``attribute`` run kind (see the module docstring)."""

    kind = "attribution"
    token_level = True

    def __init__(
        self,
        reference: ModelSpec,
        candidate: ModelSpec,
        data: DataSpec | None,
        windows: WindowSpec | None,
        compute: ComputeSpec,
        *,
        models: tuple[LoadedModel, list[LoadedModel]] | None = None,
        high: ModelSpec | None = None,
        budget_bits: float | None = None,
    ) -> None:
        if (high is None) != (budget_bits is None):
            raise UsageError(
                "a mixed-precision recipe needs both --high and --budget-bits",
                "pass --high MODEL_OR_METHOD:SCHEME --budget-bits BITS, or neither",
            )
        if is_cache_dir(reference.model):
            raise UsageError(
                "attribution runs the reference model's layers, which a reference cache does "
                "not hold",
                "pass the reference model itself",
            )
        super().__init__(reference, [candidate], data, windows, compute, models=models)
        #: Decoder layer calls made and those full forwards would have made (cost counters).
        self.layer_calls = 0
        self.high, self.budget_bits = high, budget_bits

    def options(self) -> dict[str, Any]:
        attribution: dict[str, Any] = {"scopes": ["module", "layer", "prefix"]}
        if self.high is not None:
            attribution["recipe"] = {
                "high": self.high.model_dump(),
                "budget_bits": self.budget_bits,
            }
        return super().options() | {"attribution": attribution}

    def default_dir(self) -> Path:
        path = super().default_dir()
        return path.with_name("attribution-" + path.name)

    # -- prepare ---------------------------------------------------------------------------------
    def prepare(self, shard: Shard, log: LogCallback) -> Plan:
        if self.high is not None and shard.world_size > 1:
            raise UsageError(
                "the recipe's measurement (--high) runs in one process",
                "run lmkl attribute --high without torchrun, or attribute first and measure "
                "the recipe in a single process",
            )
        self.log = log
        plan = super().prepare(shard, log)
        self.cand_model = next(iter(self._loaded.values()))
        low_bits = float(self.cand_model.description.get("bits_per_weight") or 0.0)
        if self.budget_bits is not None and self.budget_bits < low_bits:
            # Known once LOW is loaded: refused before anything is scored.
            raise UsageError(
                f"--budget-bits {self.budget_bits:g} is below the candidate's (LOW's) own "
                f"{low_bits:.3f} bits per weight",
                "give a budget between LOW's and HIGH's bits per weight",
            )
        ref, cand = self.ref_model.model, self.cand_model.model
        self.structure: Structure = check_matching(ref, cand, self.cand_model.label)
        self.ref_layers = decoder_layers(ref)[1]
        references = dict(ref.named_modules())
        candidates = dict(cand.named_modules())
        identical = {
            name
            for name in self.structure.modules
            if same_module(references[name], candidates[name])
        }
        self.units = attribution_units(self.structure, identical)
        scored = [u for u in self.units if not u.identical]
        log(
            f"attributing over {len(self.units)} units ({len(self.units) - len(scored)} "
            "identical in both models)"
        )
        plan.identity["units"] = [u.key for u in scored]
        if self.high is not None:
            self._check_high(log)
        return plan

    def _high_spec(self) -> ModelSpec:
        assert self.high is not None
        return self.high.model_copy(update={"device": self.cand_model.spec.device})

    def _check_high(self, log: LogCallback) -> None:
        """HIGH loaded once before anything is scored, so that a wrong path, a quantization
        whose groups do not fit, another tokenizer or another structure stop the run here
        rather than after every part; what the recipe needs of it (each module's stored
        bytes, a GGUF file's tensor types) is kept, and HIGH freed until the measurement."""
        import gc

        from lmkl.models import (
            check_quantization_fits,
            check_tokenizers_match,
            load_model,
            load_tokenizer,
        )
        from lmkl.models.mixed import gguf_tensor_types, module_bytes

        spec = self._high_spec()
        label = f"HIGH {spec.display_name}"
        check_quantization_fits(spec)
        tokenizer = load_tokenizer(spec)
        check_tokenizers_match(self.ref_model.tokenizer, tokenizer, (self.ref_model.label, label))
        log(f"checking {label}")
        high = load_model(spec, self.cand_model.device, tokenizer)
        try:
            check_matching(self.ref_model.model, high.model, label)
        except UsageError as exc:
            exc.hint = "give --high a model with the reference's modules (another quantization)"
            raise
        self.high_bytes = module_bytes(high)
        both_gguf = bool(self.cand_model.spec.gguf_file and spec.gguf_file)
        self.high_tensor_types = gguf_tensor_types(spec) if both_gguf else None
        del high
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- score -----------------------------------------------------------------------------------
    def _dtypes(self) -> dict[str, torch.dtype]:
        return {
            "candidate_dtype": self.cand_model.model.dtype,
            "reference_dtype": self.ref_model.model.dtype,
        }

    def _keep_on(self, tokens: int) -> torch.device | None:
        """Where the boundaries wait: the model's device if the two models' boundaries fit in
        the memory budget, else CPU memory."""
        ref = self.ref_model
        hidden = int(ref.model.config.get_text_config().hidden_size)
        size = 2 * self.structure.num_layers * tokens * hidden * ref.model.dtype.itemsize
        return None if size <= self.compute.memory_budget_mb * 2**20 else torch.device("cpu")

    def _head_of(self, unit: Unit) -> Callable[[torch.Tensor], torch.Tensor]:
        """The reference's output layer, or the candidate's for the output-layer unit."""
        ref = self.ref_model
        if ref.head is None or unit.name != self.structure.head or unit.scope != "module":
            return ref.logits
        dtypes = self._dtypes()
        linear = bridged(
            self.cand_model.model.get_submodule(unit.name),
            dtypes["candidate_dtype"],
            dtypes["reference_dtype"],
        )
        return dataclasses.replace(ref.head, linear=linear)

    def _unit_forward(
        self, unit: Unit, batch: Batch, ref_out: list[torch.Tensor], cand_out: Any
    ) -> UnitForward:
        ref, cand = self.ref_model, self.cand_model
        device = ref.device
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        source = cand_out if unit.scope == "prefix" else ref_out
        # A prefix unit resumes from the candidate's boundary, in the candidate's dtype: cast
        # to the reference's (a float32 LayerNorm given bfloat16 returns bfloat16 to the next
        # float32 Linear; RMSNorm only hides this by upcasting).
        boundary = source[unit.start - 1].to(device, ref.model.dtype) if unit.start > 0 else None
        # The output layer is borrowed through the head (it runs a chunk at a time).
        swapped = tuple(n for n in unit.swapped if n != self.structure.head or ref.head is None)

        def compute() -> torch.Tensor:
            with (
                borrowed(ref.model, cand.model, swapped, **self._dtypes()),
                replaying(self.ref_layers, unit.start, boundary, as_tuple=ref_out.tuple_outputs),
            ):
                hidden = ref.hidden_states(ids, mask)
            self.layer_calls += self.structure.num_layers - unit.start
            return hidden

        return UnitForward(
            unit.key,
            compute,
            self._head_of(unit),
            device,
            ref.no_inference_mode or cand.no_inference_mode,
        )

    def _group_size(self, tokens: int) -> int:
        """Units per scoring call: their rows ``[tokens, hidden]`` fit in half the budget."""
        ref = self.ref_model
        hidden = int(ref.model.config.get_text_config().hidden_size)
        per_unit = max(1, tokens * hidden * 4)
        return max(1, int(self.compute.memory_budget_mb * 2**20 / 2 // per_unit))

    def score(self, index: int) -> Part:
        """The full candidate exactly as ``compare`` scores it (its forwards record the
        boundaries), then every unit that differs, a group at a time."""
        ref, cand = self.ref_model, self.cand_model
        pad_id = self.tokenizer.pad_token_id
        batch = make_batch(self.window_groups[index], pad_id if pad_id is not None else 0)
        keep_on = self._keep_on(int(batch.attention_mask.numel()))
        L = self.structure.num_layers
        with (
            layer_outputs(self.ref_layers, keep_on) as ref_out,
            layer_outputs(decoder_layers(cand.model)[1], keep_on) as cand_out,
        ):
            part = super().score(index)
        self.layer_calls = 2 * L
        hidden_error = _hidden_error(batch, ref_out, cand_out)
        scored = [u for u in self.units if not u.identical]
        per_unit: dict[str, dict[str, np.ndarray]] = {}
        if scored:
            # The reference's final rows: its last boundary through the final norm (cheap).
            final = Unit("module", "", None, L, (), False)
            ref_rows = model_rows(self._unit_forward(final, batch, ref_out, cand_out), batch)
            size = self._group_size(batch.targets.numel())
            for start in range(0, len(scored), size):
                group = [
                    self._unit_forward(u, batch, ref_out, cand_out)
                    for u in scored[start : start + size]
                ]
                metrics, _ = score_batch(
                    batch,
                    ref,
                    group,  # type: ignore[arg-type]
                    self.vocab_size,
                    self.chunk,
                    self.compute.temperature,
                    0,
                    kernel=self.kernel,
                    reference_rows=ref_rows,
                )
                per_unit.update(metrics)
        del ref_out, cand_out
        part.sidecar["hidden_error"] = hidden_error
        part.extra["units"] = _units_table(batch, per_unit)
        # In the part's sidecar, not the process's counters: a resumed run counts every part.
        part.sidecar["layer_calls"] = self.layer_calls
        part.sidecar["full_forward_layer_calls"] = (2 + len(scored)) * L
        return part

    # -- summarize -------------------------------------------------------------------------------
    def summarize(self, run_dir: RunDirectory, totals: dict[str, float]) -> Summary:
        summary = super().summarize(run_dir, totals)
        body = summary.body
        entry = body["candidates"][0]
        unit = self.bootstrap_unit()  # as the full candidate's kl CI: the intervals agree
        parts = [run_dir.extra_path("units", i) for i in run_dir.completed_indices()]
        sidecars = [run_dir.read_sidecar(i) or {} for i in run_dir.completed_indices()]
        body["candidate"] = entry["model"]
        body["full"] = entry["metrics"]
        body.update(
            unit_summaries(
                self.units,
                self.structure,
                [pq.read_table(p) for p in parts],
                run_dir.iter_parts(["kl", "nonfinite", unit]),
                sidecars,
                unit_column=unit,
                seed=self.compute.seed,
            )
        )
        body["cost"] = {
            "layer_calls": sum(int(s.get("layer_calls", 0)) for s in sidecars),
            "full_forward_layer_calls": sum(
                int(s.get("full_forward_layer_calls", 0)) for s in sidecars
            ),
            "note": "decoder layer calls made, and those one full forward per unit would make",
        }

        def write_units(path: Path) -> None:
            with pq.ParquetWriter(path, UNIT_SCHEMA) as writer:
                for part in parts:
                    writer.write_table(pq.read_table(part, schema=UNIT_SCHEMA))

        summary.files["units.parquet"] = write_units
        if self.high is not None:
            body["recipe"], recipe = self._recipe(body)
            summary.files["recipe.yaml"] = lambda path: write_recipe(path, recipe)
        return summary

    def _recipe(self, body: dict[str, Any]) -> tuple[dict[str, Any], Recipe]:
        """Choose the modules to take from HIGH within the budget, build that mixed model
        through its recipe file and measure it on the same tokens (see
        :mod:`lmkl.attribution.recipe`)."""
        import gc

        from lmkl.engine.token_compare import run_comparison
        from lmkl.models import load_model
        from lmkl.models.mixed import gguf_tensor_type_args, module_bytes

        assert self.high is not None and self.budget_bits is not None
        low = self.cand_model
        high_spec = self._high_spec()
        isolated = {u["name"]: u["kl"]["mean"] for u in body["units"] if u["scope"] == "module"}
        described = low.description
        choice = choose_modules(
            isolated,
            module_bytes(low),
            self.high_bytes,
            float(described["weight_bytes"]),
            int(described["parameters"]),
            self.budget_bits,
        )
        low_spec = low.spec
        # The mixed model loads its own LOW (as compare --recipe does): free this one first.
        self._loaded.clear()
        del self.cand_model, low
        gc.collect()
        self.log(f"measuring the recipe: {len(choice.names)} modules from HIGH")

        def compare(specs: list[ModelSpec], models: Any, out: Path) -> RunOutcome:
            compute = self.compute.model_copy(update={"view_tokens": 0})
            return run_comparison(
                self.reference,
                specs,
                self.data,
                self.windows,
                compute,
                OutputSpec(dir=str(out)),
                models=models,
            )

        summary, recipe = measure_recipe(
            reference=self.ref_model,
            reference_spec=self.reference,
            low_spec=low_spec,
            high_spec=high_spec,
            choice=choice,
            uniform_low_kl=float(body["full"]["kl"]["mean"]),
            isolated_total=float(body["sum_of_modules"]["mean"]),
            run_comparison=compare,
            load_model=lambda spec: load_model(spec, self.ref_model.device, self.tokenizer),
        )
        summary["low_bits_per_weight"] = described.get("bits_per_weight")
        summary["budget_bits"] = self.budget_bits
        if self.high_tensor_types is not None:
            # Each chosen tensor's type as HIGH stores it (a K-quant mix has several).
            unmapped: list[str] = []
            args = gguf_tensor_type_args(choice.names, self.high_tensor_types, unmapped)
            summary["tensor_type_args"] = args
            if unmapped:
                summary["tensor_type_note"] = (
                    f"no GGUF tensor for {', '.join(unmapped)}: llama-quantize arguments "
                    "for them are left out (set them by hand)"
                )
            recipe = recipe.model_copy(update={"tensor_type_args": args})
        return summary, recipe


def _hidden_error(
    batch: Batch, ref_out: list[torch.Tensor], cand_out: list[torch.Tensor]
) -> dict[str, Any]:
    """Per layer, the sum over scored tokens of ‖h_Q − h_P‖ / ‖h_P‖ (float64) and how many
    of those ratios were finite (the mean's denominator: a non-finite ratio is left out of
    both, never counted as a zero error)."""
    rows, cols = batch.rows, batch.cols
    sums, counts = [], []
    for p, q in zip(ref_out, cand_out, strict=True):
        hp = p[rows.to(p.device), cols.to(p.device)].double()
        hq = q[rows.to(q.device), cols.to(q.device)].to(hp.device).double()
        ratio = (hq - hp).norm(dim=-1) / hp.norm(dim=-1)
        finite = torch.isfinite(ratio)
        sums.append(float(ratio[finite].sum()))
        counts.append(int(finite.sum()))
    return {"sums": sums, "counts": counts, "tokens": int(rows.numel())}


def _units_table(batch: Batch, per_unit: dict[str, dict[str, np.ndarray]]) -> pa.Table:
    """The per-token rows of every scored unit on one batch."""
    n = batch.targets.numel()
    tables = []
    meta = batch.meta
    for key, metrics in per_unit.items():
        columns = {
            "unit": [key] * n,
            "doc_id": meta["doc_id"],
            "window_id": meta["window_id"],
            "position": meta["position"],
            "window_pos": meta["window_pos"].astype(np.int32),
            "token_id": batch.targets.numpy().astype(np.int32),
            "nonfinite": metrics["nonfinite"].astype(bool),
            "kl": metrics["kl"].astype(np.float32),
            "reverse_kl": metrics["reverse_kl"].astype(np.float32),
            "top1_agree": metrics["top1_agree"].astype(np.float32),
        }
        tables.append(pa.table(columns, schema=UNIT_SCHEMA))
    return pa.concat_tables(tables) if tables else UNIT_SCHEMA.empty_table()


def run_attribution(
    reference: ModelSpec,
    candidate: ModelSpec,
    data: DataSpec,
    windows: WindowSpec | None,
    compute: ComputeSpec,
    output: OutputSpec,
    *,
    high: ModelSpec | None = None,
    budget_bits: float | None = None,
    **run_options: Any,
) -> RunOutcome:
    """Attribute ``candidate``'s KL to the reference's modules, layers and layer prefixes and
    write a run directory (results.json ``kind: attribution``, units.parquet). ``run_options``
    go to :func:`lmkl.engine.loop.execute` (``resume``, ``progress``, ``log``). ``high`` and
    ``budget_bits`` add a mixed-precision recipe: modules of ``candidate`` (LOW) taken from
    ``high`` within ``budget_bits`` stored bits per weight, chosen greedily, then measured
    (results.json ``recipe``, recipe.yaml)."""
    kind = Attribution(
        reference, candidate, data, windows, compute, high=high, budget_bits=budget_bits
    )
    return execute_kind(kind, output, **run_options)
