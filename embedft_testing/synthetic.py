"""Randomly initialised models with a locally built tokenizer, for tests and benchmarks.

Nothing here touches the network: the tokenizer is built from a word list, the model
from a config. Used by the test-suite (tiny BERT-like and Qwen3-like models) and by
the GPU benchmarks (Qwen3-Embedding-0.6B- and 4B-shaped models from their published configs).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

WORDS = (
    "the a of and to in for with on is are be this that it as by from at or an new best "
    "apple samsung sony lg bosch hotpoint miele intel amd canon nikon iphone galaxy pixel "
    "phone tv fridge freezer washer dishwasher microwave camera cpu processor core ryzen "
    "black white silver grey gold blue red steel inox 4k uhd hd smart led oled qled "
    "gb tb kg cm inch mp ghz watt plus pro max mini ultra lite edition model series "
    "how do i reset my password order refund cancel delivery track account card payment "
    "question answer query document passage retrieve relevant product title category"
).split()


BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]


def _vocab(specials: list[str]) -> list[str]:
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    # Character pieces let any word tokenize (as in WordPiece), so no text is all-UNK.
    return specials + WORDS + chars + ["##" + c for c in chars] + ["Instruct", "Query", ":"]


def build_bert_tokenizer(out_dir: str | Path):
    """A WordPiece BertTokenizerFast saved in out_dir."""
    from transformers import BertTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(dict.fromkeys(_vocab(BERT_SPECIALS)))}
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    try:  # transformers >= 5 takes the vocabulary itself
        tok = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    except TypeError:
        tok = BertTokenizerFast(vocab_file=str(out / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(out)
    return tok


def build_qwen_tokenizer(out_dir: str | Path):
    """A Qwen-style fast tokenizer (no BOS, EOS not appended by itself, pad = <|endoftext|>)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(dict.fromkeys(_vocab(QWEN_SPECIALS)))}
    tk = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>", max_input_chars_per_word=100))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<|endoftext|>",
                                  eos_token="<|im_end|>", padding_side="left")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    return tok


def tiny_bert(out_dir: str | Path, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0,
              dropout: float = 0.0) -> Path:
    """Save a tiny random BertModel + tokenizer as a Hugging Face folder (`dropout`: its hidden and
    attention dropout, 0 by default so that tests compare exact values)."""
    import torch
    from transformers import BertConfig, BertModel

    out = Path(out_dir)
    tok = build_bert_tokenizer(out)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=hidden * 2, max_position_embeddings=128, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    BertModel(cfg).save_pretrained(out)
    return out


def tiny_qwen3(out_dir: str | Path, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               seed: int = 0) -> Path:
    """Save a tiny random Qwen3Model + tokenizer as a Hugging Face folder."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    out = Path(out_dir)
    tok = build_qwen_tokenizer(out)
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=hidden // heads, intermediate_size=hidden * 2,
                      max_position_embeddings=256, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    Qwen3Model(cfg).save_pretrained(out)
    return out


def qwen3_from_config(config_path: str | Path, out_dir: str | Path, seed: int = 0, dtype=None,
                      device: str = "cpu") -> Path:
    """A randomly initialised Qwen3Model shaped by a published config.json (e.g. Qwen3-Embedding-0.6B).

    `dtype` (a torch dtype; default fp32) and `device`: what it is initialised and saved in, and where.
    A 4B-shaped model in bf16 on a GPU takes seconds and 8 GB of disk, in fp32 on a CPU minutes and 16.
    """
    import torch
    from transformers import Qwen3Config, Qwen3Model

    out = Path(out_dir)
    values = json.loads(Path(config_path).read_text())
    tok = build_qwen_tokenizer(out)
    cfg = Qwen3Config(**{k: v for k, v in values.items() if k not in ("architectures", "transformers_version")})
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype or default)
    try:
        with torch.device(device):
            model = Qwen3Model(cfg)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(out)
    # The tokenizer's ids must stay within the model's vocabulary; the real vocab is larger.
    assert len(tok) <= cfg.vocab_size
    return out


def random_like(model_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """A copy of a model folder with the same config, tokenizer and modules but random weights.

    For speed benchmarks on machines that cannot receive the real weights (throughput does
    not depend on their values). Weight files are not copied.
    """
    import shutil

    import torch
    from transformers import AutoConfig, AutoModel

    src, out = Path(model_dir), Path(out_dir)
    weights = {".safetensors", ".bin", ".onnx", ".h5", ".ot", ".msgpack"}
    for f in src.rglob("*"):
        rel = f.relative_to(src)
        if f.is_file() and f.suffix not in weights and not {"onnx", "openvino"} & set(rel.parts):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, out / rel)
    torch.manual_seed(seed)
    AutoModel.from_config(AutoConfig.from_pretrained(src)).save_pretrained(out)
    return out


def save_as_sentence_transformer(model_dir: str | Path) -> Path:
    """Turn a Hugging Face folder into a sentence-transformers one, as embedft would embed with it.

    The family's pooling (last-token for decoders), normalisation, and a tokenizer that appends
    EOS itself, so `SentenceTransformer(model_dir)` and embedft's encoder give the same vectors.
    """
    from embedft.config import ModelConfig
    from embedft.export.merge import to_sentence_transformer
    from embedft.modeling.encoder import load_encoder

    encoder = load_encoder(ModelConfig(name=str(model_dir)))
    to_sentence_transformer(encoder).save(str(model_dir))
    return Path(model_dir)
