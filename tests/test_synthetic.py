"""Benchmark models built offline: a random copy of a real folder, and a HF folder turned into a
sentence-transformers one that plain ST embeds exactly as embedft does (last-token pooling, EOS)."""

import numpy as np
import torch

from embedft.config import ModelConfig
from embedft.modeling.encoder import _st_pooling, load_encoder
from embedft_testing.synthetic import random_like, save_as_sentence_transformer, tiny_qwen3

TEXTS = ["samsung galaxy phone 128 gb", "bosch dishwasher", "a", "intel core cpu 3 ghz processor with 8 cores"]


def test_qwen3_folder_as_sentence_transformer_embeds_like_embedft(tmp_path):
    from sentence_transformers import SentenceTransformer

    path = save_as_sentence_transformer(tiny_qwen3(tmp_path / "q"))
    st = SentenceTransformer(str(path), device="cpu")
    assert _st_pooling(st) == "lasttoken"
    ids = st.tokenizer("bosch dishwasher")["input_ids"]
    assert ids[-1] == st.tokenizer.eos_token_id and ids.count(st.tokenizer.eos_token_id) == 1
    ours = load_encoder(ModelConfig(name=str(path)), "cpu").encode(TEXTS, batch_size=2)
    ref = st.encode(TEXTS, batch_size=3, convert_to_numpy=True)
    assert np.abs(ours - ref).max() <= 1e-5


def test_random_like_keeps_shape_and_tokenizer_not_weights(tmp_path, tiny_bert_dir):
    from transformers import AutoModel, AutoTokenizer

    src = save_as_sentence_transformer(random_like(tiny_bert_dir, tmp_path / "src", seed=1))
    copy = random_like(src, tmp_path / "copy", seed=2)
    assert (copy / "modules.json").is_file() and (copy / "1_Pooling" / "config.json").is_file()
    a, b = AutoModel.from_pretrained(src), AutoModel.from_pretrained(copy)
    assert (a.config.hidden_size, a.config.num_hidden_layers) == (b.config.hidden_size, b.config.num_hidden_layers)
    assert AutoTokenizer.from_pretrained(src)("bosch tv")["input_ids"] == AutoTokenizer.from_pretrained(copy)("bosch tv")["input_ids"]
    wa, wb = a.state_dict(), b.state_dict()
    assert wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wa)
    assert not torch.equal(wa["encoder.layer.0.attention.self.query.weight"], wb["encoder.layer.0.attention.self.query.weight"])
