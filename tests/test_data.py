"""Reading text and cutting it into windows: exact positions for known token streams."""

from __future__ import annotations

import json
import re

import pytest

from lmkl.data.corpus import Corpus, Document, load_corpus
from lmkl.data.windows import make_windows
from lmkl.errors import DataError
from lmkl.specs import DataSpec, WindowSpec


class WordTokenizer:
    """Whitespace 'tokenizer': token id = index of the word + 10, BOS = 1, with offsets."""

    bos_token_id = 1
    all_special_ids = (1,)

    def __init__(self, add_bos: bool = True) -> None:
        self.add_bos = add_bos

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        ids = [10 + i for i in range(len(spans))]
        if add_special_tokens and self.add_bos:
            ids, spans = [1, *ids], [(0, 0), *spans]
        out = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = spans
        return out


def corpus(*texts: str) -> Corpus:
    return Corpus([Document(i, t) for i, t in enumerate(texts)], {}, "\n".join(texts))


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def scored_positions(windows):
    return [
        (w.doc_id, w.offset + j) for w in windows for j in range(w.first_target, len(w.input_ids))
    ]


@pytest.mark.parametrize(
    ("length", "n", "stride"),
    [(5, 8, 4), (8, 8, 4), (9, 8, 4), (30, 8, 3), (30, 8, 7), (100, 16, 1)],
)
def test_documents_windowing_scores_every_token_once(length, n, stride):
    tok = WordTokenizer()
    windows = make_windows(
        corpus(words(length - 1)), tok, WindowSpec(context_length=n, stride=stride), True
    )
    positions = scored_positions(windows)
    assert positions == [(0, p) for p in range(1, length)]  # in order, each once
    for w in windows:
        assert len(w.input_ids) <= n
        # every scored token after the first window has at least n - stride tokens of context
        if w.offset > 0:
            assert w.first_target >= n - stride


def test_documents_windowing_exact_spans():
    tok = WordTokenizer()
    windows = make_windows(corpus(words(19)), tok, WindowSpec(context_length=8, stride=4), True)
    spans = [(w.offset, w.offset + len(w.input_ids), w.first_target) for w in windows]
    # targets 1..7 | 8..11 | 12..15 | 16..19
    assert spans == [(0, 8, 1), (4, 12, 4), (8, 16, 4), (12, 20, 4)]


def test_max_tokens_cuts_exactly():
    tok = WordTokenizer()
    windows = make_windows(
        corpus(words(30), words(30)), tok, WindowSpec(context_length=8), True, max_tokens=40
    )
    assert sum(w.num_targets for w in windows) == 40


def test_llama_cpp_windowing_positions_for_known_stream():
    tok = WordTokenizer()
    text = words(40)  # 41 tokens with BOS
    windows = make_windows(
        corpus(text), tok, WindowSpec(windowing="llama-cpp", context_length=10), True
    )
    assert len(windows) == 4  # 41 // 10, the tail of 1 token dropped
    for chunk, w in enumerate(windows):
        assert w.offset == 10 * chunk
        assert w.input_ids[0] == 1  # first token overwritten with BOS, not prepended
        assert len(w.input_ids) == 10
        assert w.input_ids[1:] == [10 + 10 * chunk + j - 1 for j in range(1, 10)]
        # logits at positions 5..8 are scored: tokens 6..9 are predicted
        assert list(range(w.first_target, len(w.input_ids))) == [6, 7, 8, 9]
    assert scored_positions(windows)[:4] == [(0, 6), (0, 7), (0, 8), (0, 9)]


def test_llama_cpp_without_bos_keeps_first_token():
    tok = WordTokenizer(add_bos=False)
    windows = make_windows(
        corpus(words(20)), tok, WindowSpec(windowing="llama-cpp", context_length=10), False
    )
    assert windows[1].input_ids[0] == 20  # token 10 of the stream, untouched


def test_llama_cpp_too_short_text():
    with pytest.raises(DataError, match="fewer than 64 tokens"):
        make_windows(
            corpus(words(10)),
            WordTokenizer(),
            WindowSpec(windowing="llama-cpp", context_length=64),
            True,
        )


def test_target_bytes_add_up_to_text():
    tok = WordTokenizer()
    text = "héllo wörld  and  more"
    windows = make_windows(corpus(text), tok, WindowSpec(context_length=3, stride=1), True)
    assert sum(sum(w.target_bytes) for w in windows) == len(text.encode())


