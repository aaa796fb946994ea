"""``KLCallback``: exact KL to the teacher on held-out text, logged by the Trainer as it trains.

Usage::

    from lmkl.integrations.transformers import KLCallback

    trainer = Trainer(model=student, args=args, train_dataset=train, eval_dataset=held_out,
                      processing_class=tokenizer,
                      callbacks=[KLCallback("org/teacher", "held_out.jsonl",
                                            context_length=512, out="runs/kl")])
    trainer.train()   # at every evaluation: lmkl/kl, lmkl/reverse_kl, lmkl/jsd, ... are logged

How it works. When training starts the teacher runs once over the held-out data into an exact
reference cache (its final hidden states and output layer; :func:`lmkl.build_reference_cache`)
and is then released: during training only the student runs. At each evaluation (and every
``every`` steps if set) the trainer's current model is scored against the cache by
:func:`lmkl.score_against`, the engine's token comparison with the model given in memory: the
numbers are those ``lmkl compare TEACHER CHECKPOINT`` gives. Scoring runs in eval mode under
``no_grad`` where the model is, in its dtype, with every random generator restored afterwards,
so training is bit-for-bit what it is without the callback. Under ``torchrun``/``accelerate``
every process scores a share of the windows and the engine merges them exactly.

The metrics are logged through ``Trainer.log`` (found from the call stack when the callback is
called, or given with ``trainer=``), so every configured logger receives them and
``trainer.state.log_history`` holds them at the current step.
"""

from __future__ import annotations

import gc
import inspect
import tempfile
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from lmkl.api import build_reference_cache, score_against
from lmkl.errors import OutputError, UsageError
from lmkl.specs import ComputeSpec, DataSpec, ModelSpec, WindowSpec

#: Log keys (after the prefix) and where each value is in the metrics of results.json.
LOGGED = {
    "kl": ("kl", "mean"),
    "kl_se": ("kl", "se"),
    "reverse_kl": ("reverse_kl", "mean"),
    "reverse_kl_se": ("reverse_kl", "se"),
    "jsd": ("jsd", "mean"),
    "jsd_se": ("jsd", "se"),
    "top1_agreement": ("top1_agreement", "mean"),
    "top1_agreement_se": ("top1_agreement", "se"),
    "nll_student": ("nll", "candidate"),
    "nll_teacher": ("nll", "reference"),
    "tokens": ("counts", "tokens"),
}


def log_values(metrics: dict[str, Any], prefix: str = "lmkl/") -> dict[str, float]:
    """The logged scalars (``lmkl/kl``, ``lmkl/kl_se``, ...) of :func:`lmkl.score_against`'s
    metrics; an infinite KL stays ``inf`` (never clipped)."""
    out = {}
    for key, (group, field) in LOGGED.items():
        value = (metrics.get(group) or {}).get(field)
        if value is not None:
            out[prefix + key] = float(value)  # results.json may spell infinity "inf"
    return out


def _is_cache(reference: Any) -> bool:
    from lmkl.refcache.format import is_cache_dir

    return isinstance(reference, str | Path) and is_cache_dir(reference)


