"""Data: readers, shapes, validation policies (with file row numbers), splits, eval tasks."""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from embedft.config import DataConfig, ExperimentConfig, TrainConfig
from embedft.data.batches import build_pair_source, epoch_batches
from embedft.data.examples import (
    DataReport,
    Examples,
    load_examples,
    load_splits,
    retrieval_task,
    split_examples,
    validate_split,
)
from embedft.errors import DataError

# (text, group, label): four texts per group, two groups per label; file rows 2..41 in a CSV.
ROWS = [(f"item {g} variant {j}", str(g), f"cat{g // 2}") for g in range(10) for j in range(4)]
N = len(ROWS)


def write_csv(path: Path, rows, header=("text", "group", "label"), sep=",") -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter=sep)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def grouped(**kw) -> DataConfig:
    return DataConfig(shape="grouped", **kw)


def given(train: Path, eval_: Path, **kw) -> DataConfig:
    return DataConfig(train=str(train), eval=str(eval_), split="given", **kw)


# -- readers -------------------------------------------------------------------------------


def _frame():
    import pandas as pd

    return pd.DataFrame(ROWS, columns=["text", "group", "label"])


def _write_all_formats(tmp_path: Path) -> dict[str, tuple[Path, dict]]:
    import datasets

    df = _frame()
    out = {"csv": (write_csv(tmp_path / "d.csv", ROWS), {}),
           "csv-noheader": (write_csv(tmp_path / "n.csv", ROWS, header=None),
                            {"header": False, "text_column": 0, "group_column": 1, "label_column": 2}),
           "tsv": (write_csv(tmp_path / "d.tsv", ROWS, sep="\t"), {})}
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "group": g, "label": lab}) + "\n"
                                              for t, g, lab in ROWS))
    out["jsonl"] = (tmp_path / "d.jsonl", {})
    df.to_parquet(tmp_path / "d.parquet")
    out["parquet"] = (tmp_path / "d.parquet", {})
    datasets.Dataset.from_pandas(df).save_to_disk(str(tmp_path / "ds"))
    out["disk"] = (tmp_path / "ds", {})
    return out


def test_every_reader_gives_the_same_examples(tmp_path):
    texts = [r[0] for r in ROWS]
    groups = [r[1] for r in ROWS]
    labels = [r[2] for r in ROWS]
    for name, (path, opts) in _write_all_formats(tmp_path).items():
        ex = load_examples(str(path), grouped(**opts))
        assert (ex.texts, ex.groups, ex.labels) == (texts, groups, labels), name
        first_row = 2 if name in ("csv", "tsv") else 1  # the header line counts in CSV/TSV
        assert ex.rows.tolist() == list(range(first_row, first_row + len(ROWS))), name


def test_integer_ids_read_the_same_from_typed_formats(tmp_path):
    # JSONL/Parquet keep numbers typed; a missing value turns an int column into floats.
    (tmp_path / "d.jsonl").write_text('{"text": "a", "group": 7}\n{"text": "b", "group": null}\n'
                                      '{"text": "c", "group": 10}\n')
    ex = load_examples(str(tmp_path / "d.jsonl"), grouped(label_column=None))
    assert ex.groups == ["7", "", "10"]


def test_unknown_extension_asks_for_data_format(tmp_path):
    p = tmp_path / "data.txt"
    p.write_text("text,label\na,b\n")
    with pytest.raises(DataError, match="set data.format"):
        load_examples(str(p), DataConfig())
    ex = load_examples(str(p), DataConfig(format="csv"))
    assert (ex.texts, ex.labels) == (["a"], ["b"])


