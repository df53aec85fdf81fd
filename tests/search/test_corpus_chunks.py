"""corpus.iter_corpus: a corpus read in chunks gives read_corpus's rows, ids and messages (no model needed)."""

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from embedft.errors import SearchError
from embedft.search.corpus import IdCheck, corpus_rows, iter_corpus, read_corpus

CHUNKS = (1, 2, 3, 1000)


def _chunked(path: Path, chunk_rows: int, **kw) -> tuple[list[str], list[str], list[str] | None, set]:
    parts = list(iter_corpus(path, chunk_rows=chunk_rows, **kw))
    labels = None if parts[0].labels is None else [x for c in parts for x in c.labels]
    return [i for c in parts for i in c.ids], [t for c in parts for t in c.texts], labels, {c.id_column for c in parts}


def _files(root: Path) -> list[tuple[Path, dict]]:
    csv = root / "c.csv"  # blank lines (counted in row numbers) and a quoted cell over two lines
    csv.write_text('id,text,kind\n1,red shoe,a\n\n2,"two\nlines",b\n3,blue hat,a\n\n\n4,x,b\n5,y,a\n')
    gz = root / "c.csv.gz"
    with gzip.open(gz, "wt") as f:
        f.write("id,text\n7,red shoe\n\n8,blue hat\n")
    jsonl = root / "c.jsonl"
    rows = [{"id": 1, "text": "a"}, None, {"id": 3.0, "text": "b"}, {"id": 4, "text": "c"}, None, None,
            {"id": 5, "text": "d"}]
    jsonl.write_text("".join(json.dumps(r) + "\n" if r else "\n" for r in rows))
    pq = root / "c.parquet"  # row groups of 3 rows: chunks are gathered across them
    pd.DataFrame({"doc": [f"d{i}" for i in range(10)], "body": [f"t {i}" for i in range(10)],
                  "kind": list("ab" * 5), "vec": [[0.5] * 4] * 10}).to_parquet(pq, row_group_size=3)
    tsv = root / "h.tsv"
    tsv.write_text("0\tred\n1\tblue\n\n2\tgreen\n")
    return [(csv, {"label_column": "kind"}), (csv, {"id_column": "sku"}), (gz, {}), (gz, {"id_column": "nope"}),
            (jsonl, {}), (jsonl, {"id_column": "x"}),
            (pq, {"text_column": "body", "id_column": "doc", "label_column": "kind"}), (pq, {"text_column": "body"}),
            (tsv, {"text_column": "1", "header": False})]


def test_chunks_are_the_whole_files_rows_ids_and_labels(tmp_path):
    for path, kw in _files(tmp_path):
        whole = read_corpus(path, **kw)
        for n in CHUNKS:
            assert _chunked(path, n, **kw) == (whole.ids, whole.texts, whole.labels, {whole.id_column}), (path, kw, n)


def test_chunks_are_the_same_on_every_read(tmp_path):
    # A shard is a chunk: a resumed build and every rank must cut the file alike.
    for path, kw in _files(tmp_path):
        first = [c.ids for c in iter_corpus(path, chunk_rows=2, **kw)]
        assert first == [c.ids for c in iter_corpus(path, chunk_rows=2, **kw)] and all(first)


def _bad_files(root: Path) -> list[tuple[Path, dict]]:
    def write(name: str, text: str) -> Path:
        (root / name).write_text(text)
        return root / name

    rows = "".join(f"{i},text {i}\n" for i in range(1, 8))
    pq = root / "bad.parquet"
    pd.DataFrame({"id": [1, 2, 3, 4, 5], "text": ["a", "b", None, "d", "e"]}).to_parquet(pq, row_group_size=2)
    nested = root / "n.jsonl"
    nested.write_text("".join(json.dumps({"id": i, "text": ["x"] if i == 5 else "t"}) + "\n" for i in range(1, 7)))
    return [
        (write("na.csv", "id,text\n" + rows + "8,NA\n9,  \n10,ok\n"), {}),  # missing texts in a late chunk
        (write("noid.csv", "id,text\n" + rows + "null,b\n"), {}),
        (write("fields.csv", "id,text\n" + rows + "8,a,b\n"), {}),  # a row with a field too many, line 9
        (write("first.csv", "id,text\n1,a,b\n2,c\n"), {}),
        (write("bad.jsonl", '{"id": 1, "text": "a"}\n\n{"id": 2, "text": "b"}\n{"id": 3, "te\n'), {}),
        (write("latin.csv", "id,text\n1,a\n2,b\n3,c\n"), {}),
        (write("col.csv", "id,text\n1,a\n"), {"text_column": "body"}),
        (write("head.csv", "id,text\n"), {}),
        (write("empty.csv", ""), {}),
        (pq, {}), (pq, {"text_column": "body"}), (nested, {}),
    ]


