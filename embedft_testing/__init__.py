"""Test support, outside the runtime package: tiny models and tokenizers built locally, offline."""
