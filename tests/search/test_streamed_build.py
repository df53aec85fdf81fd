"""`index build` streamed through on-disk shards: the in-memory build's index, resumable, shared by torchrun ranks."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import REPO

from embedft.cli import main

WORDS = "apple sony bosch intel canon phone camera washer chip black white silver 4k smart pro max mini".split()


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A tiny random BERT as a sentence-transformers folder (what `index build --model` takes)."""
    from embedft_testing.synthetic import save_as_sentence_transformer, tiny_bert

    return save_as_sentence_transformer(tiny_bert(tmp_path_factory.mktemp("export")))


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, 1 + i % 4)) for i in range(n)]  # short texts, some repeated


def _corpus(path: Path, n: int = 200) -> Path:
    texts = _texts(n)
    rows = pd.DataFrame({"id": [f"d{i}" for i in range(n)], "text": texts, "kind": [t.split()[0] for t in texts]})
    if path.suffix == ".parquet":
        rows.to_parquet(path, row_group_size=33)
    elif path.suffix == ".jsonl":
        rows.to_json(path, orient="records", lines=True)
    else:
        rows.to_csv(path, index=False)
    return path


def _build(export: Path, corpus: Path, out: Path, *options: str):
    return CliRunner().invoke(main, ["index", "build", "--model", str(export), "--corpus", str(corpus),
                                     "--label-column", "kind", "--out", str(out), "--no-progress", *options])


def _vectors(folder: Path) -> np.ndarray:
    index = faiss.read_index(str(folder / "index.faiss"))
    if isinstance(faiss.downcast_index(index), faiss.IndexIVF):
        faiss.extract_index_ivf(index).make_direct_map()
    return index.reconstruct_n(0, index.ntotal)


