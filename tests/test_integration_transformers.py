"""KLCallback in a real transformers Trainer (and TRL): exact KL to the teacher while training.

A tiny student (with dropout, so that any random number drawn by the callback would change
training) is trained for a few steps from the tiny pair's reference as teacher. The KL logged at
step k is checked against a float64 NumPy/SciPy computation from the two models' full forwards
on the checkpoint saved at step k, and against ``lmkl compare TEACHER checkpoint-k``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from runtools import ROOT, invoke
from scipy import special
from tiny_models import tiny_tokenizer

from lmkl.demo.assets import build_model
from lmkl.errors import DataError, OutputError, TokenizerMismatchError

transformers = pytest.importorskip("transformers")

STEPS, EVERY = 8, 4
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
OPTIONS = {"context_length": 64, "stride": 32, "batch_size": 4}


def held_out(directory: Path, heldout: Path, docs: int = 3, chars: int = 700) -> Path:
    """A few short held-out documents (fast to score)."""
    lines = heldout.read_text().splitlines()[:docs]
    path = directory / "held_out.jsonl"
    with path.open("w") as fh:
        for line in lines:
            fh.write(json.dumps({"text": json.loads(line)["text"][:chars]}) + "\n")
    return path


class TokenDataset(torch.utils.data.Dataset):
    """Fixed 32-token language-modelling examples from the tiny held-out text's tokenizer."""

    def __init__(self, tokenizer: Any, text: str, length: int = 32, count: int = 64) -> None:
        ids = tokenizer(text)["input_ids"]
        self.rows = [ids[i : i + length] for i in range(0, length * count, 8)][:count]
        self.rows = [r for r in self.rows if len(r) == length]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor(self.rows[i])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def make_student(directory: Path) -> Path:
    """An untrained one-layer Llama sharing the tiny tokenizer, with attention dropout."""
    tokenizer = tiny_tokenizer()
    model = build_model("llama", len(tokenizer), 32, 1, 2, seed=5)
    model.config.attention_dropout = 0.2
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def train(
    student: Path,
    text: str,
    out: Path,
    callbacks: list[Any],
    *,
    steps: int = STEPS,
    trainer_class: Any = None,
    **extra: Any,
) -> Any:
    """Train ``student`` for ``steps`` steps (evaluating and saving every EVERY); the trainer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student)
    data = TokenDataset(tokenizer, text)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=EVERY,
        save_strategy="steps",
        save_steps=EVERY,
        report_to=[],
        use_cpu=True,
        seed=7,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **extra,
    )
    trainer = (trainer_class or Trainer)(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=torch.utils.data.Subset(data, range(4)),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


def logged(trainer: Any, key: str = "lmkl/kl") -> dict[int, float]:
    return {h["step"]: h[key] for h in trainer.state.log_history if key in h}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_pair: dict[str, Path]) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("callback")
    student = make_student(root / "student")
    data = held_out(root, tiny_pair["heldout"])
    text = " ".join(json.loads(x)["text"] for x in tiny_pair["heldout"].read_text().splitlines())
    return {"root": root, "student": student, "data": data, "text": text[-20000:]}


@pytest.fixture(scope="module")
def with_callback(setup: dict[str, Any], tiny_pair: dict[str, Path]) -> Any:
    from lmkl.integrations.transformers import KLCallback

    callback = KLCallback(
        tiny_pair["reference"], setup["data"], out=setup["root"] / "kl", **OPTIONS
    )
    trainer = train(setup["student"], setup["text"], setup["root"] / "train", [callback])
    return trainer, callback


def float64_kl(teacher: Any, student: Any, cache: Path) -> dict[str, float]:
    """Token means of KL, reverse KL and both NLLs from the two models' full forwards, in
    float64 SciPy, over the cache's windows and scored positions (one window at a time)."""
    from lmkl.data.windows import scored_positions
    from lmkl.refcache.format import open_cache

    kl, rkl, nll_p, nll_q = [], [], [], []
    for window in open_cache(cache).windows():
        ids = torch.tensor([window.input_ids])
        with torch.no_grad():
            p = teacher(input_ids=ids).logits[0].double().numpy()
            q = student(input_ids=ids).logits[0].double().numpy()
        for j in scored_positions(window):
            lp, lq = special.log_softmax(p[j - 1]), special.log_softmax(q[j - 1])
            kl.append(float(np.sum(np.exp(lp) * (lp - lq))))
            rkl.append(float(np.sum(np.exp(lq) * (lq - lp))))
            nll_p.append(-lp[window.input_ids[j]])
            nll_q.append(-lq[window.input_ids[j]])
    return {
        "lmkl/kl": float(np.mean(kl)),
        "lmkl/reverse_kl": float(np.mean(rkl)),
        "lmkl/nll_teacher": float(np.mean(nll_p)),
        "lmkl/nll_student": float(np.mean(nll_q)),
    }