class KLCallback(TrainerCallback):
    """Exact held-out KL(teacher‖student) logged by a ``transformers.Trainer`` (or TRL trainer).

    ``reference``: the teacher (hub id, local directory, :class:`~lmkl.specs.ModelSpec`, a
    ``demo:`` name, or a model object with ``reference_tokenizer``) or an lmkl reference cache
    directory (``lmkl cache``). ``data``: the held-out text, anything ``--data`` accepts (chat
    data is scored on the assistant's tokens); optional with a cache (its own data). Other
    keyword options are those of ``lmkl compare``: windows (``context_length``, ``stride``,
    ``windowing``), compute (``batch_size``, ``max_batch_tokens``, ``temperature``,
    ``memory_budget_mb``, ``chunk_tokens``, ``max_tokens``, ...), data fields (``text_field``,
    ``split``, ``score_on``, ...) and, for a teacher to load, model options (``dtype``, ...).

    ``every``: also score every N optimizer steps (default: at evaluations only; set
    ``at_evaluate=False`` for steps only). ``out``: keep each scoring's complete run directory
    as ``OUT/step-000500`` (``lmkl report OUT/step-*`` shows KL by step) and the teacher's cache
    as ``OUT/reference-cache`` (reused by a restarted training). ``tokenizer``: the student's
    (default: the trainer's ``processing_class``). ``trainer``: the trainer to log through
    (default: found when the callback is first called).
    """

    def __init__(
        self,
        reference: str | Path | ModelSpec | Any,
        data: str | Path | DataSpec | None = None,
        *,
        every: int | None = None,
        at_evaluate: bool = True,
        out: str | Path | None = None,
        tokenizer: Any = None,
        reference_tokenizer: Any = None,
        trainer: Any = None,
        prefix: str = "lmkl/",
        label: str = "student",
        overwrite: bool = False,
        **options: Any,
    ) -> None:
        if every is not None and every < 1:
            raise UsageError(f"every={every} is not a step count", "pass every=N with N >= 1")
        if every is None and not at_evaluate:
            raise UsageError(
                "KLCallback would never score (at_evaluate=False and no every)",
                "pass every=N, or leave at_evaluate=True",
            )
        known = {
            *DataSpec.model_fields,
            *WindowSpec.model_fields,
            *ComputeSpec.model_fields,
            *ModelSpec.model_fields,
        } - {"source", "model", "label"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UsageError(
                f"unknown option '{unknown[0]}' for KLCallback",
                f"use the options of lmkl compare: {', '.join(sorted(known))}",
            )
        self.reference = reference
        self.data = data
        self.every = every
        self.at_evaluate = at_evaluate
        self.out = Path(out) if out is not None else None
        self.tokenizer = tokenizer
        self.reference_tokenizer = reference_tokenizer
        self.trainer = trainer
        self.prefix = prefix
        self.label = label
        self.overwrite = overwrite
        self.options = options
        #: Only these options reach each scoring: data and windows are the cache's, checked
        #: once when training starts, and the model options were the teacher's.
        self.scoring_options = {k: v for k, v in options.items() if k in ComputeSpec.model_fields}
        self.cache: Path | None = None
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self._student: Any = None
        self._last_step: int | None = None

    # -- trainer events ------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Check everything and build the teacher's cache now, not at the first evaluation."""
        self._find_trainer()
        self._check_out(int(state.global_step))
        self._student_of(kwargs.get("model"), kwargs.get("processing_class"))
        self.prepare()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.every is not None and state.global_step % self.every == 0:
            self._score_and_log(state, kwargs)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.at_evaluate:
            self._score_and_log(state, kwargs)

    # -- what it does --------------------------------------------------------------------------
    def _check_out(self, step: int) -> None:
        """Refuse now, not at the first evaluation, an ``out`` holding later steps' runs (an
        earlier training's): they would be refused one by one, or mixed with this one's."""
        if self.out is None or self.overwrite or not self.out.is_dir():
            return
        later = sorted(
            path
            for path in self.out.glob("step-*")
            if path.name[5:].isdigit() and int(path.name[5:]) > step
        )
        if later:
            raise OutputError(
                f"'{later[0]}' exists: out= holds the runs of an earlier training",
                "pass another out= directory, or overwrite=True to replace them",
            )

    def prepare(self) -> Path:
        """The reference cache: the given one (checked), or the teacher's, built once (the
        teacher is then released) with every random generator restored afterwards. Raises
        one-line errors for unusable input."""
        if self.cache is not None:
            return self.cache
        from lmkl.demo.names import is_demo_value, resolve_demo_value

        if isinstance(self.data, str) and is_demo_value(self.data):
            self.data = resolve_demo_value(self.data)  # e.g. demo:heldout
        student = self._student
        if _is_cache(self.reference):
            cache = Path(self.reference)
            self._check_cache(cache, student)
        else:
            from lmkl.engine.in_memory import preserved_rng

            # Loading and running the teacher may draw random numbers (weight init of modules
            # absent from a checkpoint, the engine's seeding): training must not see them.
            with preserved_rng():
                cache = self._build(student)
        self.cache = cache
        return cache

    def _check_cache(self, cache: Path, student: Any) -> None:
        from lmkl.models import check_context_length
        from lmkl.refcache.format import open_cache

        opened = open_cache(cache)
        if student is not None:
            opened.check_tokenizer(student.tokenizer, student.label)
            check_context_length([student], WindowSpec(**opened.manifest["window_spec"]))
        data = None
        if self.data is not None:
            fields = {k: v for k, v in self.options.items() if k in DataSpec.model_fields}
            data = (
                self.data
                if isinstance(self.data, DataSpec)
                else DataSpec(source=str(self.data), **fields)
            )
        window_fields = {k: v for k, v in self.options.items() if k in WindowSpec.model_fields}
        windows = WindowSpec(**window_fields) if window_fields else None
        opened.settings(data, windows, ComputeSpec(**self.scoring_options))

    def _build(self, student: Any) -> Path:
        from lmkl.demo.names import is_demo_value, resolve_demo_value
        from lmkl.engine.distributed import init_shard
        from lmkl.models import check_tokenizers_match, load_tokenizer

        if self.data is None:
            raise UsageError(
                "KLCallback needs the held-out data to build the teacher's cache",
                "pass data=FILE_OR_DATASET (or a reference cache instead of the teacher)",
            )
        reference = self.reference
        if isinstance(reference, str) and is_demo_value(reference):
            reference = resolve_demo_value(reference)
        model_fields = {k: v for k, v in self.options.items() if k in ModelSpec.model_fields}
        is_object = not isinstance(reference, str | Path | ModelSpec)
        if student is not None:
            # Before the teacher's weights load or run: a tokenizer mismatch is found now.
            if is_object:
                teacher_tokenizer = self.reference_tokenizer or student.tokenizer
            else:
                spec = (
                    reference
                    if isinstance(reference, ModelSpec)
                    else ModelSpec(model=str(reference), **model_fields)
                )
                teacher_tokenizer = load_tokenizer(spec)
            check_tokenizers_match(teacher_tokenizer, student.tokenizer, ("teacher", "student"))
        shard = init_shard()
        try:
            if self.out is not None:
                cache = self.out / "reference-cache"
            else:
                if shard.is_main:
                    self._scratch = tempfile.TemporaryDirectory(prefix="lmkl-teacher-cache-")
                scratch = self._scratch.name if self._scratch is not None else None
                cache = Path(shard.broadcast(scratch)) / "cache"
        finally:
            shard.close()
        if _is_cache(cache) and not self.overwrite:
            self._check_reused(cache, reference)
            self._check_cache(cache, student)
        else:
            build_reference_cache(
                reference,
                self.data,
                cache,
                tokenizer=self.reference_tokenizer or (student.tokenizer if student else None),
                overwrite=self.overwrite,
                **self.options,
            )
        # The teacher is not needed again: drop this callback's hold on it (a model object the
        # caller still references stays theirs to free).
        self.reference = str(cache)
        gc.collect()
        _empty_device_cache()
        return cache

    def _check_reused(self, cache: Path, reference: Any) -> None:
        """A kept cache (a restarted training) is reused only if built from this teacher."""
        from lmkl.refcache.format import open_cache

        if isinstance(reference, str | Path | ModelSpec):
            wanted = reference.model if isinstance(reference, ModelSpec) else str(reference)
            built = open_cache(cache).manifest["reference"].get("model")
            if built != wanted:
                raise UsageError(
                    f"'{cache}' holds a cache of '{built}', not of the teacher '{wanted}'",
                    "pass another out=, or overwrite=True to rebuild it",
                )

    def _student_of(self, model: Any, processing_class: Any) -> Any:
        """The trainer's model ready for scoring (wrapped once; again if the trainer swaps it)."""
        from lmkl.engine.in_memory import in_memory_model

        if model is None:
            return self._student
        if self._student is None or self._student.model is not model:
            tokenizer = self.tokenizer if self.tokenizer is not None else processing_class
            if tokenizer is None:
                raise UsageError(
                    "KLCallback needs the student's tokenizer and the trainer has none",
                    "pass processing_class=tokenizer to the trainer, or tokenizer= to KLCallback",
                )
            self._student = in_memory_model(model, tokenizer, label=self.label)
        return self._student

    def score(self, step: int, model: Any = None) -> dict[str, Any]:
        """Score the student now (at training step ``step``); the metrics of results.json."""
        student = self._student_of(model, None)
        if student is None:
            raise UsageError("KLCallback has no model to score yet", "call it from a Trainer")
        cache = self.prepare()
        out = self.out / f"step-{step:06d}" if self.out is not None else None
        return score_against(
            cache,
            student,
            step=step,
            out=out,
            overwrite=self.overwrite,
            **self.scoring_options,
        )

    def _score_and_log(self, state: Any, kwargs: dict[str, Any]) -> None:
        step = int(state.global_step)
        if step == self._last_step:  # every=N and an evaluation at the same step: once
            return
        self._student_of(kwargs.get("model"), kwargs.get("processing_class"))
        metrics = self.score(step)
        self._last_step = step
        values = log_values(metrics, self.prefix)
        trainer = self._find_trainer()
        # Trainer.log appends to state.log_history and calls every callback's on_log (the
        # loggers); this callback has no on_log, so nothing here runs again.
        trainer.log(values)

    def _find_trainer(self) -> Any:
        """The trainer whose callbacks include this one: given, or the ``self`` of a caller up
        the stack (callbacks are called from the trainer's own methods)."""
        if self.trainer is not None:
            return self.trainer
        frame = inspect.currentframe()
        try:
            while frame is not None:
                candidate = frame.f_locals.get("self")
                handler = getattr(candidate, "callback_handler", None)
                if any(c is self for c in getattr(handler, "callbacks", ())) and hasattr(
                    candidate, "log"
                ):
                    self.trainer = candidate
                    return candidate
                frame = frame.f_back
        finally:
            del frame
        raise UsageError(
            "KLCallback cannot find the trainer it is attached to",
            "pass trainer=... to KLCallback (or add it with trainer.add_callback)",
        )


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = ["KLCallback", "log_values"]
