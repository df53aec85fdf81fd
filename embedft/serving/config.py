"""ServeConfig: every default of `embedft serve` (the CLI's options only override them)."""

from __future__ import annotations

from dataclasses import dataclass

from embedft.errors import ConfigError


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}", (name,))


@dataclass(frozen=True)
class ServeConfig:
    """How the server listens, batches and bounds its work."""

    host: str = "127.0.0.1"  # loopback only unless told otherwise
    port: int = 8080
    device: str = "cpu"  # auto|cpu|cuda|cuda:N
    # A forward pass holds at most this many padded tokens (rows x its longest row); a larger
    # request is split over several passes.
    max_batch_tokens: int = 8192
    # How long the oldest queued row waits for others to share its forward pass.
    max_wait_ms: float = 5.0
    # Rows accepted but not yet embedded; a request that does not fit gets 503 + Retry-After.
    max_queue_rows: int = 2048
    max_inputs: int = 256  # inputs per request (OpenAI's API allows 2048)
    max_body_bytes: int = 8 * 1024 * 1024  # a larger request body gets 413
    truncate: bool = True  # False: a text past the model's max_length gets 413 instead of being cut
    retry_after_s: int = 1  # the Retry-After of a 503
    shutdown_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    api_key: str | None = None  # bearer token required on every endpoint but /health

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, "port", f"must be in 0..65535, got {self.port}")
        _check(self.max_batch_tokens >= 1, "max_batch_tokens", f"must be >= 1, got {self.max_batch_tokens}")
        _check(0 <= self.max_wait_ms <= 10_000, "max_wait_ms", f"must be in [0, 10000], got {self.max_wait_ms}")
        _check(self.max_inputs >= 1, "max_inputs", f"must be >= 1, got {self.max_inputs}")
        _check(self.max_queue_rows >= self.max_inputs, "max_queue_rows",
               f"must be >= max_inputs ({self.max_inputs}), or a request of max_inputs texts could never be "
               f"accepted; got {self.max_queue_rows}")
        _check(self.max_body_bytes >= 1024, "max_body_bytes", f"must be >= 1024, got {self.max_body_bytes}")
        _check(self.retry_after_s >= 1, "retry_after_s", f"must be >= 1, got {self.retry_after_s}")
        _check(self.shutdown_timeout_s > 0, "shutdown_timeout_s", f"must be > 0, got {self.shutdown_timeout_s}")
        _check(self.api_key is None or bool(self.api_key.strip()), "api_key", "must not be empty (omit it instead)")
