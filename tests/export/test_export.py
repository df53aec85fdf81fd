"""Merged export: a plain sentence-transformers load matches the adapter model; errors are clear."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from embedft.cli import main
from embedft.config import ExportConfig, LoraConfig, ModelConfig
from embedft.errors import ExportError, ModelError
from embedft.export.fingerprint import weights_digest
from embedft.export.merge import export_merged
from embedft.export.verify import verify_export
from embedft.modeling.encoder import load_encoder
from embedft.modeling.lora import apply_lora, load_adapter, save_adapter

PROBES = ["apple iphone 8 plus 64gb silver", "tv", "bosch serie 6 washing machine 9kg 1400 rpm white",
          "How do I reset my password?", "a", "£499.99 – 20% off!!!", "Смартфон с хорошей камерой",
          " ".join(["long text that is truncated at max length"] * 60)]

# Runs in a fresh interpreter (-I: no PYTHONPATH, no cwd on sys.path) where embedft and peft
# cannot be imported: None in sys.modules makes both `import` and find_spec report them absent.
PLAIN_LOAD = r"""
import json, sys
sys.modules["embedft"] = None
sys.modules["peft"] = None
import numpy as np
from sentence_transformers import SentenceTransformer
out = {}
for name, path in json.loads(sys.argv[1]).items():
    model = SentenceTransformer(path, device="cpu")
    texts = json.load(open(path + "/probes.json"))
    np.save(f"{name}-docs.npy", model.encode(texts, normalize_embeddings=False))
    np.save(f"{name}-queries.npy", model.encode(texts, prompt_name="query", normalize_embeddings=False))
    tok = model.tokenizer
    out[name] = {"padding_side": tok.padding_side, "ids": tok(["tv", "apple tv"])["input_ids"],
                 "eos": tok.eos_token_id, "pooling": model[1].pooling_mode}
try:
    import embedft
    out["embedft_importable"] = True
except ImportError:
    out["embedft_importable"] = False
