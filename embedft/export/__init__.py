"""Export: merge a LoRA adapter into its base, prove the export embeds as the adapter did, ONNX, model card."""
