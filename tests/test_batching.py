"""Length-sorted batches under a token budget: every window once, values unchanged."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from lmkl.data.windows import Window
from lmkl.engine.token_compare import run_comparison
from lmkl.scoring.batches import make_batches, window_groups
from lmkl.specs import ComputeSpec, DataSpec, ModelSpec, OutputSpec, WindowSpec


def window(i: int, n: int) -> Window:
    return Window(
        window_id=i,
        doc_id=i,
        input_ids=list(range(1, n + 1)),
        first_target=1,
        offset=0,
        target_bytes=[1] * (n - 1),
    )


def test_token_budget_groups_cover_every_window_once():
    lengths = [5, 40, 12, 40, 3, 17, 29, 8, 40, 2]
    windows = [window(i, n) for i, n in enumerate(lengths)]
    groups = list(window_groups(windows, batch_size=8, max_batch_tokens=64))
    ids = [w.window_id for g in groups for w in g]
    assert sorted(ids) == list(range(len(lengths)))
    flat = [len(w.input_ids) for g in groups for w in g]
    assert flat == sorted(lengths, reverse=True)  # longest first
    assert ids[:3] == [1, 3, 8]  # ties keep window order
    for g in groups:
        width = max(len(w.input_ids) for w in g)
        assert len(g) == 1 or len(g) * width <= 64
    # Without a budget: consecutive windows, batch_size each.
    plain = list(window_groups(windows, batch_size=4))
    assert [[w.window_id for w in g] for g in plain] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    batches = list(make_batches(windows, 8, 0, max_batch_tokens=64))
    assert sum(b.targets.numel() for b in batches) == sum(n - 1 for n in lengths)
    real = sum(int(b.attention_mask.sum()) for b in batches)
    slots = sum(b.attention_mask.numel() for b in batches)
    consecutive = list(make_batches(windows, 4, 0))
    assert real / slots > real / sum(b.attention_mask.numel() for b in consecutive)


def test_sorted_batches_give_the_same_values(tiny_pair, small_jsonl, tmp_path):
    def run(out, **compute):
        return run_comparison(
            ModelSpec(model=str(tiny_pair["reference"]), label="ref"),
            [ModelSpec(model=str(tiny_pair["candidate"]), label="cand")],
            DataSpec(source=str(small_jsonl)),
            WindowSpec(context_length=40, stride=10),
            ComputeSpec(compile=False, max_tokens=400, **compute),
            OutputSpec(dir=str(tmp_path / out)),
        )

    a = run("a", batch_size=4)
    b = run("b", max_batch_tokens=90, chunk_tokens=13)
    ta = pq.read_table(a.path / "tokens.parquet").sort_by(
        [("doc_id", "ascending"), ("position", "ascending")]
    )
    tb = pq.read_table(b.path / "tokens.parquet").sort_by(
        [("doc_id", "ascending"), ("position", "ascending")]
    )
    assert ta["token_id"].equals(tb["token_id"])
    for name in ("kl", "reverse_kl", "jsd", "nll_reference", "nll_candidate", "delta_p"):
        assert np.abs(ta[name].to_numpy() - tb[name].to_numpy()).max() <= 1e-5, name
    eff_a = a.results["throughput"]["padding_efficiency"]
    eff_b = b.results["throughput"]["padding_efficiency"]
    assert 0 < eff_a <= eff_b <= 1
    assert b.results["compute"]["max_batch_tokens"] == 90
    from lmkl.scoring.native import load_native_kernel

    # On a CPU: the native kernel where a C compiler builds it, else the torch one.
    assert b.results["compute"]["kernel"] == ("native" if load_native_kernel() else "eager")