def test_logged_kl_is_the_exact_kl_of_the_checkpoint(
    setup: dict[str, Any], tiny_pair: dict[str, Path], with_callback: Any
) -> None:
    from transformers import AutoModelForCausalLM

    trainer, callback = with_callback
    history = trainer.state.log_history
    assert sorted(logged(trainer)) == [EVERY, STEPS]
    entry = next(h for h in history if h.get("step") == EVERY and "lmkl/kl" in h)
    for key in ("kl_se", "reverse_kl", "jsd", "top1_agreement", "nll_student", "nll_teacher"):
        assert math.isfinite(entry[f"lmkl/{key}"]), key
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair["reference"]).eval()
    checkpoint = setup["root"] / "train" / f"checkpoint-{EVERY}"
    student = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    want = float64_kl(teacher, student, callback.cache)
    for key, value in want.items():
        assert entry[key] == pytest.approx(value, rel=1e-5), key
    # The run directory of that step is the one `lmkl compare` writes for the checkpoint.
    run = json.loads((setup["root"] / "kl" / f"step-{EVERY:06d}" / "results.json").read_text())
    assert run["candidates"][0]["model"]["step"] == EVERY
    code, output = invoke(
        [
            "compare",
            str(tiny_pair["reference"]),
            str(checkpoint),
            "--data",
            str(setup["data"]),
            "--out",
            str(setup["root"] / "compare"),
            "--context-length",
            "64",
            "--stride",
            "32",
            "--quiet",
        ]
    )
    assert code == 0, output
    compared = json.loads((setup["root"] / "compare" / "results.json").read_text())
    metrics = compared["candidates"][0]["metrics"]
    assert entry["lmkl/kl"] == pytest.approx(metrics["kl"]["mean"], rel=1e-6)
    assert entry["lmkl/kl_se"] == pytest.approx(metrics["kl"]["se"], rel=1e-5)
    assert entry["lmkl/jsd"] == pytest.approx(metrics["jsd"]["mean"], rel=1e-6)
    assert entry["lmkl/nll_student"] == pytest.approx(metrics["nll"]["candidate"], rel=1e-6)
    # The step's run directory serves the run commands: its hardest contexts as a dataset.
    step_dir = setup["root"] / "kl" / f"step-{EVERY:06d}"
    code, output = invoke(["select", str(step_dir), "--out", str(setup["root"] / "hard.jsonl")])
    assert code == 0, output
    assert (setup["root"] / "hard.jsonl").read_text().strip()


def test_training_is_bit_identical_without_the_callback(
    setup: dict[str, Any], with_callback: Any
) -> None:
    trainer, _ = with_callback
    plain = train(setup["student"], setup["text"], setup["root"] / "plain", [])

    def losses(history: list[dict[str, Any]]) -> list[tuple[int, float, float]]:
        return [(h["step"], h["loss"], h["grad_norm"]) for h in history if "loss" in h]

    assert len(losses(plain.state.log_history)) == STEPS
    # Exactly equal floats: the callback drew no random number and changed nothing.
    assert losses(trainer.state.log_history) == losses(plain.state.log_history)
    assert [h.get("eval_loss") for h in trainer.state.log_history if "eval_loss" in h] == [
        h.get("eval_loss") for h in plain.state.log_history if "eval_loss" in h
    ]


def test_every_n_steps_leaves_the_model_training(
    setup: dict[str, Any], tiny_pair: dict[str, Path], with_callback: Any
) -> None:
    from transformers import TrainerCallback

    from lmkl.integrations.transformers import KLCallback

    modes: list[bool] = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            modes.append(model.training)

    _, first = with_callback
    # The cache built for the first training is reused as a cache reference here.
    callback = KLCallback(first.cache, every=2, at_evaluate=False, batch_size=2)
    trainer = train(
        setup["student"], setup["text"], setup["root"] / "every", [callback, Probe()], steps=4
    )
    assert sorted(logged(trainer)) == [2, 4]
    assert modes == [True] * 4