out["peft_loaded"] = sys.modules.get("peft") is not None
print(json.dumps(out))
"""


def make_adapter(model_dir: Path, out: Path, zero: bool = False, targets: str = "qkv") -> Path:
    """A saved LoRA adapter whose lora_B is random (so it changes the model) or all zero."""
    torch.manual_seed(0)
    enc = apply_lora(load_encoder(ModelConfig(name=str(model_dir))), LoraConfig(r=4, targets=targets))
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if "lora_B" in n:
                p.zero_() if zero else p.normal_(0, 0.1)
    return save_adapter(enc, out, {"data": {"train_digest": "abc123", "train_rows": 10}})


def adapter_embeddings(model_dir: Path, adapter: Path) -> np.ndarray:
    """(2, N, D): the unmerged adapter model's documents and queries."""
    enc = load_adapter(load_encoder(ModelConfig(name=str(model_dir))), adapter)
    return np.stack([enc.encode(PROBES), enc.encode(PROBES, is_query=True)])


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_bert_dir, tiny_qwen3_dir) -> dict:
    """family -> (model dir, adapter dir, fp32 export dir, export report)."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for fam, model_dir in (("bert", tiny_bert_dir), ("qwen3", tiny_qwen3_dir)):
        adapter = make_adapter(model_dir, root / fam / "adapter")
        (root / fam / "eval").mkdir()
        (root / fam / "eval" / "report.md").write_text("# Evaluation\n\n| metric | base | adapted |\n|---|---|---|\n"
                                                     "| retrieval/recall@10 | 0.5000 | 0.7500 |\n")
        report = export_merged(adapter, root / fam / "export", probe_texts=PROBES)
        out[fam] = (model_dir, adapter, root / fam / "export", report)
    return out


def test_plain_load_without_embedft_or_peft_matches_adapter(exports, tmp_path):
    paths = {fam: str(v[2]) for fam, v in exports.items()}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, "-I", "-c", PLAIN_LOAD, json.dumps(paths)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["embedft_importable"] is False and info["peft_loaded"] is False
    for fam, (model_dir, adapter, export_dir, report) in exports.items():
        ref = adapter_embeddings(model_dir, adapter)
        docs, queries = np.load(tmp_path / f"{fam}-docs.npy"), np.load(tmp_path / f"{fam}-queries.npy")
        assert np.abs(docs - ref[0]).max() <= 1e-5, fam
        assert np.abs(queries - ref[1]).max() <= 1e-5, fam
        assert report["parity"]["ok"] and report["parity"]["max_abs_diff"] <= 1e-5
        # The adapter really changed the model, so the parity above is not the base matching itself.
        assert report["adapter_vs_base_max_abs_diff"] > 1e-3
    q = info["qwen3"]
    assert q["pooling"] == "lasttoken" and q["padding_side"] == "left"
    assert all(ids[-1] == q["eos"] and ids.count(q["eos"]) == 1 for ids in q["ids"])
    assert info["bert"]["pooling"] == "mean" and info["bert"]["padding_side"] == "right"


@pytest.mark.parametrize("fam", ["bert", "qwen3"])
def test_an_adapter_on_every_block_layer_merges_with_parity(fam, tiny_bert_dir, tiny_qwen3_dir, tmp_path):
    model_dir = tiny_bert_dir if fam == "bert" else tiny_qwen3_dir
    adapter = make_adapter(model_dir, tmp_path / "adapter", targets="all")
    assert "intermediate.dense" in json.loads((adapter / "adapter_config.json").read_text())["target_modules"] \
        or fam != "bert"
    report = export_merged(adapter, tmp_path / "export", probe_texts=PROBES)
    assert report["parity"]["ok"] and report["parity"]["max_abs_diff"] <= 1e-5
    assert report["adapter_vs_base_max_abs_diff"] > 1e-3
    assert verify_export(tmp_path / "export")["ok"]


def test_export_folder_contents(exports):
    _, _, qdir, _ = exports["qwen3"]
    assert json.loads((qdir / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "lasttoken"
    assert json.loads((qdir / "tokenizer_config.json").read_text())["padding_side"] == "left"
    st_cfg = json.loads((qdir / "config_sentence_transformers.json").read_text())
    assert st_cfg["default_prompt_name"] is None and st_cfg["prompts"]["document"] == ""
    assert st_cfg["prompts"]["query"] == "Instruct: Given a query, retrieve relevant passages that answer the query\nQuery:"
    assert np.load(qdir / "probe_embeddings.npy").shape == (2, len(PROBES), 32)
    assert json.loads((qdir / "probes.json").read_text()) == PROBES
    meta = json.loads((qdir / "embedft_export.json").read_text())
    assert meta["dtype"] == "fp32" and meta["spec"]["pooling"] == "lasttoken" and meta["adapter"]["lora"]["r"] == 4
    card = (qdir / "README.md").read_text()
    assert 'prompt_name="query"' in card and "r=4" in card and "abc123" in card and "q_proj" in card
    assert "| retrieval/recall@10 | 0.5000 | 0.7500 |" in card  # the run's evaluation table
    # Readable by whoever the umask lets read (safetensors itself writes 0600).
    mask = os.umask(0)
    os.umask(mask)
    assert {oct(stat.S_IMODE(f.stat().st_mode)) for f in qdir.rglob("*") if f.is_file()} == {oct(0o666 & ~mask)}


def test_zero_adapter_is_reported(tiny_bert_dir, tmp_path):
    adapter = make_adapter(tiny_bert_dir, tmp_path / "adapter", zero=True)
    with pytest.raises(ExportError, match="no effect") as e:
        export_merged(adapter, tmp_path / "export", probe_texts=PROBES)
    assert "delta W" in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_verify_passes_then_fails_after_a_weight_changes(exports, tmp_path):
    from safetensors.torch import load_file, save_file

    d = shutil.copytree(exports["bert"][2], tmp_path / "export")
    parity = verify_export(d)
    assert parity["ok"] and parity["max_abs_diff"] <= 1e-5
    weights = load_file(d / "model.safetensors")
    name = next(k for k in weights if k.endswith("attention.self.query.weight"))
    weights[name] = weights[name] + 0.2 * torch.randn_like(weights[name])
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"min cosine 0\.\d+ \(need >= 0.99999\), max abs diff"):
        verify_export(d)
    res = CliRunner().invoke(main, ["verify", str(d)])
    assert res.exit_code == 1 and "max abs diff" in res.output
    # Tolerances given on the command line replace the saved ones (any two unit vectors are within 2).
    loose = verify_export(d, min_cosine=0.5, max_abs_diff=2.0)
    assert loose["ok"] and loose["tolerances"] == {"min_cosine": 0.5, "max_abs_diff": 2.0}
    assert 0.5 <= loose["min_cosine"] < 0.99999
    res = CliRunner().invoke(main, ["verify", str(d), "--min-cosine", "0.5", "--max-abs-diff", "2"])
    assert res.exit_code == 0, res.output
    # A tolerance that would pass anything (cosine -1) is refused, not applied.
    res = CliRunner().invoke(main, ["verify", str(d), "--min-cosine", "-1"])
    assert res.exit_code == 2 and "Invalid value for '--min-cosine'" in res.output
    res = CliRunner().invoke(main, ["verify", str(d), "--max-abs-diff", "-0.1"])
    assert res.exit_code == 2 and "Invalid value for '--max-abs-diff'" in res.output
    with pytest.raises(ExportError, match="model.safetensors is a file, not an export folder"):
        verify_export(d / "model.safetensors")
    with pytest.raises(ExportError, match="nope does not exist; pass the folder `embedft export --out` wrote"):
        verify_export(tmp_path / "nope")


@pytest.mark.parametrize("damage", ["truncated weights", "no weights", "probes.json", "probe_embeddings.npy",
                                    "embedft_export.json"])
def test_verify_of_a_damaged_export_names_the_damage(exports, tmp_path, damage):
    d = shutil.copytree(exports["bert"][2], tmp_path / "export")
    weights = d / "model.safetensors"
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "no weights":
        weights.unlink()
    else:
        (d / damage).write_bytes(b"{")
    want = f"{d / damage} cannot be read (" if "." in damage else f"{d} cannot be loaded by sentence-transformers"
    res = CliRunner().invoke(main, ["verify", str(d)])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert res.output.startswith(f"FAIL: {want}") and "copy it again or re-export" in res.output, res.output


def test_existing_out_refused_failed_export_leaves_no_tmp_overwrite_works(exports, tmp_path):
    adapter = exports["bert"][1]
    out = tmp_path / "out" / "export"
    out.mkdir(parents=True)
    (out / "old.txt").write_text("previous export")
    res = CliRunner().invoke(main, ["export", "--adapter", str(adapter), "--out", str(out)])
    assert res.exit_code == 2 and "--overwrite" in res.output
    # A parity failure (impossible tolerance) keeps the old folder and leaves no temporary folder.
    with pytest.raises(ExportError, match="parity check failed.*max abs diff"):
        export_merged(adapter, out, overwrite=True, probe_texts=PROBES, cfg=ExportConfig(max_abs_diff=0.0))
    assert os.listdir(out.parent) == ["export"] and (out / "old.txt").is_file()
    res = CliRunner().invoke(main, ["export", "--adapter", str(adapter), "--out", str(out), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert "min cosine" in res.output
    assert not (out / "old.txt").exists() and (out / "modules.json").is_file()
    assert os.listdir(out.parent) == ["export"]


def test_export_uses_the_tolerances_of_the_experiment_the_adapter_was_trained_with(exports, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(exports["bert"][1], adapter)
    meta_file = adapter / "embedft_meta.json"
    meta = json.loads(meta_file.read_text())

    def export_with(settings: dict):
        meta_file.write_text(json.dumps({**meta, "config": {"name": "x", "export": settings}}))
        return CliRunner().invoke(main, ["export", "--adapter", str(adapter), "--out", str(tmp_path / "out")])

    res = export_with({"max_abs_diff": 0.0})  # no fp32 merge is exact to the bit: the run's setting is applied
    assert res.exit_code == 2 and "parity check failed" in res.output and not (tmp_path / "out").exists()
    res = export_with({"min_cosine": 2})
    assert res.exit_code == 2 and "embedft_meta.json: the run's export settings are invalid" in res.output
    assert "export.min_cosine: a cosine similarity, must be in (0, 1], got 2" in res.output
    res = export_with({"n_probe": 8, "max_abs_diff": 1e-4})
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "out" / "embedft_export.json").read_text())
    assert saved["n_probes"] == 8 and saved["tolerances"]["max_abs_diff"] == 1e-4


def test_an_export_written_meanwhile_is_not_replaced_without_overwrite(exports, tmp_path, monkeypatch):
    import embedft.export.merge as E

    out = tmp_path / "out" / "export"
    parity = E._parity

    def another_export_lands(*a, **k):  # a second `embedft export --out` of the same folder finishes first
        out.mkdir(parents=True, exist_ok=True)
        (out / "modules.json").write_text("the other export")
        return parity(*a, **k)

    monkeypatch.setattr(E, "_parity", another_export_lands)
    with pytest.raises(ExportError, match="export folder .* appeared while this export ran.*pass --overwrite"):
        export_merged(exports["bert"][1], out, probe_texts=PROBES)
    assert (out / "modules.json").read_text() == "the other export" and os.listdir(out.parent) == ["export"]
    monkeypatch.undo()
    shutil.rmtree(out)
    out.mkdir()  # an empty folder (made by hand, or left by a tool) still takes the export
    assert export_merged(exports["bert"][1], out, probe_texts=PROBES)["parity"]["ok"]
    assert (out / "probes.json").is_file() and os.listdir(out.parent) == ["export"]


def test_wrong_base_missing_file_corrupted_weights(exports, tiny_qwen3_dir, tmp_path):
    adapter = exports["bert"][1]
    with pytest.raises(ModelError, match="trained on base model") as e:
        export_merged(adapter, tmp_path / "a", model_name=str(tiny_qwen3_dir))
    assert str(tiny_qwen3_dir) in str(e.value)
    broken = shutil.copytree(adapter, tmp_path / "broken")
    (broken / "adapter_config.json").unlink()
    with pytest.raises(ModelError, match="missing adapter_config.json"):
        export_merged(broken, tmp_path / "b")
    corrupt = shutil.copytree(adapter, tmp_path / "corrupt")
    f = corrupt / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ExportError, match="adapter_model.safetensors is corrupted or truncated"):
        export_merged(corrupt, tmp_path / "c")
    for name, text in (("adapter_config.json", '{"r": 4,'), ("embedft_meta.json", "[1, 2]")):
        damaged = shutil.copytree(adapter, tmp_path / f"damaged-{name}")
        (damaged / name).write_text(text)
        with pytest.raises(ModelError, match=f"{name} (is not valid JSON|holds a JSON list).*copy it again"):
            export_merged(damaged, tmp_path / "d")
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_non_prefix_query_template_and_missing_onnx_are_clear(exports, tmp_path, monkeypatch):
    import importlib.util

    adapter = shutil.copytree(exports["qwen3"][1], tmp_path / "adapter")
    meta = json.loads((adapter / "embedft_meta.json").read_text())
    meta["spec"]["query_template"] = "{text} (a query)"
    (adapter / "embedft_meta.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="not a prefix"):
        export_merged(adapter, tmp_path / "out")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a))
    with pytest.raises(ExportError, match=r"--onnx needs onnxruntime \(not installed\): pip install onnxruntime"):
        export_merged(exports["qwen3"][1], tmp_path / "out2", onnx=True)
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("fam", ["bert", "qwen3"])
def test_onnx_export_runs_in_onnxruntime_like_the_adapter(exports, fam, tmp_path):
    """onnx/model.onnx, fed by the export's tokenizer, gives the adapter model's vectors; verify re-checks it."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    from sentence_transformers import SentenceTransformer

    model_dir, adapter, _, _ = exports[fam]
    report = export_merged(adapter, tmp_path / "onnx-export", probe_texts=PROBES, onnx=True)
    assert report["onnx"]["ok"] and report["onnx"]["max_abs_diff"] <= 1e-4
    ref = adapter_embeddings(model_dir, adapter)
    st = SentenceTransformer(str(tmp_path / "onnx-export"), device="cpu")
    session = ort.InferenceSession(str(tmp_path / "onnx-export" / "onnx" / "model.onnx"))
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    # A batch of other sizes than the traced one: batch and sequence axes are dynamic.
    for texts, want, prompt in ((PROBES, ref[0], ""), (PROBES[:3], ref[1][:3], st.prompts["query"])):
        f = st.tokenize([prompt + t for t in texts])
        hidden, emb = session.run(None, {"input_ids": f["input_ids"].numpy(), "attention_mask": f["attention_mask"].numpy()})
        assert hidden.shape[:2] == tuple(f["input_ids"].shape) and np.abs(emb - want).max() <= 1e-4
    checked = verify_export(tmp_path / "onnx-export")
    assert checked["onnx"]["ok"] and checked["onnx"]["max_abs_diff"] <= 1e-4
    from click.testing import CliRunner

    from embedft.cli import main

    result = CliRunner().invoke(main, ["verify", str(tmp_path / "onnx-export")])
    assert result.exit_code == 0 and "OK: onnx/model.onnx (onnxruntime): min cosine" in result.output
    # A damaged graph is a FAIL naming the file, not an onnxruntime traceback.
    onnx_file = tmp_path / "onnx-export" / "onnx" / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:1000])
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "onnx-export")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"FAIL: {onnx_file} cannot be run by onnxruntime" in result.stderr


