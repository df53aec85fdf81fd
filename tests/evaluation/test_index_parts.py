"""An index built from parts (on-disk shards, several processes) is the index built at once."""

import json
import warnings

import faiss
import numpy as np
import pytest

from embedft.evaluation.index import (ListParts, build_index, build_index_in_parts, index_part, load_index, merge_parts,
                                      mergeable, new_index, save_index, train_rows, train_size, trained_index)


def _vectors(n: int = 700, dim: int = 16) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _bytes(index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def _parts(x: np.ndarray, size: int) -> list[np.ndarray]:
    return [x[i:i + size] for i in range(0, len(x), size)]


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat", "IVF8,PQ4x4"])
def test_parts_added_in_order_or_merged_give_the_index_built_at_once(factory):
    x = _vectors()
    n, dim = x.shape
    m = train_size(new_index(dim, factory, n), n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few training points per list: the same warning on each side
        whole = build_index(x, factory, use_gpu=False)
        parts = build_index_in_parts(dim, factory, n, x[train_rows(n, m)] if m else None, _parts(x, 170))
        assert _bytes(parts) == _bytes(whole)
        if mergeable(whole):
            trained = trained_index(dim, factory, n, x[train_rows(n, m)])
            filled = [index_part(trained, p, start) for start, p in zip(range(0, n, 170), _parts(x, 170))]
            assert _bytes(merge_parts(trained, filled, n)) == _bytes(whole)
    assert mergeable(whole) == factory.startswith("IVF")


def test_a_small_corpus_trains_on_every_row_and_missing_rows_are_refused():
    x = _vectors(3000)
    index = new_index(16, "IVF4,Flat", 3000)
    m = train_size(index, 3000)
    assert m == 3000  # 65,536 at least: every row, the index build_index trains on all vectors
    sampled = build_index(x, "IVF4,Flat", use_gpu=False, train=x[train_rows(3000, 500)])
    with pytest.raises(ValueError, match="the parts hold 599 vectors, not the 700 expected"):
        build_index_in_parts(16, "Flat", 700, None, [x[:599]])
    with pytest.raises(ValueError, match="the parts hold more than the 5 vectors expected"):
        build_index_in_parts(16, "Flat", 5, None, [x[:3], x[3:6]])
    assert sampled.ntotal == 3000


def test_ids_and_labels_in_parts_are_written_as_one_json_list(tmp_path):
    x = _vectors(7)
    ids = [f"d{i}" for i in range(7)]
    labels = ["a", "é", "b", "c", "d", "e", "f"]
    manifest = {"model": "m", "dim": 16}
    save_index(tmp_path / "whole", build_index(x, use_gpu=False), ids, manifest, labels=labels)
    in_parts = ListParts(7, lambda: iter([ids[:3], [], ids[3:]]))
    save_index(tmp_path / "parts", build_index(x, use_gpu=False), in_parts, manifest,
               labels=ListParts(7, lambda: iter([labels[:1], labels[1:]])))
    for name in ("ids.json", "labels.json"):
        assert (tmp_path / "parts" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert json.loads((tmp_path / "parts" / "labels.json").read_text()) == labels
    assert load_index(tmp_path / "parts")[1] == ids
    with pytest.raises(ValueError, match="got 6 ids for an index of 7 vectors"):
        save_index(tmp_path / "short", build_index(x, use_gpu=False), ListParts(6, lambda: [ids[:6]]), manifest)