def test_two_processes_log_what_one_process_computes(
    setup: dict[str, Any], tiny_pair: dict[str, Path], with_callback: Any, tmp_path: Path
) -> None:
    """torchrun (gloo, 2 CPU processes): the teacher's cache is built by both ranks, the
    windows are split over the ranks and merged; each rank logs the metrics one process
    computes on the same checkpoint against the cache one process built."""
    import lmkl

    _, first = with_callback
    script = tmp_path / "train2.py"
    script.write_text(
        "import json, sys\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "import torch.distributed as dist\n"
        "from test_integration_transformers import train\n"
        "from lmkl.integrations.transformers import KLCallback\n"
        f"cb = KLCallback({str(tiny_pair['reference'])!r}, {str(setup['data'])!r}, "
        f"out={str(tmp_path / 'kl')!r}, context_length=64, stride=32, batch_size=2)\n"
        f"t = train({str(setup['student'])!r}, {setup['text']!r}, "
        f"{str(tmp_path / 'train')!r}, [cb], steps={EVERY})\n"
        f"out = {str(tmp_path)!r} + f'/log-{{dist.get_rank()}}.json'\n"
        "json.dump(t.state.log_history, open(out, 'w'))\n"
    )
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [*TORCHRUN, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = tmp_path / "train" / f"checkpoint-{EVERY}"
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    want = lmkl.score_against(first.cache, model, tokenizer=tokenizer, batch_size=2)
    results = json.loads((tmp_path / "kl" / f"step-{EVERY:06d}" / "results.json").read_text())
    assert results["throughput"]["processes"] == 2
    for rank in (0, 1):
        history = json.loads((tmp_path / f"log-{rank}.json").read_text())
        entry = next(h for h in history if "lmkl/kl" in h)
        assert entry["step"] == EVERY
        assert entry["lmkl/kl"] == pytest.approx(want["kl"]["mean"], rel=1e-6)
        assert entry["lmkl/kl_se"] == pytest.approx(want["kl"]["se"], rel=1e-6)
        assert entry["lmkl/top1_agreement"] == want["top1_agreement"]["mean"]


def test_score_against_restores_mode_and_generators(
    setup: dict[str, Any], with_callback: Any
) -> None:
    import random

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lmkl

    _, first = with_callback
    model = AutoModelForCausalLM.from_pretrained(setup["student"]).train()
    model.model.layers[0].eval()  # a frozen block kept in eval mode stays so
    tokenizer = AutoTokenizer.from_pretrained(setup["student"])
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state())
    metrics = lmkl.score_against(first.cache, model, tokenizer=tokenizer)
    assert metrics["kl"]["mean"] > 0
    assert random.getstate() == states[0]
    assert (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.random.get_rng_state(), states[2])
    assert model.training and not model.model.layers[0].training
    assert all(p.grad is None for p in model.parameters())


def test_teacher_with_another_tokenizer_fails_when_training_starts(
    setup: dict[str, Any], other_tokenizer_model: Path
) -> None:
    from lmkl.integrations.transformers import KLCallback

    callback = KLCallback(other_tokenizer_model, setup["data"], **OPTIONS)
    with pytest.raises(TokenizerMismatchError) as info:
        train(setup["student"], setup["text"], setup["root"] / "bad-tok", [callback])
    assert "teacher" in str(info.value) and "fix:" in str(info.value)
    assert not (setup["root"] / "bad-tok" / "checkpoint-4").exists()


def test_data_with_nothing_to_score_fails_when_training_starts(
    setup: dict[str, Any], tiny_pair: dict[str, Path], tmp_path: Path
) -> None:
    from lmkl.integrations.transformers import KLCallback

    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    callback = KLCallback(tiny_pair["reference"], empty, **OPTIONS)
    with pytest.raises(DataError, match="no document has two or more tokens"):
        train(setup["student"], setup["text"], tmp_path / "train", [callback])
    assert not (tmp_path / "train" / "checkpoint-4").exists()


def test_trl_sft_trainer_logs_kl(setup: dict[str, Any], with_callback: Any, tmp_path: Path) -> None:
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmkl.integrations.transformers import KLCallback

    _, first = with_callback
    text = setup["text"]
    dataset = Dataset.from_dict({"text": [text[i : i + 200] for i in range(0, 4000, 200)]})
    tokenizer = AutoTokenizer.from_pretrained(setup["student"])
    config = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        max_length=32,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = trl.SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(setup["student"]),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[KLCallback(first.cache, every=2, at_evaluate=False)],
    )
    trainer.train()
    assert sorted(logged(trainer)) == [2]


