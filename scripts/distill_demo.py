"""Distil the demo student from the demo reference with a Trainer, watching exact KL as it trains.

The demo pair (``lmkl demo``'s ``demo:reference`` teacher, 4 layers, and ``demo:candidate``
student, 2 layers) is built offline from Python's own help texts. The student is trained for a
few hundred steps with the usual distillation loss, forward KL(teacher‖student) on the teacher's
live logits of each training batch, by a ``transformers.Trainer`` that also carries lmkl's
``KLCallback``. The callback builds the teacher's reference cache once over the held-out texts
and, every ``--every`` steps, logs the exact held-out KL of the current student (the numbers
``lmkl compare`` gives for that checkpoint) and writes the run directory ``OUT/kl/step-NNNNNN``.

Afterwards: ``lmkl report OUT/kl/step-*`` (KL by training step), written to OUT/report.html,
the logged values to ``scripts/results/distill_demo.json`` and a plot of held-out KL and
training loss by step to ``docs/distill_kl.png``. A few minutes on 2 CPU cores::

    python scripts/distill_demo.py --out /tmp/distill
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


class Chunks(torch.utils.data.Dataset):
    """Fixed-length language-modelling examples cut from the demo's training documents."""

    def __init__(self, tokenizer: Any, length: int) -> None:
        from lmkl.demo.assets import demo_corpus, encode_stream

        stream = encode_stream(tokenizer, demo_corpus()[0])
        count = len(stream) // length
        self.rows = stream[: count * length].view(count, length)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.rows[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def distillation_trainer(teacher: Any) -> Any:
    """A Trainer whose loss is the token mean of KL(teacher‖student) on the training batch."""
    from transformers import Trainer

    class DistillTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {k: v for k, v in inputs.items() if k != "labels"}
            student = model(**inputs).logits
            with torch.no_grad():
                reference = teacher(**inputs).logits
            log_q = torch.log_softmax(student.float(), dim=-1)
            log_p = torch.log_softmax(reference.float(), dim=-1)
            loss = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
            return (loss, student) if return_outputs else loss

    return DistillTrainer


def plot(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    held = [(h["step"], h["lmkl/kl"], h["lmkl/kl_se"]) for h in history if "lmkl/kl" in h]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    ax.plot(*zip(*train, strict=True), color="#bbbbbb", lw=1, label="training loss (batch KL)")
    steps, kl, se = zip(*held, strict=True)
    ax.errorbar(
        steps,
        kl,
        yerr=[2 * s for s in se],
        color="#1f77b4",
        marker="o",
        ms=3,
        capsize=2,
        label="held-out KL(teacher‖student), lmkl (±2 SE)",
    )
    ax.set_xlabel("training step")
    ax.set_ylabel("nats per token")
    ax.set_title("Distilling the demo student: exact held-out KL logged by KLCallback")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("distill-demo"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--max-tokens", type=int, default=6000, help="held-out tokens scored")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "distill_kl.png")
    parser.add_argument(
        "--results", type=Path, default=ROOT / "scripts" / "results" / "distill_demo.json"
    )
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from lmkl.demo.names import resolve_demo_value
    from lmkl.integrations.transformers import KLCallback
    from lmkl.report.render import write_report

    teacher_dir = resolve_demo_value("demo:reference", progress=print)
    student_dir = resolve_demo_value("demo:candidate")
    heldout = resolve_demo_value("demo:heldout")
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    callback = KLCallback(
        teacher_dir,
        heldout,
        every=args.every,
        at_evaluate=False,
        out=args.out / "kl",
        overwrite=True,
        context_length=256,
        batch_size=8,
        max_tokens=args.max_tokens,
    )
    training = TrainingArguments(
        output_dir=str(args.out / "train"),
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=2e-3,
        warmup_steps=20,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = distillation_trainer(teacher)(
        model=student,
        args=training,
        train_dataset=Chunks(tokenizer, 128),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    history = trainer.state.log_history
    runs = sorted((args.out / "kl").glob("step-*"))
    report = write_report(runs, "html", args.out / "report.html")
    write_report(runs, "md", args.out / "report.md")
    logged = [
        {k: v for k, v in h.items() if k.startswith("lmkl/") or k == "step"}
        for h in history
        if "lmkl/kl" in h
    ]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(
        json.dumps(
            {
                "steps": args.steps,
                "every": args.every,
                "training_seconds": seconds,
                "held_out_tokens": logged[0]["lmkl/tokens"] if logged else None,
                "logged": logged,
            },
            indent=2,
        )
        + "\n"
    )
    plot(history, args.plot)
    print(f"trained {args.steps} steps in {seconds:.0f} s")
    for entry in logged:
        print(f"step {entry['step']:>4}  KL {entry['lmkl/kl']:.4f} ± {entry['lmkl/kl_se']:.4f}")
    print(f"report: {report}\nplot: {args.plot}\nlogged values: {args.results}")


if __name__ == "__main__":
    main()
