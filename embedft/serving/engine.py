"""The batching engine: one base encoder, many LoRA adapters, mixed-adapter forward passes. No HTTP.

Callers `submit` texts for a served model (the base or an adapter) from any thread and get a
Future. One worker thread gathers the queued rows into forward passes, bounded by a token
budget (`max_batch_tokens` padded tokens) and a short wait (`max_wait_ms` for the oldest row),
whatever adapter each row asked for: peft's mixed-batch inference (`adapter_names=`, one name
per row, "__base__" for the base model's rows) applies each row's LoRA weights in the one pass.
Each row's vector is scattered back to its request in input order.

Adapters are loaded and unloaded while requests are in flight. Each load gets a fresh peft
adapter name (its slot), bound to the rows at submission: a request accepted before an
unload is still embedded with the weights it asked for, the slot is deleted once its last row
is done, and a new adapter under the same public name never shares a slot with the old one.
Forward passes and peft's module surgery take turns on one lock.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from embedft.modeling.encoder import Encoder, pool
from embedft.modeling.lora import check_adapter_base, peft_quiet, read_adapter_meta
from embedft.modeling.runtime import sdpa_backends
from embedft.serving.config import ServeConfig
from embedft.serving.errors import BadRequest, Conflict, EngineFailure, NotFound, Overloaded, ServeError, TooLarge
from embedft.serving.metrics import LATENCY_BUCKETS, SIZE_BUCKETS, TOKEN_BUCKETS, Metrics

log = logging.getLogger(__name__)

BASE_SLOT = "__base__"  # peft's adapter name for rows of a mixed batch that take no adapter
INPUT_TYPES = ("document", "query")


@dataclass(frozen=True)
class Profile:
    """How one served model turns text into a vector (its adapter's spec, or the base encoder's)."""

    query_template: str | None  # "...{text}", applied to queries only
    max_length: int
    pooling: str
    normalize: bool


@dataclass
class ServedModel:
    name: str  # what requests ask for
    slot: str  # peft adapter name, or BASE_SLOT
    profile: Profile
    source: str
    created: int = field(default_factory=lambda: int(time.time()))
    pending: int = 0  # rows accepted and not yet embedded
    retired: bool = False  # unloaded: no new requests; its slot goes when pending reaches 0
    lora: dict = field(default_factory=dict)  # r, alpha, target modules (adapters only)

    def card(self) -> dict:
        """The /v1/models entry."""
        kind = "base" if self.slot == BASE_SLOT else "adapter"
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "embedft", "kind": kind,
                "source": self.source, "max_length": self.profile.max_length,
                "query_prompt": bool(self.profile.query_template), **({"lora": self.lora} if self.lora else {})}


@dataclass
class Embeddings:
    """What a submission resolves to: (N, D) float32 vectors in input order and the tokens embedded."""

    vectors: np.ndarray
    prompt_tokens: int
    model: str


class _Request:
    __slots__ = ("model", "ids", "out", "next", "done", "future", "t_submit", "n_tokens")

    def __init__(self, model: ServedModel, ids: list[list[int]], dim: int):
        self.model, self.ids = model, ids
        self.out = np.empty((len(ids), dim), dtype=np.float32)
        self.next = 0  # next row to put in a batch
        self.done = 0  # rows embedded
        self.future: Future = Future()
        self.t_submit = time.monotonic()
        self.n_tokens = sum(map(len, ids))


class Engine:
    """Serves `encoder` (the base, named `base_name`) and the adapters added to it. Thread-safe."""

    def __init__(self, encoder: Encoder, base_name: str, cfg: ServeConfig | None = None,
                 metrics: Metrics | None = None):
        self.cfg = cfg or ServeConfig()
        self.encoder = encoder.float().eval()  # served vectors are the fp32 ones an fp32 export gives
        self.spec = encoder.spec
        self.tokenizer = encoder.tokenizer
        self.device = next(encoder.parameters()).device
        self.dim = int(encoder.spec.hidden_size)
        self.base_name = base_name
        base = Profile(self.spec.query_template, self.spec.max_length, self.spec.pooling, self.spec.normalize)
        self._models: dict[str, ServedModel] = {base_name: ServedModel(base_name, BASE_SLOT, base,
                                                                       self.spec.base_model)}
        self._backbone: nn.Module = encoder.backbone  # peft adds its LoRA layers in place
        self._peft = None  # the PeftModel around it, once an adapter is loaded
        self._slot_ids = itertools.count(1)
        self._cond = threading.Condition()  # guards _models, the queue and its counters
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_rows = 0
        self._queued_tokens = 0
        self._closing = False
        self._net_lock = threading.Lock()  # forward passes and peft's adapter surgery take turns
        self._tok_lock = threading.Lock()  # a fast tokenizer's settings are shared state
        self._thread: threading.Thread | None = None
        self.metrics = metrics or Metrics()
        self._declare_metrics()

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> "Engine":
        """Start the worker thread (idempotent)."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="embedft-engine", daemon=True)
                self._thread.start()
        return self

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the queued ones, stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def queue_rows(self) -> int:
        return self._queued_rows

    @property
    def slots(self) -> list[str]:
        """peft adapter names loaded now (an unloaded adapter's stays until its last queued row is embedded)."""
        with self._net_lock:
            return list(self._peft.peft_config) if self._peft is not None else []

    # -- models -----------------------------------------------------------------------------
    def models(self) -> list[dict]:
        """The served models, base first."""
        with self._cond:
            return [m.card() for m in self._models.values()]

    def add_adapter(self, name: str, adapter_dir: str | Path, source: str | None = None) -> dict:
        """Load an embedft adapter folder under `name`; refused when trained on another base."""
        check_name(name)
        with self._cond:
            if name in self._models:
                raise Conflict(f"a model named {name!r} is already served; unload it first "
                               f"(DELETE /v1/adapters/{name}) or choose another name", param="name")
        adapter_dir = Path(adapter_dir)
        meta = read_adapter_meta(adapter_dir)
        check_adapter_base(self.encoder, adapter_dir)  # ModelError naming both bases
        profile = self._profile(name, meta.get("spec") or {})
        slot = f"s{next(self._slot_ids)}"
        with self._net_lock:
            self._attach(adapter_dir, slot, name)
        model = ServedModel(name, slot, profile, source or str(adapter_dir), lora=self._lora_summary(slot))
        with self._cond:
            if name in self._models:  # another load of the same name won the race
                taken = True
            else:
                self._models[name] = model
                taken = False
        if taken:
            self._detach(slot)
            raise Conflict(f"a model named {name!r} was loaded meanwhile; unload it first", param="name")
        log.info("serving adapter %s (%s) in slot %s", name, model.source, slot)
        return model.card()

    def remove_adapter(self, name: str) -> dict:
        """Unload an adapter: no new requests for it; its rows already accepted are still embedded with it."""
        with self._cond:
            m = self._models.get(name)
            if m is None:
                raise NotFound(f"no adapter named {name!r}; served: {', '.join(self._models)}", param="name",
                               code="model_not_found")
            if m.slot == BASE_SLOT:
                raise BadRequest(f"{name!r} is the base model, which every adapter needs; it cannot be unloaded",
                                 param="name")
            del self._models[name]
            m.retired = True
            now = m.pending == 0
        if now:
            self._detach(m.slot)
        log.info("unloaded adapter %s (slot %s%s)", name, m.slot, "" if now else ", after its queued rows")
        return {"id": name, "object": "model", "deleted": True}

    def _profile(self, name: str, spec: dict) -> Profile:
        if spec.get("padding_side", self.spec.padding_side) != self.spec.padding_side:
            raise ServeError(f"adapter {name!r} was trained with {spec['padding_side']} padding, the base model "
                             f"pads on the {self.spec.padding_side}; a mixed batch has one padding side, so serve "
                             "it from its own server")
        return Profile(query_template=spec.get("query_template", self.spec.query_template),
                       max_length=int(spec.get("max_length", self.spec.max_length)),
                       pooling=spec.get("pooling", self.spec.pooling),
                       normalize=bool(spec.get("normalize", self.spec.normalize)))

    def _attach(self, adapter_dir: Path, slot: str, name: str) -> None:
        from peft import PeftModel

        try:
            with peft_quiet():
                if self._peft is None:
                    self._peft = PeftModel.from_pretrained(self._backbone, str(adapter_dir), adapter_name=slot,
                                                           is_trainable=False)
                else:
                    self._peft.load_adapter(str(adapter_dir), adapter_name=slot, is_trainable=False)
                    if self._peft.active_adapter not in self._peft.peft_config:  # the last one was unloaded
                        self._peft.set_adapter(slot, inference_mode=True)
        except Exception as e:  # corrupted safetensors, shapes that do not fit the base
            if self._peft is not None and slot in self._peft.peft_config:
                self._peft.delete_adapter(slot)
            raise ServeError(f"could not load adapter {name!r} from {adapter_dir}: {e}") from e
        self._peft.eval()

    def _detach(self, slot: str) -> None:
        with self._net_lock:
            others = [s for s in self._peft.peft_config if s != slot]
            if others and slot in self._peft.active_adapters:
                # peft's forward hooks need a valid active adapter (each row names its own anyway).
                self._peft.set_adapter(others[0], inference_mode=True)
            self._peft.delete_adapter(slot)

    def _lora_summary(self, slot: str) -> dict:
        c = self._peft.peft_config[slot]
        return {"r": c.r, "alpha": c.lora_alpha, "target_modules": sorted(c.target_modules)}

    # -- requests ---------------------------------------------------------------------------
    def submit(self, model: str, texts: Sequence[str], input_type: str = "document") -> Future:
        """Queue texts for `model`; the Future resolves to Embeddings (or a RequestError)."""
        texts = self._check_texts(texts)
        if input_type not in INPUT_TYPES:
            raise BadRequest(f"input_type {input_type!r}: use 'document' (the default) or 'query' (adds the "
                             "model's query prompt, if its family has one)", param="input_type")
        with self._cond:
            m = self._models.get(model)
            if m is None:
                raise NotFound(f"the model {model!r} is not served; served models: {', '.join(self._models)}",
                               param="model", code="model_not_found")
            if self._closing:
                raise Overloaded("the server is shutting down; retry on another instance")
            if self._queued_rows + len(texts) > self.cfg.max_queue_rows:
                self.metrics.inc("rejected_total", reason="queue_full")
                raise Overloaded(f"the queue is full ({self._queued_rows} of {self.cfg.max_queue_rows} rows "
                                 "waiting); retry later")
            # Reserved now, so an unload cannot delete the slot before these rows are queued.
            m.pending += len(texts)
            self._queued_rows += len(texts)
        try:
            ids = self._tokenize(texts, m.profile, input_type == "query")
        except BaseException:
            self._release(m, len(texts))
            raise
        req = _Request(m, ids, self.dim)
        with self._cond:
            self._queue.append(req)
            self._queued_tokens += req.n_tokens
            self._cond.notify_all()
        return req.future

    def embed(self, model: str, texts: Sequence[str], input_type: str = "document",
              timeout: float | None = None) -> Embeddings:
        """submit() and wait (the engine must be started)."""
        return self.submit(model, texts, input_type).result(timeout)

    def _check_texts(self, texts) -> list[str]:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            raise BadRequest(f"input must be a string or a list of strings, got {type(texts).__name__}",
                             param="input")
        if not texts:
            raise BadRequest("input is an empty list; give at least one text", param="input")
        if len(texts) > self.cfg.max_inputs:
            raise BadRequest(f"input has {len(texts)} texts; at most {self.cfg.max_inputs} per request: split it",
                             param="input")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise BadRequest(f"input[{i}] is a {type(t).__name__}; every input must be a string (token arrays "
                                 "are not accepted)", param="input")
            if not t:
                raise BadRequest(f"input[{i}] is an empty string; every input must have text", param="input")
        return list(texts)

    def _tokenize(self, texts: list[str], profile: Profile, query: bool) -> list[list[int]]:
        """Token ids per text as `Encoder.tokenize` (and so sentence-transformers) gives them for this profile."""
        if query and profile.query_template:
            texts = [profile.query_template.replace("{text}", t) for t in texts]
        kw = dict(padding=False, return_attention_mask=False, return_token_type_ids=False, verbose=False)
        with self._tok_lock:
            ids = self.tokenizer(texts, truncation=False, **kw)["input_ids"]
            long = [i for i, x in enumerate(ids) if len(x) > profile.max_length]
            if long and not self.cfg.truncate:
                raise TooLarge(f"input[{long[0]}] has {len(ids[long[0]])} tokens, more than the model's max_length "
                               f"{profile.max_length} ({len(long)} such input(s)); shorten it, or start the server "
                               "without --no-truncate to have it cut", param="input", code="context_length_exceeded")
            if long:
                cut = self.tokenizer([texts[i] for i in long], truncation=True, max_length=profile.max_length, **kw)
                for i, x in zip(long, cut["input_ids"]):
                    ids[i] = x
        return ids

    def _release(self, m: ServedModel, n: int, queued: bool = True) -> None:
        """n rows of m will not be embedded after all (`queued`: still counted in the queue)."""
        with self._cond:
            m.pending -= n
            if queued:
                self._queued_rows -= n
            retire = m.retired and m.pending == 0
        if retire:
            self._detach(m.slot)

    # -- the worker -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            rows = self._next_batch()
            if rows is None:
                return
            if not rows:
                continue
            try:
                self._embed_batch(rows)
            except Exception as e:  # a bug past the forward pass: fail these requests, keep the worker
                log.exception("batch of %d rows failed", len(rows))
                for req, _ in rows:
                    if not req.future.done():
                        req.future.set_exception(EngineFailure(f"internal error: {type(e).__name__}: {e}"))

    def _next_batch(self) -> list[tuple[_Request, int]] | None:
        """Wait for rows, then up to max_wait_ms for the token budget to fill; take a batch (FIFO)."""
        budget = self.cfg.max_batch_tokens
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            deadline = self._queue[0].t_submit + self.cfg.max_wait_ms / 1000.0
            while not self._closing and self._queued_tokens < budget:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            rows: list[tuple[_Request, int]] = []
            dropped: list[_Request] = []
            longest = 0
            while self._queue:
                req = self._queue[0]
                # From here on the caller cannot cancel; one that already did (its client went away) is dropped.
                if req.next == 0 and not req.future.set_running_or_notify_cancel():
                    self._queue.popleft()
                    dropped.append(req)
                    self._queued_rows -= len(req.ids)
                    self._queued_tokens -= req.n_tokens
                    continue
                while req.next < len(req.ids):
                    n = len(req.ids[req.next])
                    if rows and (len(rows) + 1) * max(longest, n) > budget:
                        break
                    rows.append((req, req.next))
                    longest = max(longest, n)
                    req.next += 1
                if req.next < len(req.ids):
                    break
                self._queue.popleft()
            self._queued_rows -= len(rows)
            self._queued_tokens -= sum(len(r.ids[i]) for r, i in rows)
        for req in dropped:
            self.metrics.inc("rejected_total", reason="cancelled")
            self._release(req.model, len(req.ids), queued=False)
        return rows

    def _embed_batch(self, rows: list[tuple[_Request, int]]) -> None:
        t0 = time.perf_counter()
        try:
            vectors = self._forward([r.ids[i] for r, i in rows], [r.model for r, _ in rows])
        except Exception as e:  # one bad batch fails its requests, not the server
            log.exception("forward pass of %d rows failed", len(rows))
            vectors, error = None, e
        self.metrics.observe("forward_seconds", time.perf_counter() - t0)
        self.metrics.observe("batch_rows", len(rows))
        self.metrics.observe("batch_padded_tokens", len(rows) * max(len(r.ids[i]) for r, i in rows))
        self.metrics.observe("batch_models", len({r.model.slot for r, _ in rows}))
        finished: list[_Request] = []
        per_model: dict[int, list] = {}
        for j, (req, i) in enumerate(rows):
            if vectors is not None:
                req.out[i] = vectors[j]
            req.done += 1
            entry = per_model.setdefault(id(req.model), [req.model, 0])
            entry[1] += 1
            if req.done == len(req.ids):
                finished.append(req)
        retire = []
        with self._cond:
            for m, n in per_model.values():
                m.pending -= n
                if m.retired and m.pending == 0:
                    retire.append(m.slot)
        for slot in retire:
            self._detach(slot)
        seen: set[int] = set()
        for req, _ in rows:  # a request split over batches fails as soon as one of its batches does
            if vectors is None and id(req) not in seen and not req.future.done():
                seen.add(id(req))
                req.future.set_exception(EngineFailure(f"the forward pass failed: {type(error).__name__}: {error}"))
        for req in finished:
            if not req.future.done():
                self.metrics.inc("rows_total", len(req.ids), model=req.model.name)
                self.metrics.inc("tokens_total", req.n_tokens, model=req.model.name)
                req.future.set_result(Embeddings(req.out, req.n_tokens, req.model.name))

    @torch.inference_mode()
    def _forward(self, ids: list[list[int]], models: list[ServedModel]) -> np.ndarray:
        """One forward pass over rows of any served models -> (B, D) float32, each row pooled as its model says."""
        batch = self.encoder.collate(ids, self.device)
        slots = [m.slot for m in models]
        with self._net_lock, sdpa_backends(self.device, self.spec.padding_side, False):
            if self._peft is not None and self._peft.peft_config:
                out = self._peft(**batch, **self.encoder.backbone_kwargs, adapter_names=slots)
            else:  # no adapter loaded (any more): every row is the base model's
                out = self._backbone(**batch, **self.encoder.backbone_kwargs)
        hidden = out.last_hidden_state  # (B, L, H)
        mask = batch["attention_mask"]
        emb = torch.empty(hidden.shape[0], hidden.shape[-1], dtype=torch.float32, device=hidden.device)
        groups: dict[tuple[str, bool], list[int]] = {}
        for j, m in enumerate(models):
            groups.setdefault((m.profile.pooling, m.profile.normalize), []).append(j)
        for (pooling, normalize), idx in groups.items():
            sel = torch.tensor(idx, device=hidden.device)
            e = pool(hidden[sel], mask[sel], pooling).float()  # (b, H)
            emb[sel] = nn.functional.normalize(e, dim=-1) if normalize else e
        return emb.cpu().numpy()

    def _declare_metrics(self) -> None:
        m = self.metrics
        m.counter("rows_total", "Texts embedded, by model.")
        m.counter("tokens_total", "Tokens embedded (after truncation, special tokens included), by model.")
        m.counter("rejected_total", "Requests refused by the engine, by reason.")
        m.histogram("batch_rows", "Rows per forward pass.", SIZE_BUCKETS)
        m.histogram("batch_padded_tokens", "Padded tokens (rows x longest row) per forward pass.", TOKEN_BUCKETS)
        m.histogram("batch_models", "Distinct served models (adapters and base) per forward pass.", SIZE_BUCKETS)
        m.histogram("forward_seconds", "Time of one forward pass, pooling included.", LATENCY_BUCKETS)
        m.gauge("queue_rows", "Rows accepted and waiting for a forward pass.", lambda: self._queued_rows)
        m.gauge("queue_requests", "Requests with rows still waiting.", lambda: len(self._queue))
        m.gauge("adapters_loaded", "Adapters served (the base model not counted).", lambda: len(self._models) - 1)


NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-:/@")


def check_name(name: str) -> None:
    """A served model's name: 1-128 letters, digits and . _ - : / @ (it appears in URLs and metrics)."""
    if not isinstance(name, str) or not name or len(name) > 128 or not set(name) <= NAME_CHARS \
            or name == BASE_SLOT:
        raise BadRequest(f"model name {name!r}: use 1-128 letters, digits and . _ - : / @ (not {BASE_SLOT!r})",
                         param="name")
