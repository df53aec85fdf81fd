"""Tokenizer helpers: EOS appended by the tokenizer itself (decoders), and the Rust fast path."""

from __future__ import annotations

import contextlib
import logging

from embedft.errors import ModelError

log = logging.getLogger(__name__)


def _tokenizer_appends_special(tok) -> bool:
    ids = tok("a")["input_ids"]
    return bool(ids) and ids[-1] in set(tok.all_special_ids)


def ensure_eos_appended(tok) -> None:
    """Make the tokenizer itself append EOS once, so a plain sentence-transformers load does too."""
    if _tokenizer_appends_special(tok):
        return
    from tokenizers.processors import TemplateProcessing

    eos = tok.eos_token or tok.pad_token
    if eos is None or not hasattr(tok, "_tokenizer"):
        raise ModelError("decoder embedder without an EOS token or a fast tokenizer; last-token pooling needs one")
    eos_id = tok.convert_tokens_to_ids(eos)
    tok._tokenizer.post_processor = TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1",
                                                       special_tokens=[(eos, eos_id)])
    assert _tokenizer_appends_special(tok), "EOS post-processor was not applied"


# transformers' own base classes of fast tokenizers (5.x, 4.x): their encode path adds nothing in
# Python to what the Rust tokenizer does, once truncation and padding are set.
_PLAIN_FAST_BASES = ("transformers.tokenization_utils_tokenizers", "transformers.tokenization_utils_fast")


def _rust_tokenizer(tok):
    """The `tokenizers.Tokenizer` behind tok, when calling it directly gives tok's ids; else None."""
    rust = getattr(tok, "_tokenizer", None)
    if not getattr(tok, "is_fast", False) or rust is None:
        return None
    # The methods that encode (transformers 5 has the first only): each must be the base class's own.
    owners = [next((k for k in type(tok).__mro__ if name in vars(k)), None)
              for name in ("_encode_plus", "_batch_encode_plus")]
    if owners[0] is None or any(k is not None and k.__module__ not in _PLAIN_FAST_BASES for k in owners):
        return None
    return rust


@contextlib.contextmanager
def _plain_settings(rust, tok, max_length: int):
    # As transformers sets them for `tok(texts, truncation=True, max_length=...)`; put back after,
    # since they are saved with the tokenizer (an export's tokenizer.json).
    truncation, padding, special = rust.truncation, rust.padding, rust.encode_special_tokens
    rust.enable_truncation(max_length, stride=0, strategy="longest_first", direction=tok.truncation_side)
    rust.no_padding()
    rust.encode_special_tokens = bool(getattr(tok, "split_special_tokens", False))
    try:
        yield
    finally:
        if truncation is None:
            rust.no_truncation()
        else:
            rust.enable_truncation(**truncation)
        if padding is None:
            rust.no_padding()
        else:
            rust.enable_padding(**padding)
        rust.encode_special_tokens = special
