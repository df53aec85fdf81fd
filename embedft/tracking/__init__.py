"""Tracking: the `Tracker` protocol (`base`), MLflow behind it (`mlflow`, `delivery`), and reading runs back (`runs`)."""
