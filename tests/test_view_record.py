"""`compare --view-tokens N`: what the token view needs, recorded at compare time (view.parquet).

Checked against independent computations: the documents kept are the top ones by mean KL from
tokens.parquet (pandas), the top-5 lists equal a plain transformers forward + softmax (NumPy),
and a resumed run writes the same view.parquet as an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from runtools import check_error, invoke
from tiny_models import tiny_tokenizer

import lmkl
from lmkl.data.tokenize import display_tokens, show_bytes
from lmkl.engine.token_compare import TokenComparison
from lmkl.errors import Interrupted

BUDGET = 260


def _compare(tiny_pair, data: Path, out: Path, **options):
    return lmkl.compare(
        tiny_pair["reference"],
        tiny_pair["candidate"],
        data=data,
        out=out,
        context_length=64,
        stride=32,
        batch_size=2,
        view_tokens=BUDGET,
        **options,
    )


@pytest.fixture(scope="module")
def six_docs(tiny_pair, tmp_path_factory) -> Path:
    """Six held-out documents of different lengths (so whole-document selection matters)."""
    lines = tiny_pair["heldout"].read_text().splitlines()[:6]
    path = tmp_path_factory.mktemp("view-data") / "six.jsonl"
    with path.open("w") as fh:
        for k, line in enumerate(lines):
            fh.write(json.dumps({"text": json.loads(line)["text"][: 200 + 90 * k]}) + "\n")
    return path


@pytest.fixture(scope="module")
def view_run(tiny_pair, six_docs, tmp_path_factory) -> Path:
    return _compare(tiny_pair, six_docs, tmp_path_factory.mktemp("view") / "run").path


def _expected_units(tokens: pd.DataFrame, sizes: dict[int, int], budget: int) -> list[int]:
    """The documents by mean KL, highest first, taken whole while they fit the budget."""
    means = tokens.groupby("doc_id")["kl"].mean().sort_values(ascending=False, kind="stable")
    chosen, left = [], budget
    for doc in means.index:
        if not chosen or sizes[doc] <= left:
            chosen.append(int(doc))
            left -= sizes[doc]
        if left <= 0:
            break
    return chosen


def test_view_keeps_the_worst_documents_whole_within_the_budget(view_run, tiny_pair, six_docs):
    view = pq.read_table(view_run / "view.parquet").to_pandas()
    tokens = pq.read_table(view_run / "tokens.parquet").to_pandas()
    tokenizer = tiny_tokenizer()
    texts = [json.loads(line)["text"] for line in six_docs.read_text().splitlines()]
    sizes = {d: len(tokenizer(t)["input_ids"]) for d, t in enumerate(texts)}
    expected = _expected_units(tokens, sizes, BUDGET)
    assert list(dict.fromkeys(view["unit"])) == expected
    assert len(view) <= BUDGET or len(expected) == 1
    for doc in expected:
        rows = view[view["doc_id"] == doc]
        ids = tokenizer(texts[doc])["input_ids"]
        # Every token of the document, in order; the first (BOS) is context only.
        assert rows["position"].tolist() == list(range(len(ids)))
        assert rows["token_id"].tolist() == ids
        assert rows["scored"].tolist() == [False] + [True] * (len(ids) - 1)
        scored = tokens[tokens["doc_id"] == doc].sort_values("position")
        assert rows[rows["scored"]]["position"].tolist() == scored["position"].tolist()
        assert rows[~rows["scored"]]["reference_top5_ids"].isna().all()


def test_top5_lists_equal_an_independent_softmax(view_run, tiny_pair):
    import torch
    from transformers import AutoModelForCausalLM

    view = pq.read_table(view_run / "view.parquet").to_pandas()
    tokens = pq.read_table(view_run / "tokens.parquet").to_pandas()
    doc = int(view["unit"].iloc[0])
    rows = view[(view["doc_id"] == doc)].sort_values("position")
    # Positions 1..63 are predicted by the document's first window, which starts at 0: one
    # plain forward over the first 64 tokens sees exactly what the run's models saw.
    rows = rows[rows["position"] < 64]
    ids = torch.tensor([rows["token_id"].tolist()])
    for side, key in (("reference", "reference"), ("candidate", "candidate")):
        model = AutoModelForCausalLM.from_pretrained(tiny_pair[key]).eval()
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1).numpy()
        for _, row in rows[rows["scored"]].iterrows():
            p = np.exp(logp[int(row["position"]) - 1])
            top = np.argsort(-p, kind="stable")[:5]
            got_ids = np.asarray(row[f"{side}_top5_ids"])
            got_probs = np.asarray(row[f"{side}_top5_probs"], dtype=np.float64)
            np.testing.assert_allclose(got_probs, p[got_ids], rtol=2e-4, atol=1e-6)
            np.testing.assert_allclose(np.sort(got_probs)[::-1], p[top], rtol=2e-4, atol=1e-6)
    # p(next) from tokens.parquet is the reference's probability of the actual token: when that
    # token is in the reference's top-5, its listed probability is the same number.
    merged = view[view["scored"]].merge(tokens, on=["candidate", "doc_id", "position"])
    hits = 0
    for _, row in merged.iterrows():
        listed = dict(zip(row["reference_top5_ids"], row["reference_top5_probs"], strict=True))
        if row["token_id_x"] in listed:
            hits += 1
            assert listed[row["token_id_x"]] == pytest.approx(
                np.exp(-row["nll_reference"]), rel=1e-4
            )
    assert hits > 10


def test_top5_strings_and_worst_json_agree(view_run):
    view = pq.read_table(view_run / "view.parquet").to_pandas()
    worst = json.loads((view_run / "worst.json").read_text())
    shown = {(int(r.doc_id), int(r.position)): r for r in view[view["scored"]].itertuples()}
    checked = 0
    for entry in worst:
        row = shown.get((entry["doc_id"], entry["position"]))
        if row is None:
            continue
        checked += 1
        for side in ("reference", "candidate"):
            listed = entry[f"{side}_top5"]
            assert list(getattr(row, f"{side}_top5_ids")) == [e["token_id"] for e in listed]
            np.testing.assert_allclose(
                getattr(row, f"{side}_top5_probs"), [e["prob"] for e in listed], rtol=1e-5
            )
    assert checked > 0, "the worst documents hold some of the worst positions"


def test_resumed_run_writes_the_same_view(tiny_pair, six_docs, view_run, tmp_path, monkeypatch):
    original = TokenComparison.score
    calls = {"n": 0}

    def stop_at_third(self, index):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, index)

    monkeypatch.setattr(TokenComparison, "score", stop_at_third)
    with pytest.raises(Interrupted):
        _compare(tiny_pair, six_docs, tmp_path / "run")
    assert list((tmp_path / "run" / "parts").glob("view-*.parquet")), "parts keep their view"
    monkeypatch.setattr(TokenComparison, "score", original)
    run = _compare(tiny_pair, six_docs, tmp_path / "run", resume=True)
    assert run.results["provenance"]["resumed_parts"] == 2
    assert pq.read_table(run.path / "view.parquet").equals(pq.read_table(view_run / "view.parquet"))
    assert not (run.path / "parts").exists()


def test_llama_cpp_chunks_show_their_context_half(tiny_pair, six_docs, tmp_path):
    run = lmkl.compare(
        tiny_pair["reference"],
        tiny_pair["candidate"],
        data=six_docs,
        out=tmp_path / "llama",
        windowing="llama-cpp",
        context_length=32,
        batch_size=4,
        view_tokens=64,
    )
    view = pq.read_table(run.path / "view.parquet").to_pandas()
    for _, rows in view.groupby("unit"):
        assert len(rows) == 32  # a whole chunk
        assert rows["scored"].tolist() == [False] * 17 + [True] * 15
        assert (rows["window_id"] == rows["unit"]).all()


def test_view_tokens_is_refused_where_it_cannot_apply(tiny_pair, small_jsonl, tmp_path):
    code, output = invoke(
        [
            "compare",
            str(tiny_pair["reference"]),
            str(tiny_pair["candidate"]),
            "--data",
            str(small_jsonl),
            "--different-tokenizers",
            "--view-tokens",
            "100",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    check_error(code, output, 2, "--view-tokens needs token-level KL")
    code, output = invoke(["compare", "a", "b", "--view-tokens", "-1"])
    assert code == 2


def test_lone_bytes_read_as_hex_not_replacement_characters():
    tokenizer = tiny_tokenizer()
    ids = tokenizer("é – €")["input_ids"]
    shown = display_tokens(tokenizer, ids)
    assert all("\ufffd" not in s for s in shown)
    assert "".join(shown[1:]).count("<0x") >= 3  # the multi-byte characters BPE did not merge
    assert show_bytes("é".encode()) == "é"
    assert show_bytes(b"\xe2\x82") == "<0xE2><0x82>"
    assert show_bytes(b"a\xffb") == "a<0xFF>b"


def test_byte_fallback_pieces_read_as_themselves():
    class Fallback:
        def decode(self, ids):
            return "\ufffd"

        def convert_ids_to_tokens(self, ids):
            return ["<0xe2>" for _ in ids]

    assert display_tokens(Fallback(), [7, 7]) == ["<0xE2>", "<0xE2>"]


def test_choose_units_worst_or_a_seeded_sample():
    import pyarrow as pa

    from lmkl.engine.view_record import choose_units

    rng = np.random.default_rng(5)
    docs = np.repeat(np.arange(12), 10)
    kl = rng.gamma(1.0, 1.0, docs.size) * (1 + docs % 4)
    table = pa.table(
        {
            "candidate": ["s"] * docs.size,
            "doc_id": docs,
            "window_id": docs,
            "position": np.tile(np.arange(10), 12),
            "kl": kl,
        }
    )
    sizes = {d: 11 for d in range(12)}  # ten scored tokens and a BOS each
    worst = choose_units(table, sizes, 40, by_chunk=False)
    means = pd.Series(kl).groupby(docs).mean().sort_values(ascending=False)
    assert worst == means.index[:3].tolist()  # 3 x 11 <= 40 < 4 x 11
    sample = choose_units(table, sizes, 40, by_chunk=False, sample_seed=0)
    assert len(sample) == 3 and sample == choose_units(table, sizes, 40, False, sample_seed=0)
    others = {tuple(choose_units(table, sizes, 40, False, sample_seed=s)) for s in range(1, 6)}
    assert len(others | {tuple(sample)}) > 1  # the seed changes the sample


TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


def test_two_processes_record_the_same_view(tiny_pair, small_jsonl, tmp_path):
    """Under torchrun each rank records the view of its own parts; rank 0 gathers them and
    writes the same view.parquet as one process."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    args = [str(tiny_pair["reference"]), str(tiny_pair["candidate"]), "--data", str(small_jsonl)]
    args += ["-c", "48", "--stride", "24", "--batch-size", "2", "--no-compile"]
    args += ["--view-tokens", "300", "-q"]
    runs = {}
    for n in (1, 2):  # one process, then two
        launcher = (
            [sys.executable, "-m", "lmkl"] if n == 1 else [sys.executable, *TORCHRUN, "-m", "lmkl"]
        )
        out = tmp_path / f"p{n}"
        done = subprocess.run(
            [*launcher, "compare", *args, "--out", str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        # The rank that failed says why near the start; torchrun's summary fills the end.
        assert done.returncode == 0, done.stderr[:3000] + "\n...\n" + done.stderr[-1500:]
        runs[n] = pq.read_table(out / "view.parquet")
    assert runs[1].num_rows > 50
    assert runs[1].equals(runs[2])


def test_ranks_without_a_shared_filesystem_send_their_view_parts(tmp_path):
    """A rank's view parts travel with its parts to rank 0 (no shared filesystem)."""
    import pyarrow as pa

    from lmkl.engine.distributed import Shard
    from lmkl.engine.loop import gather_parts
    from lmkl.engine.rundir import RunDirectory, tokens_table
    from lmkl.engine.view_record import VIEW_PART_SCHEMA
    from lmkl.scoring.divergence import TOKEN_METRIC_NAMES

    row = {"candidate": ["c"], "doc_id": [0], "window_id": [0], "position": [1]}
    part = tokens_table(
        row
        | {"window_pos": [1], "token_id": [5], "bytes": [1], "nonfinite": [False]}
        | {name: [0.5] for name in TOKEN_METRIC_NAMES}
    )
    top = [[1, 2, 3, 4, 5]]
    view = pa.table(
        row
        | {
            "reference_top5_ids": top,
            "reference_top5_probs": [[0.5, 0.2, 0.1, 0.1, 0.05]],
            "candidate_top5_ids": top,
            "candidate_top5_probs": [[0.4, 0.3, 0.1, 0.1, 0.05]],
        },
        schema=VIEW_PART_SCHEMA,
    )

    class Rank(Shard):
        def __init__(self, rank: int, received: Any = None) -> None:
            super().__init__(rank=rank, world_size=2)
            self.received, self.sent = received, None

        def barrier(self) -> None:
            pass

        def broadcast(self, obj: Any) -> Any:
            return obj if self.rank == 0 else []

        def gather(self, obj: Any) -> Any:
            self.sent = obj
            return None if self.rank else [obj, self.received]

    worker = RunDirectory(tmp_path / "rank1")
    worker.write_part(1, part, sidecar={"worst": {}}, extra={"view": view})
    rank1 = Rank(1)
    gather_parts(rank1, worker, written=[1], counters={})
    main = RunDirectory(tmp_path / "rank0")
    main.write_part(0, part, sidecar={"worst": {}}, extra={"view": view})
    gather_parts(Rank(0, received=rank1.sent), main, written=[0], counters={})
    assert main.completed_indices() == [0, 1]
    assert main.read_extra("view").num_rows == 2
    assert pq.read_table(main.extra_path("view", 1)).equals(view)
    main.remove_part(1)
    assert not main.extra_path("view", 1).exists()
    # A view part whose part never completed (killed in between) is removed on resume.
    from lmkl.files import atomic_path

    with atomic_path(main.extra_path("view", 7)) as tmp:
        pq.write_table(view, tmp)
    assert "view-000007.parquet" in main.clean_incomplete()
    assert main.read_extra("view").num_rows == 1