def test_missing_file_names_it_and_the_option(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: file not found; check data\.train"):
        load_examples(str(tmp_path / "nope.csv"), DataConfig())


# -- shapes --------------------------------------------------------------------------------


def test_labeled_shape_groups_are_the_labels(tmp_path):
    p = write_csv(tmp_path / "l.csv", [(t, lab) for t, _, lab in ROWS], header=("text", "label"))
    ex = load_examples(str(p), DataConfig(shape="labeled"))
    assert ex.shape == "labeled" and ex.groups == ex.labels == [r[2] for r in ROWS]


def test_grouped_shape_with_and_without_a_label_column(tmp_path):
    p = write_csv(tmp_path / "g.csv", ROWS)
    ex = load_examples(str(p), grouped(text_column="text", group_column="group", label_column="label"))
    assert ex.groups == [r[1] for r in ROWS] and ex.labels == [r[2] for r in ROWS]
    p2 = write_csv(tmp_path / "g2.csv", [(t, g) for t, g, _ in ROWS], header=("text", "group"))
    ex2 = load_examples(str(p2), grouped())  # label_column defaults to "label"; absent -> no labels
    assert ex2.groups == ex.groups and ex2.labels is None


def test_pairs_shape_with_negative_columns(tmp_path):
    rows = [("q1", "p1", "n1", "m1"), ("q2", "p2", "", "m2"), ("q3", "p3", "n3", "m3")]
    p = write_csv(tmp_path / "p.csv", rows, header=("query", "positive", "neg_a", "neg_b"))
    ex = load_examples(str(p), DataConfig(shape="pairs", negative_columns=("neg_a", "neg_b")))
    assert ex.texts == ["q1", "q2", "q3"] and ex.positives == ["p1", "p2", "p3"]
    assert ex.negatives == [["n1", "m1"], ["", "m2"], ["n3", "m3"]]
    assert ex.groups is None and ex.all_texts() == ["q1", "q2", "q3", "p1", "p2", "p3", "n1", "m1", "", "m2", "n3", "m3"]


# -- validation ----------------------------------------------------------------------------


def test_empty_file_is_rejected(tmp_path):
    p = tmp_path / "empty.csv"
    p.write_text("")
    with pytest.raises(DataError, match=r"empty\.csv: the file is empty"):
        load_splits(DataConfig(train=str(p)))


def test_header_only_file_has_no_data_rows(tmp_path):
    p = tmp_path / "h.csv"
    p.write_text("text,label\n")
    with pytest.raises(DataError, match=r"h\.csv: the file has no data rows"):
        load_splits(DataConfig(train=str(p)))
    j = tmp_path / "e.jsonl"
    j.write_text("")
    with pytest.raises(DataError, match=r"e\.jsonl: .*(empty|no data rows)"):
        load_splits(DataConfig(train=str(j)))


def test_non_utf8_file_names_the_line_and_the_fix(tmp_path):
    p = tmp_path / "latin1.csv"
    p.write_bytes("text,label\n".encode() + "ok\n".encode() * 3000 + "caf\u00e9 cr\u00e8me,x\n".encode("latin1"))
    with pytest.raises(DataError, match=r"latin1\.csv: line 3002 is not UTF-8 text .*save it as UTF-8"):
        load_splits(DataConfig(train=str(p)))
    j = tmp_path / "l.jsonl"
    j.write_bytes(b'{"text": "a", "label": "x"}\n{"text": "caf\xe9", "label": "y"}\n')
    with pytest.raises(DataError, match=r"l\.jsonl: line 2 is not UTF-8"):
        load_splits(DataConfig(train=str(j)))


def test_unquoted_separator_in_the_first_row_is_refused_not_shifted(tmp_path):
    # pandas would make the first field an index and shift every column: texts would be group ids.
    p = tmp_path / "c.csv"
    p.write_text("text,group,label\nsamsung tv, 55 inch,1,TVs\nlg tv,1,TVs\nbosch fridge,2,Fridges\n")
    with pytest.raises(DataError, match=r"c\.csv: the first data row has more fields than the header row; quote"):
        load_examples(str(p), DataConfig(shape="grouped"))


def test_a_row_with_more_fields_than_the_header_names_its_line_and_the_fix(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("text,group,label\nlg tv,1,TVs\nsony tv,1,TVs\nsamsung tv, 55 inch,2,TVs\nbosch fridge,2,Fridges\n")
    with pytest.raises(DataError, match=r"c\.csv: line 4 has 4 fields but the header row has 3; quote a text that "
                                        r"contains ','") as e:
        load_examples(str(p), DataConfig(shape="grouped"))
    assert "\n" not in str(e.value)


def test_malformed_jsonl_names_the_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": "x"\n{"text": "c", "label": "y"}\n')
    with pytest.raises(DataError, match=r"t\.jsonl: line 3 is not a JSON object \(Expecting ',' delimiter at column"):
        load_splits(DataConfig(train=str(p)))


def test_jsonl_row_numbers_are_lines_when_blank_lines_are_skipped(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": "x"}\n{"text": "", "label": "y"}\n\n')
    ex = load_examples(str(p), DataConfig())
    assert ex.rows.tolist() == [1, 3, 4]


def test_missing_column_lists_the_available_ones(tmp_path):
    p = write_csv(tmp_path / "g.csv", ROWS)
    with pytest.raises(DataError) as e:
        load_examples(str(p), grouped(text_column="title"))
    msg = str(e.value)
    assert "g.csv" in msg and "missing column 'title' for data.text_column" in msg
    assert "columns are: text, group, label" in msg


def test_missing_column_hint_fits_the_cause(tmp_path):
    # A CSV read as TSV: one column named by the whole header line; the fix is the format.
    p = write_csv(tmp_path / "g.csv", ROWS)
    with pytest.raises(DataError, match=r"the file uses another one; set data.format=csv or tsv\)$"):
        load_examples(str(p), grouped(format="tsv"))
    # header=false numbers the columns: a column name cannot be found, a number can.
    n = write_csv(tmp_path / "n.csv", ROWS, header=None)
    with pytest.raises(DataError, match=r"columns are: 0, 1, 2 \(without a header row columns are numbered: "
                                        r"set data.text_column to 0..2\)$"):
        load_examples(str(n), grouped(header=False))


def test_column_index_out_of_range_is_named(tmp_path):
    p = write_csv(tmp_path / "n.csv", ROWS, header=None)
    with pytest.raises(DataError, match=r"data\.text_column=5 but the file has 3 columns"):
        load_examples(str(p), grouped(header=False, text_column=5, group_column=1, label_column=2))


def _with_empty_texts(tmp_path: Path) -> tuple[Path, list[int]]:
    """ROWS with two texts of group 3 emptied (one blank, one NaN); returns their 1-based file rows."""
    rows = [list(r) for r in ROWS]
    rows[12][0] = ""
    rows[14][0] = "NaN"
    return write_csv(tmp_path / "g.csv", rows), [12 + 2, 14 + 2]  # +1 for 1-based, +1 for the header


def test_empty_text_error_names_file_rows_and_option(tmp_path):
    p, bad_rows = _with_empty_texts(tmp_path)
    with pytest.raises(DataError) as e:
        load_splits(grouped(train=str(p)))
    msg = str(e.value)
    assert msg.startswith(f"{p}: 2 empty or missing texts/groups at rows {bad_rows[0]}, {bad_rows[1]}.")
    assert "data.on_empty_text=drop" in msg and "data.on_empty_text=warn" in msg


@pytest.mark.parametrize("policy", ["error", "warn"])
def test_empty_texts_on_both_sides_of_a_split_are_named_in_one_message(tmp_path, policy):
    rows = [list(r) for r in ROWS]
    for g in range(10):  # the first text of every group: both sides of the split get some
        rows[4 * g][0] = ""
    p = write_csv(tmp_path / "g.csv", rows)
    bad = ", ".join(str(4 * g + 2) for g in range(10))
    # Kept empty texts repeat, within the train side and across the split: those are warned about too.
    cfg = grouped(train=str(p), on_empty_text=policy, on_duplicate="warn", on_overlap="warn")
    if policy == "error":
        with pytest.raises(DataError, match=rf"g\.csv: 10 empty or missing texts/groups at rows {bad}\. Fix"):
            load_splits(cfg)
        return
    train, eval_, report = load_splits(cfg)  # warned once, for the file, not once per side
    assert [w for w in report.warnings if "empty or missing" in w] == [f"{p}: 10 empty or missing texts/groups at rows {bad}"]
    assert report.counts["train_empty"] == 10 and "eval_empty" not in report.counts
    assert "" in train.texts and "" in eval_.texts


def test_empty_text_rows_in_jsonl_are_line_numbers(tmp_path):
    lines = [{"text": t, "label": lab} for t, _, lab in ROWS]
    lines[3]["text"] = None
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(DataError, match=r"1 empty or missing texts/groups at rows 4\."):
        validate_split(load_examples(str(p), DataConfig()), DataConfig(), DataReport(), "train")


def test_list_or_object_cells_are_refused_not_read_as_their_repr(tmp_path):
    import pandas as pd

    lines = [{"text": t, "label": lab} for t, _, lab in ROWS]
    lines[2]["text"], lines[5]["label"] = ["red", "shoe"], {"name": "cat1"}
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(DataError, match=r"d\.jsonl: data\.text_column='text' holds lists or objects instead of texts "
                                        r"at rows 3; give one text per cell"):
        load_examples(str(p), DataConfig())
    pq = tmp_path / "d.parquet"  # Parquet list columns come back as numpy arrays
    pd.DataFrame({"text": [t for t, _, _ in ROWS], "label": [[lab] for _, _, lab in ROWS]}).to_parquet(pq)
    with pytest.raises(DataError, match=r"data\.label_column='label' holds lists or objects instead of texts "
                                        r"at rows 1, 2, 3, .* \(40 rows\)"):
        load_examples(str(pq), DataConfig())


def test_empty_text_drop_removes_exactly_those_rows_and_counts_them(tmp_path):
    p, bad_rows = _with_empty_texts(tmp_path)
    train, eval_, report = load_splits(grouped(train=str(p), on_empty_text="drop"))
    kept = sorted(train.rows.tolist() + eval_.rows.tolist())
    assert kept == [r for r in range(2, len(ROWS) + 2) if r not in bad_rows]
    assert "" not in train.texts + eval_.texts
    assert sum(v for k, v in report.counts.items() if k.endswith("_empty")) == 2
    assert report.warnings == []


def test_empty_text_drop_counts_with_a_given_split(tmp_path):
    p, bad_rows = _with_empty_texts(tmp_path)
    ev = write_csv(tmp_path / "eval.csv", [("other a", "90", "x"), ("other b", "90", "x")])
    train, _, report = load_splits(grouped(train=str(p), eval=str(ev), split="given", on_empty_text="drop"))
    assert set(bad_rows).isdisjoint(train.rows.tolist()) and len(train) == len(ROWS) - 2
    assert report.counts["train_empty"] == 2


def test_empty_text_warn_keeps_rows_and_records_a_warning(tmp_path):
    rows = [list(r) for r in ROWS]
    rows[12][0] = ""
    ev = write_csv(tmp_path / "eval.csv", [("other a", "90", "x"), ("other b", "90", "x")])
    p = write_csv(tmp_path / "g.csv", rows)
    train, _, report = load_splits(given(p, ev, shape="grouped", on_empty_text="warn"))
    assert len(train) == len(ROWS) and "" in train.texts
    assert report.counts["train_empty"] == 1
    assert report.warnings == [f"{p}: 1 empty or missing texts/groups at rows 14"]


def test_empty_group_is_an_empty_row_too(tmp_path):
    rows = [list(r) for r in ROWS]
    rows[0][1] = ""
    p = write_csv(tmp_path / "g.csv", rows)
    with pytest.raises(DataError, match=r"at rows 2\."):
        validate_split(load_examples(str(p), grouped()), grouped(), DataReport(), "train")


def test_empty_label_of_grouped_data_is_an_empty_row_not_a_class(tmp_path):
    rows = [list(r) for r in ROWS]
    rows[5][2], rows[30][2] = "", "NaN"
    p = write_csv(tmp_path / "g.csv", rows)
    with pytest.raises(DataError, match=r"g\.csv: 2 empty or missing labels \(data\.label_column='label'\) at rows 7, 32\. "
                                        r"Fix the data, or set data\.on_empty_text=drop"):
        load_splits(grouped(train=str(p)))
    train, eval_, report = load_splits(grouped(train=str(p), on_empty_text="drop"))
    assert "" not in train.labels + eval_.labels and report.counts["train_empty_label"] == 2
    assert len(train) + len(eval_) == N - 2


def _eval_file(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "eval.csv", [("other a", "90", "cat9"), ("other b", "90", "cat9")])


def test_singleton_groups_error_drop_warn(tmp_path):
    rows = list(ROWS) + [("lonely one", "50", "cat0"), ("lonely two", "51", "cat1")]  # file rows N+2, N+3
    p, ev = write_csv(tmp_path / "g.csv", rows), _eval_file(tmp_path)
    with pytest.raises(DataError) as e:
        load_splits(given(p, ev, shape="grouped"))
    msg = str(e.value)
    assert "2 groups with a single example" in msg and f"at rows {N + 2}, {N + 3}." in msg and "data.on_singleton" in msg
    train, _, report = load_splits(given(p, ev, shape="grouped", on_singleton="drop"))
    assert train.texts == [r[0] for r in ROWS] and report.counts["train_singleton"] == 2
    train, _, report = load_splits(given(p, ev, shape="grouped", on_singleton="warn"))
    assert len(train) == len(rows) and report.counts["train_singleton"] == 2
    assert report.warnings == [f"{p}: 2 groups with a single example (no positive to pair with) at rows {N + 2}, {N + 3}"]


def test_singleton_labels_in_labeled_data(tmp_path):
    rows = [("a", "x"), ("b", "x"), ("c", "y"), ("d", "z"), ("e", "z")]
    p = write_csv(tmp_path / "l.csv", rows, header=("text", "label"))
    ev = write_csv(tmp_path / "e.csv", [("f", "x")], header=("text", "label"))
    with pytest.raises(DataError, match=r"1 labels with a single example .* at rows 4\."):
        load_splits(given(p, ev))


def test_duplicate_texts_error_drop_warn_first_kept(tmp_path):
    rows = list(ROWS) + [(ROWS[0][0], "0", "cat0"), (ROWS[4][0], "1", "cat0")]  # file rows N+2, N+3
    p, ev = write_csv(tmp_path / "g.csv", rows), _eval_file(tmp_path)
    with pytest.raises(DataError) as e:
        load_splits(given(p, ev, shape="grouped"))
    assert f"2 exact duplicate texts (first kept) at rows {N + 2}, {N + 3}." in str(e.value)
    assert "data.on_duplicate" in str(e.value)
    train, _, report = load_splits(given(p, ev, shape="grouped", on_duplicate="drop"))
    assert train.rows.tolist() == list(range(2, len(ROWS) + 2))  # the first of each is the one kept
    assert report.counts["train_duplicate"] == 2
    train, _, report = load_splits(given(p, ev, shape="grouped", on_duplicate="warn"))
    assert len(train) == len(rows) and len(report.warnings) == 1 and f"rows {N + 2}, {N + 3}" in report.warnings[0]


def test_train_eval_overlap_error_drop_warn(tmp_path):
    p = write_csv(tmp_path / "g.csv", ROWS)
    ev = write_csv(tmp_path / "eval.csv", [(ROWS[1][0], "90", "x"), ("other", "90", "x"), (ROWS[7][0], "91", "x")])
    with pytest.raises(DataError) as e:
        load_splits(given(p, ev, shape="grouped"))
    msg = str(e.value)
    assert msg.startswith(f"{p}: 2 train texts that also appear in the eval split at rows 3, 9.")
    assert "data.on_overlap=drop" in msg
    train, eval_, report = load_splits(given(p, ev, shape="grouped", on_overlap="drop"))
    assert 3 not in train.rows and 9 not in train.rows and len(train) == len(ROWS) - 2
    assert len(eval_) == 3 and report.counts["train_eval_overlap"] == 2
    train, _, report = load_splits(given(p, ev, shape="grouped", on_overlap="warn"))
    assert len(train) == len(ROWS) and report.counts["train_eval_overlap"] == 2 and len(report.warnings) == 1


def test_report_counts_rows(tmp_path):
    p = write_csv(tmp_path / "g.csv", ROWS)
    train, eval_, report = load_splits(given(p, _eval_file(tmp_path), shape="grouped"))
    assert report.counts == {"train_rows": len(ROWS), "eval_rows": 2} and report.warnings == []


def test_pairs_query_with_two_positives_is_not_a_duplicate(tmp_path):
    rows = [("q1", "p1"), ("q2", "p2"), ("q1", "p3"), ("q1", "p1")]
    p = write_csv(tmp_path / "p.csv", rows, header=("query", "positive"))
    cfg = DataConfig(shape="pairs", on_duplicate="drop")
    report = DataReport()
    ex = validate_split(load_examples(str(p), cfg), cfg, report, "train")
    assert len(ex) == 3 and report.counts["train_duplicate"] == 1  # only the repeated (q1, p1) row
    # In training, q1's other positive is never its negative: both rows share one key.
    src = build_pair_source(ex)
    k = dict(zip(src.anchors.tolist(), src.anchor_keys.tolist()))
    q1 = src.texts.index("q1")
    assert src.text_keys[src.texts.index("p1")] == src.text_keys[src.texts.index("p3")] == k[q1]
    assert src.text_keys[src.texts.index("p2")] != k[q1]


# -- splits --------------------------------------------------------------------------------


def _many_groups(n_groups=200, per=3):
    from embedft.data.examples import Examples

    rows = [(f"text {g}-{j}", str(g)) for g in range(n_groups) for j in range(per)]
    return Examples("grouped", "mem", np.arange(len(rows)) + 2, [r[0] for r in rows], groups=[r[1] for r in rows])


def test_hash_split_keeps_groups_whole_and_is_deterministic():
    ex = _many_groups()
    cfg = DataConfig(shape="grouped", split="hash", eval_fraction=0.2)
    train, eval_ = split_examples(ex, cfg)
    assert set(train.groups).isdisjoint(eval_.groups)
    assert len(train) + len(eval_) == len(ex)
    frac = len(set(eval_.groups)) / 200
    assert 0.12 <= frac <= 0.28, frac
    train2, eval2 = split_examples(ex, cfg)
    assert train2.texts == train.texts and eval2.texts == eval_.texts
    _, eval_other_seed = split_examples(ex, replace(cfg, split_seed=14))
    assert eval_other_seed.texts != eval_.texts


def test_modulo_split_is_exactly_group_mod_n():
    ex = _many_groups(n_groups=23, per=2)
    train, eval_ = split_examples(ex, DataConfig(shape="grouped", split="modulo", split_modulo=5))
    assert sorted(set(map(int, eval_.groups))) == [0, 5, 10, 15, 20]
    assert all(int(g) % 5 != 0 for g in train.groups)
    assert len(train) + len(eval_) == len(ex)


def test_modulo_split_needs_integer_groups():
    from embedft.data.examples import Examples

    ex = Examples("grouped", "mem", np.arange(4) + 1, list("abcd"), groups=["x", "x", "5", "5"])
    with pytest.raises(DataError, match="integer group ids"):
        split_examples(ex, DataConfig(shape="grouped", split="modulo"))


def test_given_split_uses_the_eval_file(tmp_path):
    p = write_csv(tmp_path / "g.csv", ROWS)
    ev = _eval_file(tmp_path)
    train, eval_, _ = load_splits(given(p, ev, shape="grouped"))
    assert train.texts == [r[0] for r in ROWS]
    assert eval_.texts == ["other a", "other b"] and eval_.source == str(ev) and eval_.rows.tolist() == [2, 3]


def test_load_splits_hash_on_a_file(tmp_path):
    rows = [(f"text {g}-{j}", str(g), "c") for g in range(60) for j in range(2)]
    p = write_csv(tmp_path / "g.csv", rows)
    train, eval_, report = load_splits(grouped(train=str(p), eval_fraction=0.25))
    assert set(train.groups).isdisjoint(eval_.groups)
    assert report.counts["train_rows"] == len(train) and len(train) + len(eval_) == len(rows)


# -- evaluation tasks ----------------------------------------------------------------------


def test_retrieval_task_grouped():
    from embedft.data.examples import Examples

    texts = ["a1", "a2", "a3", "b1", "c1", "c2"]
    ex = Examples("grouped", "m", np.arange(6) + 1, texts, groups=["a", "a", "a", "b", "c", "c"])
    task = retrieval_task(ex)
    assert task.corpus == texts
    assert task.queries == ["a1", "a2", "a3", "c1", "c2"]  # b1 is alone: not a query
    assert task.self_ids.tolist() == [0, 1, 2, 4, 5]
    assert [p.tolist() for p in task.positives] == [[1, 2], [0, 2], [0, 1], [5], [4]]
    capped = retrieval_task(ex, max_queries=2, seed=0)
    assert len(capped) == 2 and capped.corpus == texts
    for q, sid, pos in zip(capped.queries, capped.self_ids, capped.positives):
        assert texts[sid] == q and sid not in pos.tolist()


def test_retrieval_task_pairs():
    from embedft.data.examples import Examples

    ex = Examples("pairs", "m", np.arange(4) + 1, ["q1", "q2", "q1", "q3"], positives=["p1", "p2", "p3", "p1"],
                  negatives=[["n1"], ["p2"], [""], ["n1"]])
    task = retrieval_task(ex)
    assert task.queries == ["q1", "q2", "q3"]
    assert task.corpus == ["p1", "p2", "p3", "n1"]
    assert [p.tolist() for p in task.positives] == [[0, 2], [1], [0]]
    assert task.self_ids is None


# -- prepare_data: checked before any model is loaded --------------------------------------

# No validation split carved out of the training file: these tests count its rows.
NO_VAL = {"val_fraction": 0.0, "select_best": False, "patience": None}


def test_prepare_data_rejects_batch_larger_than_anchors_before_loading_a_model(tmp_path, monkeypatch):
    from embedft.recipes.common import prepare_data

    monkeypatch.setitem(sys.modules, "embedft.modeling.encoder", None)  # any model import would now fail
    p = write_csv(tmp_path / "g.csv", ROWS)
    cfg = ExperimentConfig(data=given(p, _eval_file(tmp_path), shape="grouped"), train=TrainConfig(batch_size=64, **NO_VAL))
    with pytest.raises(DataError) as e:
        prepare_data(cfg)
    msg = str(e.value)
    assert "train.batch_size=64" in msg and f"{len(ROWS)} training anchors" in msg and f"at most {len(ROWS)}" in msg
    ok = prepare_data(replace(cfg, train=TrainConfig(batch_size=len(ROWS), **NO_VAL)))
    assert ok.source.n_anchors == len(ROWS) and len(ok.train) == len(ROWS)


def test_csv_row_numbers_count_blank_lines(tmp_path):
    """Rows in messages are the file's line numbers, blank lines included."""
    p = tmp_path / "blank.csv"
    p.write_text("text,group\n\na,1\nb,1\n\n\n,2\nc,2\n")
    ex = load_examples(str(p), DataConfig(text_column="text", group_column="group", shape="grouped"))
    assert ex.rows.tolist() == [3, 4, 7, 8]
    with pytest.raises(DataError, match=r"1 empty or missing texts/groups at rows 7\."):
        validate_split(ex, DataConfig(), DataReport(), "train")


def test_linear_probe_without_scikit_learn_fails_before_any_model(tmp_path, monkeypatch):
    import importlib.util

    from embedft.config import EvalConfig
    from embedft.errors import ConfigError
    from embedft.recipes.common import prepare_data

    monkeypatch.setitem(sys.modules, "embedft.modeling.encoder", None)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    p = write_csv(tmp_path / "g.csv", ROWS)
    cfg = ExperimentConfig(data=given(p, _eval_file(tmp_path), shape="grouped"), train=TrainConfig(batch_size=2, **NO_VAL),
                           eval=EvalConfig(linear_probe=True))
    with pytest.raises(ConfigError, match=r"eval.linear_probe=true needs scikit-learn.*pip install scikit-learn"):
        prepare_data(cfg)
    assert prepare_data(replace(cfg, eval=EvalConfig())).source.n_anchors == len(ROWS)


def _qlora_machine(monkeypatch, bitsandbytes: bool, cuda: bool) -> None:
    """This machine as one with or without bitsandbytes and a CUDA device (neither is imported)."""
    import importlib.util

    import torch

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (None if not bitsandbytes else object()) if name == "bitsandbytes"
                        else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)


@pytest.mark.parametrize("bitsandbytes, cuda, device, reasons, fix", [
    (False, True, "auto", ["bitsandbytes is not installed"], "Install it on this CUDA machine (pip install bitsandbytes)"),
    (True, False, "auto", ["train.device=auto runs on the CPU (no CUDA device here), and bitsandbytes' 4-bit and "
                           "8-bit kernels need a CUDA GPU here"], "Train on a CUDA machine with bitsandbytes installed"),
    (True, True, "cpu", ["train.device=cpu, and bitsandbytes' 4-bit and 8-bit kernels need a CUDA GPU here"],
     "Train on a CUDA machine"),
    (False, False, "cuda", ["bitsandbytes is not installed", "train.device=cuda but no CUDA device is available"],
     "Train on a CUDA machine with bitsandbytes installed (pip install bitsandbytes)"),
])
def test_qlora_is_refused_where_bitsandbytes_cannot_run_before_any_model(tmp_path, monkeypatch, bitsandbytes, cuda,
                                                                         device, reasons, fix):
    from embedft.errors import ConfigError
    from embedft.recipes.common import prepare_data

    monkeypatch.setitem(sys.modules, "embedft.modeling.encoder", None)  # any model import would now fail
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # nor may bitsandbytes be imported to find out
    _qlora_machine(monkeypatch, bitsandbytes, cuda)
    p = write_csv(tmp_path / "g.csv", ROWS)
    cfg = ExperimentConfig(data=given(p, _eval_file(tmp_path), shape="grouped"),
                           train=TrainConfig(batch_size=2, device=device, base_quantization="nf4", **NO_VAL))
    with pytest.raises(ConfigError) as e:
        prepare_data(cfg)
    msg = str(e.value)
    assert msg.startswith("train.base_quantization=nf4 cannot train here: ") and e.value.keys == ("train.base_quantization",)
    assert all(r in msg for r in reasons) and fix in msg and msg.endswith(
        "or set -o train.base_quantization=null to train on the unquantised base")
    assert prepare_data(replace(cfg, train=replace(cfg.train, base_quantization=None))).source.n_anchors == len(ROWS)
    assert prepare_data(replace(cfg, train=replace(cfg.train, base_quantization="none"))).source.n_anchors == len(ROWS)


def test_qlora_passes_the_early_check_on_a_cuda_machine_with_bitsandbytes(tmp_path, monkeypatch):
    from embedft.recipes.common import prepare_data

    monkeypatch.setitem(sys.modules, "embedft.modeling.encoder", None)
    _qlora_machine(monkeypatch, bitsandbytes=True, cuda=True)
    p = write_csv(tmp_path / "g.csv", ROWS)
    for q, device in (("nf4", "auto"), ("int8", "cuda:0")):
        cfg = ExperimentConfig(data=given(p, _eval_file(tmp_path), shape="grouped"),
                               train=TrainConfig(batch_size=2, device=device, base_quantization=q, **NO_VAL))
        assert prepare_data(cfg).source.n_anchors == len(ROWS)


def test_grouped_batches_carry_each_anchors_label_for_the_label_term(tmp_path):
    from embedft.config import LossConfig
    from embedft.errors import ConfigError
    from embedft.recipes.common import prepare_data

    p = write_csv(tmp_path / "g.csv", ROWS)
    cfg = ExperimentConfig(data=given(p, _eval_file(tmp_path), shape="grouped"), train=TrainConfig(batch_size=8),
                           loss=LossConfig(label_weight=0.2))
    src = prepare_data(cfg).source
    label_of_text = {t: lab for t, _, lab in ROWS}
    pairs = set()
    for batch in epoch_batches(src, 8, seed=0, epoch=0):
        pairs |= {(int(i), label_of_text[src.texts[a]]) for i, a in zip(batch.anchor_labels, batch.anchors)}
        # A positive is another offer of the anchor's product, so it has the anchor's label too.
        assert [label_of_text[src.texts[a]] for a in batch.anchors] == [label_of_text[src.texts[q]] for q in batch.positives]
    # Label ids stand one-to-one for the label names, and every label is seen.
    assert len(pairs) == len({i for i, _ in pairs}) == len({n for _, n in pairs}) == len(set(label_of_text.values()))
    # Without a label column the term has nothing to work on: a clear error before any model.
    no_label = ExperimentConfig(data=given(p, _eval_file(tmp_path), shape="grouped", label_column=None),
                                train=TrainConfig(batch_size=8), loss=LossConfig(label_weight=0.2))
    with pytest.raises(ConfigError, match=r"loss.label_weight=0.2 needs grouped data with a label column"):
        prepare_data(no_label)


def test_group_sampling_with_symmetric_is_a_config_error(tmp_path):
    from embedft.config import LossConfig
    from embedft.errors import ConfigError
    from embedft.recipes.common import prepare_data

    p = write_csv(tmp_path / "g.csv", ROWS)
    cfg = ExperimentConfig(data=given(p, _eval_file(tmp_path), shape="grouped"),
                           train=TrainConfig(batch_size=4, batch_sampling="similar_groups", **NO_VAL))
    # Rejected when the config is built (load_config, -o, `embedft check`), before any data is read.
    assert replace(cfg, loss=LossConfig(hard_negatives=1)).loss.hard_negatives == 1  # mined: extra candidates
    with pytest.raises(ConfigError, match=r"loss.symmetric=true is not used with train.batch_sampling=similar_groups"):
        replace(cfg, loss=LossConfig(symmetric=True))
    assert prepare_data(cfg).source.n_anchors == len(ROWS)


def test_pairs_overlap_checks_positives_and_every_eval_text(tmp_path):
    # A train pair leaks when its query or its positive is any text of the eval split: a query,
    # a positive or a negative there.
    header = ("query", "positive", "negative")
    train = write_csv(tmp_path / "t.csv", [("q1", "p1", "n1"), ("q2", "shared positive", "n2"),
                                           ("q3", "eval query", "n3"), ("q4", "p4", "n4"),
                                           ("eval negative", "p5", "n5"), ("q6", "p6", "n6")], header=header)
    ev = write_csv(tmp_path / "e.csv", [("eval query", "shared positive", "eval negative")], header=header)
    cfg = given(train, ev, shape="pairs", negative_columns=("negative",))
    with pytest.raises(DataError, match=r"t\.csv: 3 train texts that also appear in the eval split at rows 3, 4, 6\."):
        load_splits(cfg)
    kept, _, report = load_splits(replace(cfg, on_overlap="drop"))
    assert kept.texts == ["q1", "q4", "q6"] and report.counts["train_eval_overlap"] == 3


def test_empty_positive_is_an_empty_row(tmp_path):
    p = write_csv(tmp_path / "p.csv", [("q1", "p1"), ("q2", ""), ("q3", "p3")], header=("query", "positive"))
    cfg = DataConfig(shape="pairs")
    with pytest.raises(DataError, match=r"1 empty or missing texts/groups at rows 3\. .*data.on_empty_text"):
        validate_split(load_examples(str(p), cfg), cfg, DataReport(), "train")


def test_max_train_and_eval_rows_cap_each_split(tmp_path):
    p = write_csv(tmp_path / "g.csv", ROWS)
    ev = write_csv(tmp_path / "e.csv", [(f"other {i}", "90", "cat9") for i in range(6)])
    train, eval_, _ = load_splits(given(p, ev, shape="grouped", max_eval_rows=2))
    assert len(train) == N and len(eval_) == 2 and set(eval_.texts) < {f"other {i}" for i in range(6)}
    train, eval_, _ = load_splits(given(p, ev, shape="grouped", max_train_rows=10, on_singleton="drop"))
    assert len(eval_) == 6 and 0 < len(train) <= 10


# -- degenerate or mistyped input is named, not misreported or silently scored (issue 35) ----------


def test_a_named_label_column_that_is_missing_is_a_missing_column(tmp_path):
    p = write_csv(tmp_path / "g.csv", ROWS)
    with pytest.raises(DataError, match=r"missing column 'categroy' for data.label_column; columns are: "):
        load_examples(str(p), DataConfig(text_column="text", group_column="group", label_column="categroy",
                                         shape="grouped"))
    p = write_csv(tmp_path / "nolabel.csv", [r[:2] for r in ROWS], header=("text", "group"))
    ex = load_examples(str(p), DataConfig(text_column="text", group_column="group", shape="grouped"))
    assert ex.labels is None  # the default label column may be absent from grouped data


def test_a_text_column_of_numbers_is_warned_about(tmp_path, caplog):
    p = tmp_path / "n.csv"
    p.write_text("id,text,group\n" + "".join(f"{100 + i},t{i},{i // 2}\n" for i in range(8)))
    with caplog.at_level("WARNING"):
        load_examples(str(p), DataConfig(text_column="id", group_column="group", shape="grouped"))
    assert "data.text_column='id' holds only numbers ('100', ...)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_examples(str(p), DataConfig(text_column="text", group_column="group", shape="grouped"))
    assert "holds only numbers" not in caplog.text


# -- the validation split: carved out of the training data ----------------------------------


def _labeled(n_labels=5, per=20, small=None):
    rows = [(f"text {lab}-{j}", f"lab{lab}") for lab in range(n_labels) for j in range(per)]
    rows += [(f"rare {j}", "rare") for j in range(small or 0)]
    return Examples("labeled", "mem", np.arange(len(rows)) + 2, [r[0] for r in rows], groups=[r[1] for r in rows],
                    labels=[r[1] for r in rows])


def test_validation_split_is_disjoint_deterministic_and_keeps_every_labels_share():
    from embedft.data.examples import carve_validation

    ex = _labeled(small=2)
    fit, val = carve_validation(ex, 0.2, seed=13)
    assert set(fit.texts).isdisjoint(val.texts) and len(fit) + len(val) == len(ex)
    assert sorted(fit.texts + val.texts) == sorted(ex.texts)
    again_fit, again_val = carve_validation(ex.take(np.arange(len(ex))[::-1]), 0.2, seed=13)  # row order does not matter
    assert sorted(again_val.texts) == sorted(val.texts) and sorted(again_fit.texts) == sorted(fit.texts)
    assert carve_validation(ex, 0.2, seed=14)[1].texts != val.texts  # the seed draws it
    # Every label of 20 gives some texts and keeps most; a label of 2 keeps both to train on.
    for lab in range(5):
        n_val = val.labels.count(f"lab{lab}")
        assert 1 <= n_val <= 9, (lab, n_val)
    assert fit.labels.count("rare") == 2 and "rare" not in val.labels
    assert carve_validation(ex, 0.0, seed=13) == (ex, None)


def test_validation_split_keeps_groups_and_split_column_values_whole():
    from embedft.data.examples import carve_validation

    grouped = Examples("grouped", "mem", np.arange(40) + 2, [r[0] for r in ROWS], groups=[r[1] for r in ROWS],
                       labels=[r[2] for r in ROWS])
    fit, val = carve_validation(grouped, 0.3, seed=13)
    assert val is not None and set(fit.groups).isdisjoint(val.groups)
    # Labeled offers with their product as data.split_column: a product is never on both sides.
    ex = replace(_labeled(), split_keys=[f"p{i // 4}" for i in range(100)])
    fit, val = carve_validation(ex, 0.3, seed=13)
    assert set(fit.split_keys).isdisjoint(val.split_keys) and len(val) % 4 == 0 and len(val) > 0


def test_validation_split_of_small_data_takes_one_unit_or_says_how_to_fix_it():
    from embedft.data.examples import carve_validation

    fit, val = carve_validation(_labeled(n_labels=2, per=5), 0.001, seed=13)  # 0.1% of 10 texts: still one
    assert len(val) == 1 and len(fit) == 9
    with pytest.raises(DataError, match=r"train.val_fraction=0.5 carves no text .*raise it.*train.val_fraction=0"):
        carve_validation(_labeled(n_labels=3, per=2), 0.5, seed=13)  # every label needs both texts to train on


def test_split_column_splits_labeled_data_by_product(tmp_path):
    # Labeled offers (text, category) with a product column: modulo on the product, as PriceRunner's benchmark split.
    rows = [(f"offer {p} {j}", str(p), f"cat{p % 3}") for p in range(30) for j in range(3)]
    p = write_csv(tmp_path / "offers.csv", rows, header=("text", "product", "label"))
    cfg = DataConfig(train=str(p), shape="labeled", split="modulo", split_column="product", split_modulo=5)
    train, eval_, _ = load_splits(cfg)
    assert {int(k) % 5 for k in eval_.split_keys} == {0} and all(int(k) % 5 for k in train.split_keys)
    assert len(eval_) == 6 * 3 and train.labels == train.groups  # still labeled: positives are categories
    with pytest.raises(DataError, match=r"data.split=modulo needs grouped data with integer group ids, or integer "
                                        r"ids in data.split_column"):
        load_splits(replace(cfg, split_column=None))


def test_mining_options_that_cannot_apply_are_warned_about(tmp_path, caplog):
    """loss.mine_* do nothing with given negative columns or without loss.hard_negatives: a warning says so."""
    from embedft.config import LossConfig
    from embedft.recipes.common import prepare_data

    header = ("query", "positive", "negative")
    rows = [(f"q{i}", f"p{i}", f"n{i}") for i in range(8)]
    train = write_csv(tmp_path / "t.csv", rows, header=header)
    ev = write_csv(tmp_path / "e.csv", [("eq", "ep", "en")], header=header)
    pairs = ExperimentConfig(data=given(train, ev, shape="pairs", negative_columns=("negative",)),
                             train=TrainConfig(batch_size=4, **NO_VAL), loss=LossConfig(hard_negatives=1))
    with caplog.at_level("WARNING"):
        prepare_data(pairs)
    assert "mine" not in caplog.text  # defaults: nothing to say
    with caplog.at_level("WARNING"):
        prepare_data(replace(pairs, loss=LossConfig(hard_negatives=1, mine_every=5, mine_range_min=2)))
    assert "loss.mine_every, loss.mine_range_min set, but" in caplog.text and "negative columns" in caplog.text
    caplog.clear()
    grouped_rows = write_csv(tmp_path / "g.csv", ROWS)
    grouped = ExperimentConfig(data=given(grouped_rows, _eval_file(tmp_path), shape="grouped"),
                               train=TrainConfig(batch_size=4, **NO_VAL), loss=LossConfig(mine_relative_margin=0.1))
    with caplog.at_level("WARNING"):
        prepare_data(grouped)
    assert "loss.mine_relative_margin set, but loss.hard_negatives=0: nothing is mined" in caplog.text
