"""embedft: adapt embedding models to a domain with LoRA contrastive fine-tuning."""

__version__ = "0.1.0"
