"""Pair readers: every format, format detection, quirks and rejected lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from twinq.shared.errors import BadInput
from twinq.shared.pairs import LabelledPair, read_pairs, sniff_format


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def test_read_pairs_lcqmc(tmp_path: Path) -> None:
    f = _write(tmp_path / "l.txt", "开初婚未育证明怎么弄？\t初婚未育情况证明怎么开？\t1\na\tb\t0\nbroken line\n")
    got = read_pairs(f)
    assert got.pairs == [LabelledPair("开初婚未育证明怎么弄？", "初婚未育情况证明怎么开？", 1),
                         LabelledPair("a", "b", 0)]
    assert got.rejected == 1 and got.sources[0]["format"] == "lcqmc"


def test_read_pairs_quora_invalid_utf8_and_doubled_quotes(tmp_path: Path) -> None:
    raw = (b'1\tWhy is it marked \xe2\x80?\tHow do I ask?\t120\n'
           b'0\t"What is ""woah oh""?"\tplain\t4708\n'
           b'2\tbad label\tx\t1\n')
    f = tmp_path / "dev.tsv"
    f.write_bytes(raw)
    got = read_pairs(f)
    assert got.sources[0]["format"] == "quora"
    assert got.pairs[0].label == 1 and "\ufffd" in got.pairs[0].q1
    assert got.pairs[1] == LabelledPair('What is "woah oh"?', "plain", 0)
    assert got.rejected == 1


def test_read_pairs_csv_with_bom(tmp_path: Path) -> None:
    f = _write(tmp_path / "bq.csv", "\ufeffsentence1,sentence2,label\n不要借了,借款审核,0\n"
               '"a, with comma",b,1\nonly,two\n')
    got = read_pairs(f)
    assert got.sources[0]["format"] == "csv"
    assert got.pairs == [LabelledPair("不要借了", "借款审核", 0), LabelledPair("a, with comma", "b", 1)]
    assert got.rejected == 1


def test_read_pairs_pawsx(tmp_path: Path) -> None:
    f = _write(tmp_path / "p.tsv", "id\tsentence1\tsentence2\tlabel\n4\tx one\ty one\t1\n5\tx\ty\t0\n")
    got = read_pairs(f)
    assert got.sources[0]["format"] == "pawsx"
    assert [p.label for p in got.pairs] == [1, 0] and got.pairs[0].q1 == "x one"


def test_read_pairs_positive_tsv(tmp_path: Path) -> None:
    got = read_pairs(_write(tmp_path / "pos.tsv", "q a\tq b\nq c\tq d\n"))
    assert got.positive_only and got.sources[0]["format"] == "positive-tsv"
    assert got.pairs[1] == LabelledPair("q c", "q d", None)


@pytest.mark.parametrize("spec", ["both", "q1", "q2", "glob", "prefix"])
def test_read_pairs_aligned_files_every_spelling(tmp_path: Path, spec: str) -> None:
    q1 = _write(tmp_path / "train_q1.txt", 'a1\n"b1 ""x"""\n\nd1\n')
    q2 = _write(tmp_path / "train_q2.txt", "a2\nb2\nc2\nd2\n")
    paths = {"both": [q1, q2], "q1": [q1], "q2": [q2], "glob": [str(tmp_path / "train_q*.txt")],
             "prefix": [tmp_path / "train"]}[spec]
    got = read_pairs(paths)
    assert got.pairs == [LabelledPair("a1", "a2", None), LabelledPair('b1 "x"', "b2", None),
                         LabelledPair("d1", "d2", None)]
    assert got.rejected == 1 and len(got.sources) == 1 and got.sources[0]["format"] == "aligned"
    assert len(got.sources[0]["sha256"]) == 64


def test_read_pairs_missing_and_unknown_raise_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInput):
        read_pairs(tmp_path / "nope.tsv")
    with pytest.raises(BadInput):
        sniff_format(["just one column", "another"])


def test_read_pairs_reference_files(data_dir: Path) -> None:
    expected = {"lcqmc/dev.txt": ("lcqmc", 8802), "bq/dev.csv": ("csv", 10000),
                "pawsx-zh/dev_2k.tsv": ("pawsx", 2000), "quora/labelled/dev.tsv": ("quora", 10000)}
    for rel, (fmt, rows) in expected.items():
        got = read_pairs(data_dir / rel)
        assert got.sources[0]["format"] == fmt and len(got.pairs) == rows, rel


def test_missing_reference_data_skips_unless_ci_is_set(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    import tests.conftest as conftest

    monkeypatch.setattr(conftest, "DATA_DIR", tmp_path / "absent")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="t needs the reference data, not found"):
        conftest.require_reference_data("t")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set, so it is required"):
        conftest.require_reference_data("t")
    monkeypatch.setattr(conftest, "DATA_DIR", tmp_path)
    assert conftest.require_reference_data("t") == tmp_path