def test_txt_is_split_into_paragraphs_but_stream_is_byte_exact(tmp_path):
    raw = "first para\nline two\n\nsecond para\n\n\nthird\n"
    path = tmp_path / "t.txt"
    path.write_bytes(raw.encode())
    loaded = load_corpus(DataSpec(source=str(path)))
    assert [d.text for d in loaded.documents] == ["first para\nline two", "second para", "third"]
    assert loaded.stream_text == raw


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet", "saved"])
def test_local_formats(tmp_path, suffix):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a b c", "d e"], "other": [1, 2]})
    path = tmp_path / f"data{suffix if suffix != 'saved' else ''}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ds))
    elif suffix == ".csv":
        ds.to_csv(str(path))
    elif suffix == ".parquet":
        ds.to_parquet(str(path))
    else:
        ds.save_to_disk(str(path))
    loaded = load_corpus(DataSpec(source=str(path), max_samples=1))
    assert [d.text for d in loaded.documents] == ["a b c"]
    assert loaded.description["fingerprint"]


def test_missing_file_and_bad_format(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(DataSpec(source=str(tmp_path / "nope.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match="line 1 is not valid JSON"):
        load_corpus(DataSpec(source=str(bad)))
    other = tmp_path / "x.docx"
    other.write_text("x")
    with pytest.raises(DataError, match="unsupported data file type"):
        load_corpus(DataSpec(source=str(other)))


def test_stride_must_leave_context():
    with pytest.raises(ValueError, match="stride"):
        WindowSpec(context_length=8, stride=8)


# Files the light readers take (no datasets import) and that datasets reads as the same strings.
PLAIN_FILES = {
    "lines.jsonl": '{"text": "a b"}\n\n{"text": "caf\\u00e9 \\u2028 x", "n": 1}\r\n{"text": ""}\n',
    "bom.jsonl": '\ufeff{"text": "first"}\n{"text": "second\\nline"}\n',
    "objects.json": '[{"text": "one"}, {"text": "two", "other": [1, 2]}]',
    "strings.json": '["alpha", "beta gamma"]',
    "unicode.jsonl": '{"text": "\u2028raw separator\u2029 and \u00e9"}\n{"text": "b"}\n',
}


@pytest.mark.parametrize("name", sorted(PLAIN_FILES))
def test_light_json_reader_gives_the_documents_datasets_gives(tmp_path, name):
    import datasets

    from lmkl.data import corpus as corpus_module

    path = tmp_path / name
    path.write_bytes(PLAIN_FILES[name].encode())
    raw = path.read_bytes()
    light = corpus_module._plain_texts(raw, path, DataSpec(source=str(path)))
    assert light is not None, "a plain file must take the light path"
    expected = datasets.load_dataset("json", data_files=str(path), split="train")["text"]
    assert light == expected


def test_light_parquet_reader_gives_the_documents_datasets_gives(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmkl.data import corpus as corpus_module

    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"text": ["x y", "", "é z"], "n": [1, 2, 3]}), plain)
    written = tmp_path / "written.parquet"
    datasets.Dataset.from_dict({"text": ["p", "q r"]}).to_parquet(str(written))
    for path in (plain, written):
        light = corpus_module._plain_texts(path.read_bytes(), path, DataSpec(source=str(path)))
        expected = datasets.load_dataset("parquet", data_files=str(path), split="train")["text"]
        assert light == expected


@pytest.mark.parametrize(
    "name, content",
    [
        ("nulls.jsonl", '{"text": "a"}\n{"text": null}\n'),
        ("mixed.jsonl", '{"text": "a"}\n{"text": 3}\n'),
        ("chat.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n'),
        ("trace.jsonl", '{"text": "a", "type": "user", "message": {"role": "user"}}\n'),
        ("columns.json", '{"text": ["a", "b"]}'),
    ],
)
def test_anything_less_plain_is_left_to_datasets(tmp_path, name, content):
    from lmkl.data import corpus as corpus_module

    path = tmp_path / name
    path.write_text(content)
    assert corpus_module._plain_texts(path.read_bytes(), path, DataSpec(source=str(path))) is None


def test_a_local_jsonl_run_does_not_import_datasets(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a b"}\n')
    code = (
        "import sys\nfrom lmkl.data.corpus import load_corpus\nfrom lmkl.specs import DataSpec\n"
        f"docs = load_corpus(DataSpec(source={str(path)!r})).documents\n"
        "assert [d.text for d in docs] == ['a b']\nprint('datasets' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