def test_out_of_an_earlier_training_is_refused_when_training_starts(
    setup: dict[str, Any], with_callback: Any, tmp_path: Path
) -> None:
    from lmkl.integrations.transformers import KLCallback

    _, first = with_callback
    callback = KLCallback(first.cache, out=setup["root"] / "kl")  # holds step-000004, -000008
    with pytest.raises(OutputError, match="earlier training"):
        train(setup["student"], setup["text"], tmp_path / "train", [callback])
    assert not (tmp_path / "train" / "checkpoint-4").exists()


def test_wrapping_a_training_model_caches_no_inference_tensor() -> None:
    """The load-time split probe of an in-memory model runs under no_grad, not inference mode:
    a tensor the model keeps from that forward (here its input ids, as a model caching position
    ids would) trains through later, and the probe leaves no logits behind."""
    from lmkl.engine.in_memory import in_memory_model
    from lmkl.models import head_split

    tokenizer = tiny_tokenizer()
    model = build_model("llama", len(tokenizer), 32, 1, 2, seed=5).train()
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True
    )
    loaded = in_memory_model(model, tokenizer, label="student")
    assert loaded.head is not None  # the split was probed (and found exact)
    assert seen and not any(ids.is_inference() for ids in seen)
    assert model not in head_split._PROBE_LOGITS
    assert not any(b.is_inference() for b in model.buffers())
    assert model.training
    probe_ids = seen[0]
    loss = model(input_ids=probe_ids, labels=probe_ids).loss  # embedding saves the ids
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_building_the_teacher_cache_leaves_the_generators_as_they_were(
    setup: dict[str, Any], tiny_pair: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """on_train_begin loads and runs a teacher given by path; whatever that draws from the
    Python, NumPy or torch generators (here: a load-time hook that draws from all three) is
    undone, so training starts from the generators the trainer seeded."""
    import random
    import types

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmkl.integrations.transformers import KLCallback
    from lmkl.models import head_split

    drawn = []
    probe_model = head_split.probe_model

    def drawing_probe(loaded: Any) -> Any:
        drawn.append((random.random(), np.random.rand(), torch.rand(1)))
        return probe_model(loaded)

    monkeypatch.setattr(head_split, "probe_model", drawing_probe)
    student = AutoModelForCausalLM.from_pretrained(setup["student"])
    tokenizer = AutoTokenizer.from_pretrained(setup["student"])
    callback = KLCallback(
        tiny_pair["reference"], setup["data"], trainer=types.SimpleNamespace(log=print), **OPTIONS
    )
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state())
    callback.on_train_begin(
        None, types.SimpleNamespace(global_step=0), None, model=student, processing_class=tokenizer
    )
    assert drawn  # the teacher was loaded (and drew) inside on_train_begin
    assert callback.cache is not None and callback.cache.is_dir()
    assert random.getstate() == before[0]
    assert (np.random.get_state()[1] == before[1]).all()
    assert torch.equal(torch.random.get_rng_state(), before[2])


def test_report_of_the_step_runs_shows_the_logged_kl_by_step(
    setup: dict[str, Any], with_callback: Any, tmp_path: Path
) -> None:
    """``lmkl report OUT/step-*`` on the callback's out= directory: one checkpoint series whose
    KL by step is what the trainer logged (the JSON view exactly), its best step named in the
    terminal summary, and the KL-by-step plot in the Markdown report."""
    trainer, _ = with_callback
    want, want_se = logged(trainer), logged(trainer, "lmkl/kl_se")
    steps = sorted(want)
    runs = [str(p) for p in sorted((setup["root"] / "kl").glob("step-*"))]
    assert [Path(r).name for r in runs] == [f"step-{s:06d}" for s in steps]

    code, output = invoke(["report", *runs, "--format", "json"])
    assert code == 0, output
    (series,) = json.loads(output)["steps"].values()
    assert series["step"] == steps
    assert series["kl_mean"] == [want[s] for s in steps]
    assert series["kl_se"] == [want_se[s] for s in steps]
    best = min(want, key=want.__getitem__)
    assert series["best_step"] == best

    code, output = invoke(["report", *runs, "--format", "table"])
    assert code == 0, output
    assert f"the lowest mean KL is at step {best}" in " ".join(output.split())

    markdown = tmp_path / "steps.md"
    code, output = invoke(["report", *runs, "--format", "md", "--out", str(markdown)])
    assert code == 0, output
    assert "### KL by step" in markdown.read_text()
    assert (tmp_path / "steps_files" / "kl_by_step.png").stat().st_size > 0