def assert_same_index(a: Path, b: Path) -> None:
    """The same ids, labels, manifest (but its time) and vectors; the same hits for every query."""
    from embedft.search.indexing import open_index

    for name in ("ids.json", "labels.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = (json.loads((f / "manifest.json").read_text()) for f in (a, b))
    assert {k: v for k, v in ma.items() if k != "created_at"} == {k: v for k, v in mb.items() if k != "created_at"}
    va, vb = _vectors(a), _vectors(b)
    np.testing.assert_allclose(va, vb, atol=1e-6)
    ia, ib = open_index(a).index, open_index(b).index
    assert (ia.search(va[:20], 5)[1] == ib.search(va[:20], 5)[1]).all()


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
def test_a_streamed_build_is_the_in_memory_build(export, tmp_path, factory):
    corpus = _corpus(tmp_path / "c.csv")
    assert _build(export, corpus, tmp_path / "whole", "--index", factory).exit_code == 0  # 200 rows: read whole
    res = _build(export, corpus, tmp_path / "streamed", "--index", factory, "--chunk-rows", "30")
    assert res.exit_code == 0 and "index " + str(tmp_path / "streamed") + ": 200 vectors" in res.output, res.output
    assert_same_index(tmp_path / "whole", tmp_path / "streamed")
    assert sorted(os.listdir(tmp_path)) == ["c.csv", "streamed", "whole"]  # the shards are gone


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_jsonl_and_parquet_corpora_stream_too(export, tmp_path, suffix):
    corpus = _corpus(tmp_path / f"c{suffix}", 90)
    assert _build(export, corpus, tmp_path / "whole", "--chunk-rows", "0").exit_code == 0
    assert _build(export, corpus, tmp_path / "streamed", "--chunk-rows", "20").exit_code == 0
    assert_same_index(tmp_path / "whole", tmp_path / "streamed")


def test_a_corpus_of_more_rows_than_a_chunk_is_streamed_by_default(export, tmp_path, monkeypatch):
    from embedft.search import sharded

    monkeypatch.setattr(sharded, "CHUNK_ROWS", 50)
    embedded = []
    real = sharded.ShardedBuild._save_vectors
    monkeypatch.setattr(sharded.ShardedBuild, "_save_vectors", lambda self, k, v: embedded.append(k) or real(self, k, v))
    assert _build(export, _corpus(tmp_path / "small.csv", 49), tmp_path / "a").exit_code == 0
    assert embedded == []  # 50 lines with the header: read whole
    assert _build(export, _corpus(tmp_path / "c.csv", 120), tmp_path / "b").exit_code == 0
    assert embedded == [0, 1, 2]


def test_a_killed_build_continues_from_its_last_finished_shard(export, tmp_path, monkeypatch):
    from embedft.search import indexing, sharded

    corpus = _corpus(tmp_path / "c.csv")
    assert _build(export, corpus, tmp_path / "uninterrupted", "--chunk-rows", "30").exit_code == 0
    out = tmp_path / "idx"
    real_save = sharded.ShardedBuild._save_vectors

    def killed_after_shard_2(self, k, vectors):
        if k == 3:
            raise RuntimeError("killed")  # as a kill leaves it: shards 0-2 written, nothing after
        real_save(self, k, vectors)

    monkeypatch.setattr(sharded.ShardedBuild, "_save_vectors", killed_after_shard_2)
    res = _build(export, corpus, out, "--chunk-rows", "30")
    assert res.exit_code != 0 and not out.exists()
    work = sharded.work_dir(out)
    assert sorted(p.name for p in work.glob("vec-*")) == ["vec-00000.npy", "vec-00001.npy", "vec-00002.npy"]
    monkeypatch.undo()

    embedded = []
    real_encode = indexing.encode
    monkeypatch.setattr(indexing, "encode", lambda st, texts, **k: embedded.extend(texts) or real_encode(st, texts, **k))
    res = _build(export, corpus, out, "--chunk-rows", "30")
    assert res.exit_code == 0, res.output
    assert embedded == _texts(200)[90:]  # shards 3-6 only
    assert_same_index(tmp_path / "uninterrupted", out)
    assert not work.exists()


def test_a_build_killed_while_saving_embeds_nothing_again_and_another_corpus_starts_afresh(export, tmp_path,
                                                                                          monkeypatch, caplog):
    from embedft.search import indexing, sharded

    corpus, out = _corpus(tmp_path / "c.csv"), tmp_path / "idx"
    monkeypatch.setattr(indexing, "_save", lambda *a: (_ for _ in ()).throw(RuntimeError("killed")))
    assert _build(export, corpus, out, "--chunk-rows", "50").exit_code != 0
    monkeypatch.undo()
    embedded = []
    monkeypatch.setattr(indexing, "encode", lambda st, texts, **k: embedded.append(texts) or pytest.fail("embedded"))
    assert _build(export, corpus, out, "--chunk-rows", "50").exit_code == 0 and embedded == []
    assert "resuming an unfinished build: 4 of 4 shards embedded" in caplog.text
    monkeypatch.undo()

    # A killed build of a corpus that changed since: its shards are not this corpus's.
    monkeypatch.setattr(indexing, "_save", lambda *a: (_ for _ in ()).throw(RuntimeError("killed")))
    assert _build(export, corpus, out, "--chunk-rows", "50", "--overwrite").exit_code != 0
    monkeypatch.undo()
    _corpus(corpus, 120)
    res = _build(export, corpus, out, "--chunk-rows", "50", "--overwrite")
    assert res.exit_code == 0 and "120 vectors" in res.output, res.output
    assert "an unfinished build of another corpus, model or chunk size is there (it differs in: mtime_ns, size); " \
           "starting afresh" in caplog.text
    assert not sharded.work_dir(out).exists()


def test_bad_rows_are_refused_before_the_model_loads_with_the_file_and_row(export, tmp_path, monkeypatch):
    import sentence_transformers

    from embedft.search import indexing, sharded

    corpus = tmp_path / "c.csv"
    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", lambda *a, **k: pytest.fail("model loaded"))
    corpus.write_text("id,text,kind\n" + "".join(f"d{i},t {i},a\n" for i in range(70)) + "d70,,a\n")
    res = _build(export, corpus, tmp_path / "idx", "--chunk-rows", "30")
    assert res.exit_code == 2 and f"error: {corpus}: no 'text' value at rows 72 (empty, or NA" in res.output
    corpus.write_text("id,text,kind\n" + "".join(f"d{i % 40},t {i},a\n" for i in range(70)))
    res = _build(export, corpus, tmp_path / "idx", "--chunk-rows", "30")
    assert res.exit_code == 2 and "duplicate ids in column 'id': ['d0', 'd1', 'd10'" in res.output
    assert not sharded.work_dir(tmp_path / "idx").exists() and not (tmp_path / "idx").exists()
    monkeypatch.undo()
    monkeypatch.setattr(indexing, "encode", lambda *a, **k: pytest.fail("embedded"))
    res = _build(export, _corpus(corpus, 70), tmp_path / "idx", "--chunk-rows", "30", "--index", "IVF512,Flat")
    assert res.exit_code == 2 and "--index IVF512,Flat: factory 'IVF512,Flat' needs at least 512 training vectors" \
        in res.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # 2 processes start torch and sentence-transformers: ~15-25 s on 2 cores
def test_two_gloo_processes_build_the_single_process_index(export, tmp_path):
    # torchrun's 2 CPU processes: one shard each (101 and 99 rows), their IVF parts merged by rank 0.
    corpus = _corpus(tmp_path / "c.csv")
    assert _build(export, corpus, tmp_path / "one", "--index", "IVF4,Flat").exit_code == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "embedft", "index", "build", "--model", str(export),
           "--corpus", str(corpus), "--label-column", "kind", "--index", "IVF4,Flat", "--out", str(tmp_path / "two"),
           "--no-progress"]
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("200 vectors") == 1  # rank 0 speaks
    assert res.stderr.count("2 processes joined the process group (gloo)") == 1  # rank 0 speaks for both
    assert_same_index(tmp_path / "one", tmp_path / "two")
    assert sorted(os.listdir(tmp_path)) == ["c.csv", "one", "two"]


def test_a_second_build_of_one_out_while_the_first_runs_is_refused_naming_it(export, tmp_path, monkeypatch):
    """It would embed the first one's shards again, or remove them (another corpus) under it."""
    from embedft.atomic import holding
    from embedft.search import indexing, sharded

    corpus, out = _corpus(tmp_path / "c.csv"), tmp_path / "idx"
    second = []
    real_encode = indexing.encode

    def first_build_embeds(st, texts, **k):  # meanwhile, the same command in another terminal
        if not second:
            second.append(_build(export, corpus, out, "--chunk-rows", "50"))
        return real_encode(st, texts, **k)

    monkeypatch.setattr(indexing, "encode", first_build_embeds)
    res = _build(export, corpus, out, "--chunk-rows", "50")
    assert res.exit_code == 0 and "200 vectors" in res.output, res.output
    refused = second[0].output
    assert second[0].exit_code == 2 and f"error: {out} is in use by another embedft index build: process " \
        f"{os.getpid()} on " in refused and "Wait for it to end, or build into another --out" in refused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv", "idx"]  # no work folder, no lock left
    with holding(out, "embedft index build", "x", sharded.work_lock(out)):  # the lock is free again
        pass