def test_onnx_export_failure_names_the_architecture_and_leaves_nothing(exports, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")

    def refuse(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::fancy_attention' to ONNX opset 17 is not supported")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    with pytest.raises(ExportError, match=r"model type 'qwen3' \(decoder family\).*aten::fancy_attention.*without --onnx"):
        export_merged(exports["qwen3"][1], tmp_path / "out", onnx=True)
    assert list(tmp_path.iterdir()) == []


def test_bf16_export_parity_against_looser_tolerance(exports, tmp_path):
    from safetensors import safe_open

    _, adapter, _, _ = exports["qwen3"]
    report = export_merged(adapter, tmp_path / "bf16", dtype="bf16", probe_texts=PROBES)
    assert report["tolerances"] == {"min_cosine": 0.99, "max_abs_diff": 2e-2}
    p = report["parity"]
    assert p["ok"] and p["min_cosine"] >= 0.99 and 0 < p["max_abs_diff"] <= 2e-2
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    saved = json.loads((tmp_path / "bf16" / "embedft_export.json").read_text())
    assert saved["dtype"] == "bf16" and saved["parity"]["max_abs_diff"] == p["max_abs_diff"]
    assert verify_export(tmp_path / "bf16")["ok"]


def test_index_build_cli(exports, tmp_path):
    from sentence_transformers import SentenceTransformer

    from embedft.evaluation.index import load_index, search

    export_dir = exports["bert"][2]
    texts = [f"{w} product {i}" for i, w in enumerate(["apple", "sony", "bosch", "intel", "canon"] * 4)]
    corpus = tmp_path / "corpus.csv"
    corpus.write_text("doc_id,body\n" + "\n".join(f"d{i},{t}" for i, t in enumerate(texts)) + "\n")
    res = CliRunner().invoke(main, ["index", "build", "--model", str(export_dir), "--corpus", str(corpus),
                                    "--text-column", "body", "--id-column", "doc_id", "--index", "HNSW32",
                                    "--out", str(tmp_path / "idx")])
    assert res.exit_code == 0, res.output
    assert {p.name for p in (tmp_path / "idx").iterdir()} == {"index.faiss", "ids.json", "manifest.json"}
    index, ids, manifest = load_index(tmp_path / "idx", expected_model=weights_digest(export_dir), expected_dim=32)
    assert (manifest["count"], manifest["dim"], index.ntotal) == (20, 32, 20)
    assert manifest["metric"] == "inner_product" and manifest["normalized"] and manifest["factory"] == "HNSW32"
    assert manifest["id_column"] == "doc_id" and ids[:2] == ["d0", "d1"]
    q = SentenceTransformer(str(export_dir), device="cpu").encode([texts[7]], normalize_embeddings=True)
    scores, hits = search(index, q, 1)
    assert ids[hits[0, 0]] == "d7" and scores[0, 0] == pytest.approx(1.0, abs=1e-4)
    res = CliRunner().invoke(main, ["index", "build", "--model", str(export_dir), "--corpus", str(corpus),
                                    "--text-column", "nope", "--out", str(tmp_path / "idx2")])
    assert res.exit_code == 2 and "no column 'nope'" in res.output


def test_index_build_refuses_a_bad_index_or_out_before_embedding(exports, tmp_path, monkeypatch):
    from embedft.search import indexing as deploy

    corpus = tmp_path / "corpus.csv"
    corpus.write_text("id,text\n" + "".join(f"{i},{t}\n" for i, t in enumerate(SEARCH_DOCS)))
    embedded = []
    monkeypatch.setattr(deploy, "encode", lambda *a, **k: embedded.append(a) or pytest.fail("embedded"))

    def fails(out: Path, factory: str) -> str:
        res = CliRunner().invoke(main, ["index", "build", "--model", str(exports["bert"][2]), "--corpus", str(corpus),
                                        "--index", factory, "--out", str(out)])
        assert res.exit_code == 2 and not embedded, res.output
        return res.output

    assert "--index HNSW32y: faiss cannot parse index factory 'HNSW32y'" in fails(tmp_path / "i", "HNSW32y")
    assert "needs at least 64 training vectors (one per IVF list) but only N=20" in fails(tmp_path / "i", "IVF64,Flat")
    assert not (tmp_path / "i").exists()
    (tmp_path / "f").write_text("")
    assert "--out " + str(tmp_path / "f") + " is a file" in fails(tmp_path / "f", "Flat")


def test_index_batch_size_bounds_each_forward_call(exports, tmp_path, monkeypatch):
    from embedft.cli import BATCH_SIZE_HELP
    from embedft.modeling import chunking
    from embedft.search.indexing import ENCODE_BATCH_SIZE

    corpus = tmp_path / "corpus.csv"
    corpus.write_text("id,text\n" + "".join(f"{i},{t}\n" for i, t in enumerate(SEARCH_DOCS)))

    seen, real = [], chunking.forward_chunks
    monkeypatch.setattr(chunking, "forward_chunks", lambda lengths, bs, dev: seen.append(bs) or real(lengths, bs, dev))
    res = CliRunner().invoke(main, ["index", "build", "--model", str(exports["bert"][2]), "--corpus", str(corpus),
                                    "--batch-size", "3", "--out", str(tmp_path / "idx")])
    assert res.exit_code == 0 and seen == [3], res.output
    res = CliRunner().invoke(main, ["index", "search", str(tmp_path / "idx"), "sony camera", "--batch-size", "5"])
    assert res.exit_code == 0 and seen == [3, 5], res.output
    res = CliRunner().invoke(main, ["index", "search", str(tmp_path / "idx"), "sony camera"])
    assert res.exit_code == 0 and seen == [3, 5, ENCODE_BATCH_SIZE], res.output  # the default the help states
    assert BATCH_SIZE_HELP.endswith(f"Default: {ENCODE_BATCH_SIZE}.")
    res = CliRunner().invoke(main, ["index", "search", str(tmp_path / "idx"), "sony camera", "--batch-size", "0"])
    assert res.exit_code == 2 and "--batch-size" in res.output and len(seen) == 3


def test_index_device_is_checked_before_any_work(exports, tmp_path, monkeypatch):
    import inspect

    import torch

    from embedft.cli import DEVICE_HELP
    from embedft.search import indexing as deploy

    corpus = tmp_path / "corpus.csv"
    corpus.write_text("id,text\n" + "".join(f"{i},{t}\n" for i, t in enumerate(SEARCH_DOCS)))
    build = ["index", "build", "--model", str(exports["bert"][2]), "--corpus", str(corpus)]
    res = CliRunner().invoke(main, [*build, "--device", "gpu", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "--device gpu: unknown device; use --device auto" in res.output, res.output
    assert not (tmp_path / "bad").exists()
    res = CliRunner().invoke(main, [*build, "--device", "cpu", "--out", str(tmp_path / "idx")])
    assert res.exit_code == 0, res.output
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = CliRunner().invoke(main, ["index", "search", str(tmp_path / "idx"), "sony camera", "--device", "cuda"])
    assert res.exit_code == 2 and "--device cuda but no CUDA device is available; use --device auto" in res.output
    res = CliRunner().invoke(main, ["index", "search", str(tmp_path / "idx"), "sony camera", "--device", "cpu"])
    assert res.exit_code == 0 and "query 1: sony camera" in res.output, res.output
    for fn in (deploy.index_corpus, deploy.search_index):  # the default the help states
        assert DEVICE_HELP.endswith(f"Default: {inspect.signature(fn).parameters['device'].default}.")


SEARCH_PAIRS = [(w, t) for w in ("apple", "sony", "bosch", "intel", "canon") for t in ("phone", "camera", "washer", "chip")]
SEARCH_DOCS = [f"{w} {thing} {i}" for i, (w, thing) in enumerate(SEARCH_PAIRS)]


def _build(export_dir: Path, root: Path, *options: str) -> tuple[Path, Path]:
    corpus = root / "corpus.csv"
    corpus.write_text("doc_id,body,kind\n" + "".join(f"d{i},{t},{k}\n" for i, (t, (_, k))
                                                     in enumerate(zip(SEARCH_DOCS, SEARCH_PAIRS))))
    res = CliRunner().invoke(main, ["index", "build", "--model", str(export_dir), "--corpus", str(corpus),
                                    "--text-column", "body", "--id-column", "doc_id", "--out", str(root / "idx"),
                                    *options])
    assert res.exit_code == 0, res.output
    return corpus, root / "idx"


@pytest.mark.parametrize("fam", ["bert", "qwen3"])
def test_deploy_encode_gives_sentence_transformers_vectors_in_input_order(exports, fam, capsys):
    from sentence_transformers import SentenceTransformer

    from embedft.search import indexing as deploy

    st = SentenceTransformer(str(exports[fam][2]), device="cpu")
    texts = SEARCH_DOCS[:7] + ["x", SEARCH_DOCS[2], " ".join(SEARCH_DOCS[:6]), SEARCH_DOCS[0]]  # repeats, lengths
    for prompt_name, progress in ((None, False), ("query", True)):
        capsys.readouterr()
        got = deploy.encode(st, texts, prompt_name=prompt_name, batch_size=3, progress=progress)
        err = capsys.readouterr().err  # a bar over the distinct texts (9 of 11), on stderr only
        assert ("embed:" in err and "/9 " in err) if progress else err == "", err
        want = st.encode(texts, prompt_name=prompt_name, normalize_embeddings=True)
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert deploy.encode(st, [], batch_size=3).shape == (0, want.shape[1])


@pytest.mark.parametrize("fam", ["bert", "qwen3"])
def test_index_search_returns_what_plain_sentence_transformers_ranks(exports, tmp_path, fam):
    from sentence_transformers import SentenceTransformer

    export_dir = exports[fam][2]
    _, idx = _build(export_dir, tmp_path)
    queries = ["apple phone", "bosch washer 10", "a chip by intel"]
    res = CliRunner().invoke(main, ["index", "search", str(idx), *queries, "-k", "3", "--out", str(tmp_path / "r.jsonl")])
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]

    st = SentenceTransformer(str(export_dir), device="cpu")
    docs = st.encode(SEARCH_DOCS, normalize_embeddings=True)
    q = st.encode(queries, prompt_name="query", normalize_embeddings=True)
    expected = q @ docs.T  # (Q, N)
    for rec, qid, text, row in zip(records, ["1", "2", "3"], queries, expected):
        assert (rec["query_id"], rec["query"]) == (qid, text)
        top = np.argsort(-row)[:3]
        assert [h["id"] for h in rec["hits"]] == [f"d{i}" for i in top]
        assert [h["rank"] for h in rec["hits"]] == [1, 2, 3]
        np.testing.assert_allclose([h["score"] for h in rec["hits"]], row[top], atol=1e-5)
    if fam == "qwen3":  # the query prompt was applied: without it the scores differ
        plain = st.encode(queries, normalize_embeddings=True) @ docs.T
        assert st.prompts["query"] and np.abs(plain - expected).max() > 1e-3


def test_no_progress_silences_every_bar_for_logs(exports, tmp_path):
    from transformers.utils import logging as hf_logging

    _, idx = _build(exports["bert"][2], tmp_path)
    hf_logging.enable_progress_bar()  # an earlier --no-progress in this process turned them off
    try:
        res = CliRunner().invoke(main, ["index", "search", str(idx), "apple phone"])
        assert res.exit_code == 0 and "embed:" in res.stderr and "Loading weights" in res.stderr, res.output
        res = CliRunner().invoke(main, ["index", "search", str(idx), "apple phone", "--no-progress"])
        assert res.exit_code == 0 and res.stderr == "" and res.stdout.startswith("query 1: apple phone"), res.output
    finally:
        hf_logging.enable_progress_bar()


def test_index_search_tunes_the_ivf_lists_it_scans(exports, tmp_path):
    (tmp_path / "flat").mkdir()
    _, flat = _build(exports["bert"][2], tmp_path / "flat")
    with pytest.warns(UserWarning, match="clustering will be poor"):  # 20 documents in 4 lists
        _, ivf = _build(exports["bert"][2], tmp_path, "--index", "IVF4,Flat")

    def hits(idx: Path, *options: str) -> list[list[str]]:
        out = tmp_path / "r.jsonl"
        res = CliRunner().invoke(main, ["index", "search", str(idx), "apple phone", "intel chip 3", "-k", "10",
                                        "--out", str(out), *options])
        assert res.exit_code == 0, res.output
        return [[h["id"] for h in json.loads(line)["hits"]] for line in out.read_text().splitlines()]

    exact = hits(flat)
    assert hits(ivf, "--nprobe", "4") == exact  # every list scanned
    assert all(len(h) < 10 for h in hits(ivf, "--nprobe", "1"))  # one list of ~5 documents per query
    res = CliRunner().invoke(main, ["index", "search", str(ivf), "q", "--nprobe", "5"])
    assert res.exit_code == 2 and "--nprobe: nprobe must be between 1 and 4" in res.output
    res = CliRunner().invoke(main, ["index", "search", str(flat), "q", "--ef-search", "64"])
    assert res.exit_code == 2 and "--ef-search: efSearch is a knob of HNSW indexes; this index is IndexFlatIP " \
                                  "(built with --index Flat)" in res.output


def test_index_search_prints_hits_with_texts_and_reads_a_queries_file(exports, tmp_path):
    corpus, idx = _build(exports["bert"][2], tmp_path)
    res = CliRunner().invoke(main, ["index", "search", str(idx), SEARCH_DOCS[6], "-k", "2", "--show-text"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0] == f"query 1: {SEARCH_DOCS[6]}" and len(lines) == 3
    assert lines[1].split() == ["1", "1.0000", "d6", *SEARCH_DOCS[6].split()]  # a document finds itself first

    qfile = tmp_path / "queries.jsonl"
    qfile.write_text('{"qid": "q-a", "q": "canon camera"}\n{"qid": "q-b", "q": "sony phone"}\n')
    res = CliRunner().invoke(main, ["index", "search", str(idx), "--queries", str(qfile), "--id-column", "qid",
                                    "--text-column", "q", "-k", "1", "--out", str(tmp_path / "r.jsonl")])
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["query_id"], r["query"], len(r["hits"])) for r in records] == [("q-a", "canon camera", 1),
                                                                               ("q-b", "sony phone", 1)]


def test_index_search_classify_votes_over_the_hits_labels(exports, tmp_path):
    from sentence_transformers import SentenceTransformer

    from embedft.search.indexing import classify

    export_dir = exports["qwen3"][2]
    _, idx = _build(export_dir, tmp_path, "--label-column", "kind")
    queries = ["apple phone", "bosch washer 10", "a chip by intel", "camera", "sony"]
    res = CliRunner().invoke(main, ["index", "search", str(idx), *queries, "-k", "5", "--classify",
                                    "--out", str(tmp_path / "r.jsonl")])
    assert res.exit_code == 0, res.output
    got = [json.loads(line)["label"] for line in (tmp_path / "r.jsonl").read_text().splitlines()]

    st = SentenceTransformer(str(export_dir), device="cpu")
    sims = st.encode(queries, prompt_name="query", normalize_embeddings=True) @ \
        st.encode(SEARCH_DOCS, normalize_embeddings=True).T  # (Q, N)
    want = []
    for row in sims:
        votes: dict[str, float] = {}
        for j in np.argsort(-row)[:5]:
            votes[SEARCH_PAIRS[j][1]] = votes.get(SEARCH_PAIRS[j][1], 0.0) + float(row[j])
        want.append(max(votes, key=votes.get))
    assert got == want
    # Votes weigh by similarity (0.5 + 0.5 beat 0.9; 0.3 + 0.3 do not), a tie goes to the nearest, no hits: no label.
    label_of = {"a": "x", "b": "y", "c": "y"}
    assert classify([[("a", 0.9), ("b", 0.5), ("c", 0.5)], [("a", 0.9), ("b", 0.3), ("c", 0.3)],
                     [("b", 0.7), ("a", 0.7)], []], label_of) == ["y", "x", "y", None]
    (tmp_path / "nolabels").mkdir()
    _, idx = _build(export_dir, tmp_path / "nolabels")
    res = CliRunner().invoke(main, ["index", "search", str(idx), "q", "--classify"])
    assert res.exit_code == 2 and "holds no labels" in res.output


def test_index_build_and_search_read_headerless_csv_by_column_position(exports, tmp_path):
    corpus = tmp_path / "corpus.csv"  # like PriceRunner's file: no header row
    corpus.write_text("".join(f"{i},{t},x\n" for i, t in enumerate(SEARCH_DOCS, start=100)))
    res = CliRunner().invoke(main, ["index", "build", "--model", str(exports["bert"][2]), "--corpus", str(corpus),
                                    "--no-header", "--text-column", "1", "--id-column", "0", "--out", str(tmp_path / "i")])
    assert res.exit_code == 0, res.output
    queries = tmp_path / "q.tsv"
    queries.write_text(f"qa\t{SEARCH_DOCS[3]}\n")
    res = CliRunner().invoke(main, ["index", "search", str(tmp_path / "i"), "--queries", str(queries), "--no-header",
                                    "--text-column", "1", "--id-column", "0", "-k", "1", "--show-text"])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [f"query qa: {SEARCH_DOCS[3]}", f"    1  1.0000  103  {SEARCH_DOCS[3]}"]
    res = CliRunner().invoke(main, ["index", "search", str(tmp_path / "i"), "--queries", str(queries), "--no-header"])
    assert res.exit_code == 2 and "no column 'text'" in res.output and "0-based positions" in res.output


def test_index_search_refuses_bad_input_and_writes_nothing(exports, tmp_path):
    corpus, idx = _build(exports["bert"][2], tmp_path)
    out = tmp_path / "r.jsonl"

    def fails(*args: str) -> str:
        res = CliRunner().invoke(main, ["index", "search", str(idx), *args, "--out", str(out)])
        assert res.exit_code == 2 and not out.exists(), res.output
        return res.output

    assert "another model" in fails("q", "--model", str(exports["qwen3"][2]))
    assert "choose k between 1 and 20" in fails("q", "-k", "21")
    res = CliRunner().invoke(main, ["index", "search", str(idx), "q", "-k", "20", "--out", str(out)])
    assert res.exit_code == 0 and len(json.loads(out.read_text())["hits"]) == 20, res.output  # k may be all of them
    out.unlink()
    assert "no queries" in fails()
    assert "query 2 of 3 is empty (numbered from 1, as the output lists queries)" in fails("a", " ", "b")
    assert "not both" in fails("q", "--queries", str(corpus))
    assert "no column 'text'" in fails("--queries", str(corpus))
    corpus.write_text("doc_id,body\nd0,changed\n")
    assert "changed since the index was built" in fails("q", "--show-text")
    corpus.unlink()
    assert "not there any more" in fails("q", "--show-text")
    shutil.copytree(exports["bert"][2], tmp_path / "copy")  # a copy of the same export answers for it
    res = CliRunner().invoke(main, ["index", "search", str(idx), "q", "--model", str(tmp_path / "copy")])
    assert res.exit_code == 0, res.output
    (tmp_path / "moved").mkdir()
    _, idx = _build(tmp_path / "copy", tmp_path / "moved")
    shutil.rmtree(tmp_path / "copy")
    assert "not there any more; pass --model" in fails("q")
    res = CliRunner().invoke(main, ["index", "search", str(tmp_path), "q", "--show-text"])
    assert res.exit_code == 2 and "not an embedft index folder" in res.output


def test_index_search_hashes_the_weights_only_when_they_are_not_the_files_it_was_built_with(exports, tmp_path,
                                                                                          monkeypatch):
    import embedft.search.indexing as D

    export_dir = tmp_path / "exp"
    shutil.copytree(exports["bert"][2], export_dir)
    _, idx = _build(export_dir, tmp_path)
    hashed = []
    monkeypatch.setattr(D, "weights_digest", lambda d: hashed.append(Path(d).name) or weights_digest(d))

    def search(*args: str) -> int:
        return CliRunner().invoke(main, ["index", "search", str(idx), "q", *args]).exit_code

    assert search() == 0 and hashed == []  # the very files the index was built with: the recorded digest holds
    shutil.copytree(export_dir, tmp_path / "copy")
    assert search("--model", str(tmp_path / "copy")) == 0 and hashed == ["copy"]  # a copy is read, and answers
    weights = export_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # rewritten in place, same bytes: read again, still the same model
    assert search() == 0 and hashed == ["copy", "exp"]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight changed in place, size kept
    weights.write_bytes(bytes(data))
    res = CliRunner().invoke(main, ["index", "search", str(idx), "q"])
    assert res.exit_code == 2 and "another model" in res.output and hashed[-1] == "exp"
    manifest = json.loads((idx / "manifest.json").read_text())
    assert set(manifest["model_files"]) == {"model.safetensors"}
    weights.write_bytes(bytes(data[:-1] + bytes([data[-1] ^ 1])))  # restored; an index from before model_files:
    del manifest["model_files"]
    (idx / "manifest.json").write_text(json.dumps(manifest))
    assert search() == 0 and hashed[-1] == "exp" and len(hashed) == 4


def test_a_corpus_without_ids_is_searched_by_row_number_and_older_indexes_keep_theirs(exports, tmp_path):
    corpus = tmp_path / "corpus.csv"
    corpus.write_text("body\n" + "".join(f"{t}\n" for t in SEARCH_DOCS))
    res = CliRunner().invoke(main, ["index", "build", "--model", str(exports["bert"][2]), "--corpus", str(corpus),
                                    "--text-column", "body", "--out", str(tmp_path / "idx")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["index", "search", str(tmp_path / "idx"), SEARCH_DOCS[3], "-k", "1", "--show-text"])
    assert res.exit_code == 0 and res.stdout.splitlines()[1].split() == ["1", "1.0000", "5", *SEARCH_DOCS[3].split()]
    ids = tmp_path / "idx" / "ids.json"  # an index built before: 0-based positions as ids
    ids.write_text(json.dumps([str(i) for i in range(len(SEARCH_DOCS))]))
    res = CliRunner().invoke(main, ["index", "search", str(tmp_path / "idx"), SEARCH_DOCS[3], "-k", "1", "--show-text"])
    assert res.exit_code == 0 and res.stdout.splitlines()[1].split() == ["1", "1.0000", "3", *SEARCH_DOCS[3].split()]


def test_an_out_that_cannot_be_written_is_refused_before_any_work(exports, tmp_path, monkeypatch):
    import embedft.export.merge as E
    import embedft.search.indexing as D

    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "x"  # a file on the way: no folder can be made there
    monkeypatch.setattr(E, "_load_base", lambda *a, **k: pytest.fail("loaded the model before checking --out"))
    res = CliRunner().invoke(main, ["export", "--adapter", str(exports["bert"][1]), "--out", str(out)])
    assert res.exit_code == 2 and f"--out {out}: cannot write there (File exists: {out.parent}); choose another --out" in res.output
    monkeypatch.setattr(D, "encode", lambda *a, **k: pytest.fail("embedded the corpus before checking --out"))
    corpus = tmp_path / "c.csv"
    corpus.write_text("id,text\n1,a\n")
    res = CliRunner().invoke(main, ["index", "build", "--model", str(exports["bert"][2]), "--corpus", str(corpus),
                                    "--out", str(out)])
    assert res.exit_code == 2 and f"--out {out}: cannot write there (File exists: {out.parent})" in res.output


def test_an_index_written_meanwhile_is_not_replaced_without_overwrite(exports, tmp_path, monkeypatch):
    import faiss

    out = tmp_path / "idx"
    write_index = faiss.write_index

    def another_build_lands(*a, **k):  # a second `index build --out` of the same folder finishes while this one saves
        out.mkdir(exist_ok=True)
        (out / "manifest.json").write_text("the other index")
        return write_index(*a, **k)

    monkeypatch.setattr(faiss, "write_index", another_build_lands)
    corpus = tmp_path / "c.csv"
    corpus.write_text("id,text\n1,a\n2,b\n")
    res = CliRunner().invoke(main, ["index", "build", "--model", str(exports["bert"][2]), "--corpus", str(corpus),
                                    "--out", str(out)])
    assert res.exit_code == 2 and "idx appeared meanwhile and is not empty; pass --overwrite" in res.output
    assert "another index build to the same --out finished first?" in res.output
    monkeypatch.undo()
    assert os.listdir(out) == ["manifest.json"] and sorted(os.listdir(tmp_path)) == ["c.csv", "idx"]
    res = CliRunner().invoke(main, ["index", "build", "--model", str(exports["bert"][2]), "--corpus", str(corpus),
                                    "--out", str(out), "--overwrite"])
    assert res.exit_code == 0 and json.loads((out / "manifest.json").read_text())["count"] == 2


def test_index_search_out_that_is_a_folder_is_refused_before_the_search(exports, tmp_path, monkeypatch):
    from embedft.search import indexing as deploy

    corpus = tmp_path / "corpus.csv"
    corpus.write_text("id,text\n" + "".join(f"{i},{t}\n" for i, t in enumerate(SEARCH_DOCS)))
    res = CliRunner().invoke(main, ["index", "build", "--model", str(exports["bert"][2]), "--corpus", str(corpus),
                                    "--out", str(tmp_path / "idx")])
    assert res.exit_code == 0, res.output
    monkeypatch.setattr(deploy, "search_index", lambda *a, **k: pytest.fail("searched before --out was checked"))
    res = CliRunner().invoke(main, ["index", "search", str(tmp_path / "idx"), "sony camera", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"error: --out {tmp_path} is a folder; pass a file name for the JSON lines" in res.stderr


def test_parity_needs_both_the_cosine_and_the_largest_difference():
    from embedft.export.parity import parity_figures

    ref = np.zeros((2, 3, 4), dtype=np.float32)
    ref[:, :, 0] = 1.0  # (2, N, D): every probe the unit vector e0, as documents and as queries
    tol = {"min_cosine": 0.99, "max_abs_diff": 0.2}

    def check(queries):
        return parity_figures(ref, ref[0].copy(), np.asarray(queries, dtype=np.float32), tol)

    close = [[1, 0.05, 0, 0]] * 3  # cosine 1/sqrt(1.0025) = 0.99875, largest difference 0.05
    p = check(close)
    assert p["ok"] and p["min_cosine"] == pytest.approx(1 / np.sqrt(1.0025))
    assert p["max_abs_diff"] == pytest.approx(0.05)
    assert p["documents"]["min_cosine"] == 1.0 and p["documents"]["max_abs_diff"] == 0.0
    turned = [[1, 0.05, 0, 0], [1, 0.15, 0.15, 0.15], [1, 0, 0, 0]]  # every entry within 0.2, one cosine 0.9679
    p = check(turned)
    assert not p["ok"] and p["min_cosine"] == pytest.approx(1 / np.sqrt(1.0675)) and p["max_abs_diff"] <= 0.2
    assert not check([[1.3, 0, 0, 0]] * 3)["ok"]  # the same direction (cosine 1), 0.3 off
    assert not check([[1, 0, 0, 0]] * 2)["ok"]  # a probe missing
    for bad in (np.nan, np.inf):  # an fp16 overflow: a NaN or inf vector (its cosine is NaN) fails, as queries too
        p = check([[1, 0, 0, 0], [bad, 0, 0, 0], [1, 0, 0, 0]])
        assert not p["ok"] and np.isnan(p["min_cosine"]) and not p["max_abs_diff"] <= 0.2
    assert check([[0, 0, 0, 0]] * 3)["max_abs_diff"] == 1.0 and not check([[0, 0, 0, 0]] * 3)["ok"]