def test_a_bad_row_is_refused_with_the_whole_files_message(tmp_path):
    files = _bad_files(tmp_path)
    latin = tmp_path / "latin.csv"
    latin.write_bytes(latin.read_bytes() + "4,caf\xe9\n".encode("latin-1"))
    for path, kw in files:
        with pytest.raises(SearchError) as whole:
            read_corpus(path, **kw)
        for n in (3, 1000):  # with 3 rows a chunk, the bad rows below are in a later chunk than the first
            assert _chunked_error(path, n, **kw) == str(whole.value), (path.name, n)
    # Rows refused together are those of the first chunk that has any.
    assert "na.csv: no 'text' value at rows 9 (empty" in _chunked_error(tmp_path / "na.csv", 2)
    messages = [str(e) for e in _errors(files)]
    assert any("no 'text' value at rows 9, 10 (empty, or NA, NaN, nan, null or None)" in m for m in messages)
    assert any("line 9 has 3 fields but the header row has 2" in m for m in messages)
    assert any("bad.jsonl: line 4 is not a JSON object" in m for m in messages)
    assert any("latin.csv: line 5 is not UTF-8 text" in m for m in messages)
    assert any("no column 'body'; columns are ['id', 'text']; pass --text-column" in m for m in messages)
    assert any("bad.parquet: no 'text' value at rows 3 (empty or null)" in m for m in messages)


def _chunked_error(path: Path, chunk_rows: int, **kw) -> str:
    with pytest.raises(SearchError) as e:
        for _ in iter_corpus(path, chunk_rows=chunk_rows, **kw):
            pass
    return str(e.value)


def _errors(files):
    for path, kw in files:
        try:
            read_corpus(path, **kw)
        except SearchError as e:
            yield e


def test_duplicate_ids_across_chunks_are_named_as_in_the_whole_file(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("id,text\n" + "".join(f"{i % 7},t{i}\n" for i in range(9)))  # ids 0 and 1 twice
    with pytest.raises(SearchError) as whole:
        read_corpus(path)
    check = IdCheck(path, "id")
    chunks = list(iter_corpus(path, chunk_rows=4))
    for c in chunks:
        check.add(c.ids)
    with pytest.raises(SearchError) as chunked:
        check.check(lambda: (c.ids for c in chunks))
    assert str(chunked.value) == str(whole.value) == f"{path}: duplicate ids in column 'id': ['0', '1']; ids must be unique"
    unique = IdCheck(path, "id")
    unique.add(["a", "b"])
    unique.add(["c"])
    unique.check(lambda: pytest.fail("ids read again without a repeated hash"))


def test_corpus_rows_bounds_the_rows_without_parsing(tmp_path):
    for path, _ in _files(tmp_path):
        assert corpus_rows(path) >= len(read_corpus(path, text_column="body" if path.suffix == ".parquet" else
                                                    "1" if path.suffix == ".tsv" else "text",
                                                    header=path.suffix != ".tsv").ids)
    assert corpus_rows(tmp_path / "c.parquet") == 10 and corpus_rows(tmp_path / "c.csv") == 10
    (tmp_path / "x.parquet").write_text("not parquet")
    assert corpus_rows(tmp_path / "x.parquet") is None and corpus_rows(tmp_path / "nope.csv") is None


def test_train_rows_are_all_rows_up_to_the_sample_size_else_a_seeded_sample():
    from embedft.evaluation.index import new_index, train_rows, train_size

    assert train_rows(10, 10).tolist() == list(range(10)) == train_rows(10, 99).tolist()
    sample = train_rows(1000, 100)
    assert len(set(sample.tolist())) == 100 and (np.diff(sample) > 0).all()
    assert (sample == train_rows(1000, 100)).all() and not (sample == train_rows(1000, 100, seed=1)).all()
    assert train_size(new_index(8, "Flat", 10), 10) == 0 and train_size(new_index(8, "HNSW32", 10), 10) == 0
    assert train_size(new_index(8, "IVF4,Flat", 10**6), 10**6) == 65_536  # at least MIN_TRAIN_POINTS
    assert train_size(new_index(8, "IVF1024,Flat", 10**6), 10**6) == 256 * 1024
    assert train_size(new_index(8, "IVF1024,Flat", 2000), 2000) == 2000
