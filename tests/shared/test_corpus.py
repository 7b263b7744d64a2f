from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twinq.shared.corpus import CorpusRow, Rejected, detect_format, expand_paths, iter_records
from twinq.shared.errors import BadInput


def _rows(path: Path, **kw) -> tuple[list[CorpusRow], list[Rejected]]:
    records = list(iter_records(str(path), **kw))
    return ([r for r in records if isinstance(r, CorpusRow)],
            [r for r in records if isinstance(r, Rejected)])


def test_iter_records_beir_jsonl_needs_no_flags(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"_id": "1", "title": "", "text": "How do I sleep?"}\n'
                    '{"_id": 2, "title": "t", "text": "Why is the sky blue?"}\n')
    rows, rejected = _rows(path)
    assert [(r.id, r.text) for r in rows] == [("1", "How do I sleep?"), ("2", "Why is the sky blue?")]
    assert rows[1].metadata == {"title": "t"} and not rejected


def test_iter_records_csv_with_named_fields_and_metadata(tmp_path: Path) -> None:
    path = tmp_path / "faq.csv"
    path.write_text('qid,question,answer\nA,"Hello, world?","Say hi"\nB,Second,"multi\nline"\n')
    rows, rejected = _rows(path, id_field="qid", text_field="question")
    assert [(r.id, r.text, r.metadata["answer"]) for r in rows] == [
        ("A", "Hello, world?", "Say hi"), ("B", "Second", "multi\nline")]
    assert not rejected


def test_iter_records_rejects_malformed_rows_and_keeps_going(tmp_path: Path) -> None:
    path = tmp_path / "c.tsv"
    path.write_text("id\ttext\n1\tgood one\n2\ttoo\tmany\n\tno id\n3\tgood two\n")
    rows, rejected = _rows(path)
    assert [r.id for r in rows] == ["1", "3"]
    assert [r.line for r in rejected] == [3, 4]
    assert "expected 2 fields" in rejected[0].reason and "missing id" in rejected[1].reason


def test_iter_records_jsonl_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "1", "text": "ok"}\n{not json\n[1, 2]\n{"id": "2", "text": 5}\n'
                    '{"id": {"a": 1}, "text": "x"}\n\n{"id": "3", "text": "ok too"}\n')
    rows, rejected = _rows(path)
    assert [r.id for r in rows] == ["1", "3"]
    reasons = [r.reason for r in rejected]
    assert len(reasons) == 4
    assert reasons[0].startswith("invalid JSON") and "object" in reasons[1]
    assert "not a string" in reasons[2] and "id is not" in reasons[3]


def test_iter_records_parquet_and_invalid_utf8(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": [1, 2], "text": ["a", None], "lang": ["en", "fr"]}),
                   tmp_path / "c.parquet")
    rows, rejected = _rows(tmp_path / "c.parquet")
    assert [(r.id, r.metadata) for r in rows] == [("1", {"lang": "en"})] and len(rejected) == 1
    raw = tmp_path / "bad.tsv"
    raw.write_bytes(b"id\ttext\n1\tcaf\xc3 ok\n")
    rows, _ = _rows(raw)
    assert rows[0].text == "caf\ufffd ok"


@pytest.mark.parametrize("content,flags,message", [
    ('{"id": "1", "body": "x"}\n', {}, "no text column"),
    ('{"key": "1", "text": "x"}\n', {}, "no id column"),
    ('{"id": "1", "text": "x"}\n', {"text_field": "body"}, "no text column 'body'"),
])
def test_iter_records_missing_columns_are_bad_input(tmp_path: Path, content: str, flags: dict,
                                                    message: str) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(content)
    with pytest.raises(BadInput, match=message):
        list(iter_records(str(path), **flags))


def test_unreadable_parquet_and_unknown_format_are_bad_input(tmp_path: Path) -> None:
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(BadInput, match="cannot read"):
        list(iter_records(str(tmp_path / "broken.parquet")))
    with pytest.raises(BadInput, match="unknown corpus format"):
        detect_format("corpus.xlsx")


def test_expand_paths_globs_and_missing(tmp_path: Path) -> None:
    for name in ("b.jsonl", "a.jsonl"):
        (tmp_path / name).write_text(json.dumps({"id": name, "text": "t"}))
    assert expand_paths([str(tmp_path / "*.jsonl")]) == [str(tmp_path / "a.jsonl"),
                                                          str(tmp_path / "b.jsonl")]
    with pytest.raises(BadInput, match="not found"):
        expand_paths([str(tmp_path / "nothing*.csv")])


def write_parquet(path: Path, n: int = 3000) -> Path:
    """A Parquet file of several pages (small pages, so that a flip lands in data often)."""
    table = pa.table({"id": [f"q{i}" for i in range(n)],
                      "text": [f"question number {i} about things" for i in range(n)]})
    pq.write_table(table, path, compression="zstd", data_page_size=2048, row_group_size=1000)
    return path


def test_parquet_with_intact_footer_and_corrupt_data_page_is_one_line_bad_input(
        tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "c.parquet")
    page = pq.read_metadata(path).row_group(1).column(1).data_page_offset
    data = bytearray(path.read_bytes())
    data[page + 8: page + 200] = bytes(b ^ 0x5A for b in data[page + 8: page + 200])
    path.write_bytes(bytes(data))
    with pytest.raises(BadInput, match="cannot read .*c.parquet after row") as caught:
        list(iter_records(str(path)))
    assert str(caught.value).isprintable()


@settings(deadline=None, database=None, max_examples=150,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.floats(0.0, 1.0), length=st.integers(1, 64), mask=st.integers(1, 255))
def test_any_corruption_of_a_parquet_file_is_rows_or_one_line_bad_input(
        tmp_path: Path, offset: float, length: int, mask: int) -> None:
    path = tmp_path / "c.parquet"
    if not path.exists():
        write_parquet(path, 1500)
    good = path.read_bytes()
    start = int(offset * (len(good) - 1))
    broken = bytearray(good)
    broken[start: start + length] = bytes(b ^ mask for b in broken[start: start + length])
    target = tmp_path / "broken.parquet"
    target.write_bytes(bytes(broken))
    try:
        records = list(iter_records(str(target), "id", "text"))
    except BadInput as exc:
        assert str(exc).isprintable() and len(str(exc)) < 400
    else:
        assert all(isinstance(r, (CorpusRow, Rejected)) for r in records)


@pytest.mark.parametrize("name,content", [
    ("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.csv", ""), ("empty.tsv", "\n"),
    ("garbage.jsonl", "{not json\n[1, 2]\n")])
def test_an_empty_file_is_an_empty_corpus(tmp_path: Path, name: str, content: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(BadInput, match="empty corpus"):
        list(iter_records(str(tmp_path / name)))


def test_rows_know_their_line(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n\n{"id": "b", "text": "y"}\n')
    rows, _ = _rows(path)
    assert [(r.id, r.line) for r in rows] == [("a", 1), ("b", 3)]
