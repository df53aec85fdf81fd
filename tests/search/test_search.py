"""deploy.read_corpus: corpora and query files are read as training data is (no model needed)."""

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from embedft.errors import SearchError
from embedft.search.corpus import read_corpus
from embedft.search.indexing import check_results_path, open_index


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_missing_cells_are_refused_with_the_files_row_numbers(tmp_path):
    p = _jsonl(tmp_path / "c.jsonl", [{"id": 1, "text": "red shoe"}, {"id": 2, "text": None},
                                      {"id": 3, "text": "blue hat"}])
    with pytest.raises(SearchError, match=r"c\.jsonl: no 'text' value at rows 2 \(empty or null\)"):
        read_corpus(p)
    p = _jsonl(tmp_path / "l.jsonl", [{"id": 1, "text": "a", "kind": "x"}, {"id": 2, "text": "b", "kind": None}])
    with pytest.raises(SearchError, match="no 'kind' value at rows 2"):
        read_corpus(p, label_column="kind")
    assert read_corpus(p).labels is None  # the label column is read only when asked for
    p = _jsonl(tmp_path / "n.jsonl", [{"id": 1, "text": "a"}, {"id": 2, "text": ["b", "c"]}])
    with pytest.raises(SearchError, match=r"n\.jsonl: column 'text' \(--text-column\) holds lists or objects instead "
                                          r"of texts at rows 2"):
        read_corpus(p)
    csv = tmp_path / "c.csv"  # line 1 header, line 3 blank, line 4 the NA marker training data also treats as missing
    csv.write_text("id,text\n1,red shoe\n\n2,NA\n3,  \n4,blue hat\n")
    with pytest.raises(SearchError, match=r"no 'text' value at rows 4, 5 \(empty, or NA, NaN, nan, null or None\)"):
        read_corpus(csv)
    csv.write_text("id,text\n1,red shoe\nnull,blue hat\n")
    with pytest.raises(SearchError, match="no 'id' value at rows 3"):
        read_corpus(csv)


def test_values_read_as_training_data_reads_them(tmp_path):
    # JSONL/Parquet ints with a gap come back as floats: the id 3.0 is "3", as in a CSV.
    p = _jsonl(tmp_path / "c.json", [{"id": 1, "text": "red shoe"}, {"id": 3.0, "text": "blue hat"}])
    rows = read_corpus(p)
    assert (rows.ids, rows.texts, rows.id_column) == (["1", "3"], ["red shoe", "blue hat"], "id")
    pq = tmp_path / "c.pq"
    pd.DataFrame({"doc": ["a", "b"], "body": ["x y", "z"]}).to_parquet(pq)
    rows = read_corpus(pq, text_column="body", id_column="doc")
    assert (rows.ids, rows.texts) == (["a", "b"], ["x y", "z"])
    gz = tmp_path / "c.csv.gz"
    with gzip.open(gz, "wt") as f:
        f.write("id,text\n7,red shoe\n\n8,blue hat\n")
    rows = read_corpus(gz)  # a blank line is skipped, as in training data
    assert (rows.ids, rows.texts) == (["7", "8"], ["red shoe", "blue hat"])
    rows = read_corpus(gz, id_column="sku")  # no such id column: the file's row numbers (header line 1, blank line 3)
    assert (rows.ids, rows.id_column) == (["2", "4"], None)


def test_without_an_id_column_a_rows_id_is_the_row_number_its_messages_give(tmp_path):
    p = _jsonl(tmp_path / "c.jsonl", [{"text": "red shoe"}, {"text": ""}, {"text": "blue hat"}])
    with pytest.raises(SearchError, match="at rows 2 "):
        read_corpus(p)
    _jsonl(p, [{"text": "red shoe"}, {"text": "green sock"}, {"text": "blue hat"}])
    assert read_corpus(p).ids == ["1", "2", "3"]  # the refused row 2 is the document with id "2"
    csv = tmp_path / "c.csv"
    csv.write_text("0,red shoe\n1,green sock\n")
    assert read_corpus(csv, text_column="1", header=False).ids == ["1", "2"]  # no header: line 1 is a row
    pq = tmp_path / "c.parquet"
    pd.DataFrame({"text": ["a", "b", "c"]}).to_parquet(pq)
    assert read_corpus(pq).ids == ["1", "2", "3"]


def test_bad_files_name_the_fix(tmp_path):
    with pytest.raises(SearchError, match="not found"):
        read_corpus(tmp_path / "nope.csv")
    odd = tmp_path / "corpus.txt"
    odd.write_text("id,text\n1,a\n")
    with pytest.raises(SearchError, match=r"corpus\.txt: cannot tell the file format .* \.csv, \.tsv, \.jsonl or \.parquet"):
        read_corpus(odd)
    p = _jsonl(tmp_path / "c.jsonl", [{"id": 1, "text": "a"}])
    with pytest.raises(SearchError, match="--no-header is for CSV/TSV files"):
        read_corpus(p, header=False)
    with pytest.raises(SearchError, match=r"no column 'body'; columns are \['id', 'text'\]; pass --text-column"):
        read_corpus(p, text_column="body")
    dup = tmp_path / "d.csv"
    dup.write_text("id,text\n1,a\n1,b\n")
    with pytest.raises(SearchError, match="duplicate ids in column 'id': \\['1'\\]"):
        read_corpus(dup)
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"id": 1, "text": "a"}\n{"id": 2, "te\n')
    with pytest.raises(SearchError, match=r"b\.jsonl: line 2 is not a JSON object"):
        read_corpus(broken)


def test_an_eval_save_index_folder_is_refused_by_index_search_with_the_reason(tmp_path):
    import numpy as np

    from embedft.evaluation.index import build_index, save_index

    # The manifest `embedft eval --save-index` writes: an adapter model, no export to embed queries with.
    manifest = {"model": "4006042dfd4047bf+adapter", "base_model": "minilm", "adapter": "runs/x/adapter", "dim": 4,
                "metric": "inner_product", "normalized": True, "factory": "Flat", "count": 3}
    vectors = np.eye(3, 4, dtype=np.float32)
    out = save_index(tmp_path / "idx", build_index(vectors), ["a", "b", "c"], manifest)
    with pytest.raises(SearchError, match=r"idx was written by `embedft eval --save-index` \(the adapter runs/x/adapter "
                                          r"on minilm\), which no export's weights match; .*embedft index build"):
        open_index(out)


def test_search_out_that_is_a_folder_is_refused(tmp_path):
    check_results_path(tmp_path / "hits.jsonl")
    with pytest.raises(SearchError, match=r"--out .* is a folder; pass a file name for the JSON lines"):
        check_results_path(tmp_path)
