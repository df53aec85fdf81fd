"""`embedft serve`: one base model, many LoRA adapters, one OpenAI-compatible HTTP embedding API.

- `config`: ServeConfig, every serving default;
- `engine`: the batching engine (no HTTP): queue, mixed-adapter batches, hot load/unload;
- `adapters`: NAME=SOURCE options and their sources (folders, MLflow runs, registered models);
- `app`: the FastAPI app over an engine, and `serve`, which runs it under uvicorn;
- `verify`: a running server checked against an export's probe vectors (`embedft verify --server`);
- `metrics`: counters and histograms in Prometheus' text format.

Nothing is imported here, so `import embedft.serving` stays cheap.
"""
