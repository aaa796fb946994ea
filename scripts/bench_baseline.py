"""The short scripts lmkl is timed against, as whole processes (used by ``scripts/bench.py``).

``forward``: what any exact comparison must do and nothing more: read the documents, tokenize
them, load both models, run both full forwards (full logits) over the same batches.
``naive``: the same plus what a short script adds to get a KL: ``log_softmax`` of both full
logits and ``kl_div``, averaged over real tokens.

Usage::

    python scripts/bench_baseline.py forward REFERENCE CANDIDATE DATA.jsonl --batch-size 8

Documents are JSON lines with a ``text`` field, each at most ``--context-length`` tokens (the
bench writes them so: one window per document, as lmkl's documents windowing makes them).
Prints one JSON line: the tokens run and the in-process seconds of each phase.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

STARTED = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("forward", "naive"))
    parser.add_argument("reference")
    parser.add_argument("candidate")
    parser.add_argument("data")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context-length", type=int, default=256)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    imported = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.reference)
    with open(args.data) as handle:
        texts = [json.loads(line)["text"] for line in handle if line.strip()]
    ids = tokenizer(texts, truncation=True, max_length=args.context_length)["input_ids"]
    models = [
        AutoModelForCausalLM.from_pretrained(path).eval()
        for path in (args.reference, args.candidate)
    ]
    loaded = time.perf_counter()
    tokens, kl_sum = 0, 0.0
    with torch.inference_mode():
        for start in range(0, len(ids), args.batch_size):
            rows = ids[start : start + args.batch_size]
            width = max(len(r) for r in rows)
            input_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            logits = [
                m(input_ids=input_ids, attention_mask=mask, use_cache=False).logits for m in models
            ]
            tokens += int(mask.sum())
            if args.mode == "naive":
                lp, lq = (F.log_softmax(x.float(), -1) for x in logits)
                kl = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
                kl_sum += float(kl[mask.bool()].sum())
    done = time.perf_counter()
    print(
        json.dumps(
            {
                "mode": args.mode,
                "tokens": tokens,
                "kl_mean": kl_sum / tokens if args.mode == "naive" else None,
                "imports_s": imported - STARTED,
                "loading_s": loaded - imported,
                "forwards_s": done - loaded,
            }
        )
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
