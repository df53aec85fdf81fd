"""Checkpoints that resume a killed run exactly, and the check that they fit the run resuming them.

A checkpoint folder holds state.pt (LoRA weights, optimizer, scheduler, RNG states, epochs done,
step, and the batches done of the epoch in progress when it was written mid-epoch) and progress.json (loss history and the run's identity: model, LoRA, data digest, loss and
training settings). It is written beside the old one and swapped in whole.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from embedft.atomic import replace_dir, sweep_leftovers, write_bytes, write_error
from embedft.config import LossConfig, TrainConfig
from embedft.data.batches import PairSource
from embedft.errors import ConfigError
from embedft.modeling.encoder import Encoder, EncoderSpec

if TYPE_CHECKING:
    from embedft.training.result import TrainResult
    from embedft.training.selection import Selection


def _adapter_state(encoder: Encoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in encoder.named_parameters() if v.requires_grad}


# Settings a resumed run may change: they do not alter what is trained or in which order.
# (train.eval_every_epoch and the val_* settings are not among them: the epoch a run ends with depends on them.)
RESUMABLE_CHANGES = ("train.threads", "train.log_every", "train.device", "train.output_dir",
                     "train.compile", "train.checkpoint_every")


# EncoderSpec fields that change what a text embeds to, so what is trained (next to the weights' fingerprint).
EMBEDDING_SETTINGS = ("pooling", "normalize", "query_template", "max_length")


def run_identity(spec: EncoderSpec, lora: dict[str, Any] | None, src: PairSource, cfg: TrainConfig,
                 loss_cfg: LossConfig, world_size: int = 1) -> dict[str, Any]:
    """What a checkpoint must be resumed with: base model and how it embeds, LoRA
    (`lora.lora_settings`), the training data, loss and training settings, and the number of
    processes (torchrun's world size: each rank's dropout stream is in the checkpoint), as JSON values."""
    ident: dict[str, Any] = {"model": spec.fingerprint, **{f"model.{k}": getattr(spec, k) for k in EMBEDDING_SETTINGS},
                             **{f"lora.{k}": v for k, v in (lora or {}).items()}, "training data digest": src.digest()}
    ident.update({f"train.{k}": v for k, v in asdict(cfg).items()})
    ident.update({f"loss.{k}": v for k, v in asdict(loss_cfg).items()})
    ident["world_size"] = world_size
    return json.loads(json.dumps({k: v for k, v in ident.items() if k not in RESUMABLE_CHANGES}, default=str))


RESUME_FIX = "resume with the same config and -o options as that run, or start fresh without --resume"


def require_checkpoint(path: Path) -> None:
    """A clear error when there is no checkpoint at `path` to resume (checked before any model is loaded).
    A checkpoint that a killed writer left moved aside (`replace_dir`'s fallback) is put back first."""
    sweep_leftovers(path)
    if not (path / "state.pt").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {path}; run without --resume to start fresh")


def check_resumable(path: Path, identity: dict[str, Any]) -> None:
    """A clear error when there is no checkpoint at `path`, or it was written with other settings
    (another LoRA rank, lr, batch size, data order, ...): resuming it would train something else."""
    require_checkpoint(path)
    saved = _read_checkpoint(path, lambda: json.loads((path / "progress.json").read_text())).get("identity")
    if saved is None:  # written before embedft recorded settings: load_checkpoint checks the shapes
        return
    # Keys a checkpoint lacks were not recorded by the embedft that wrote it: not checked.
    diff = [f"{k}: {saved.get(k)!r} there, {identity.get(k)!r} now" for k in sorted(saved)
            if saved.get(k) != identity.get(k)]
    if saved.get("world_size", identity.get("world_size")) != identity.get("world_size"):
        raise ConfigError(f"--resume: the checkpoint in {path} was written by {saved['world_size']} process(es), "
                          f"and this run has {identity.get('world_size')}; resume with the same number (torchrun "
                          f"--nnodes x --nproc-per-node = {saved['world_size']}, or no torchrun for 1), or start "
                          "fresh without --resume")
    if diff:
        raise ConfigError(f"--resume: the checkpoint in {path} was written with other settings "
                          f"({'; '.join(diff)}); {RESUME_FIX}")


def _read_checkpoint(path: Path, read: Callable[[], Any]) -> Any:
    # The checkpoint is swapped in whole, so a file that does not read was damaged after it was written.
    try:
        return read()
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e):  # pickled objects beyond tensors and numbers: older embedft, or not ours
            raise ConfigError(f"--resume: the checkpoint in {path} holds objects a safe load refuses (written by an "
                              "embedft before 0.1 checkpoints were weights-only, or not by embedft); start fresh "
                              "without --resume") from None
        raise ConfigError(f"--resume: the checkpoint in {path} is damaged ({type(e).__name__}: {e}); "
                          f"start fresh without --resume") from e
    except (OSError, ValueError, EOFError, RuntimeError) as e:
        raise ConfigError(f"--resume: the checkpoint in {path} is damaged ({type(e).__name__}: {e}); "
                          f"start fresh without --resume") from e


def _numpy_rng_state() -> dict[str, Any]:
    # numpy's legacy state as tensors and numbers, which torch.load(weights_only=True) reads (an ndarray is refused).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_rng_state(state: dict[str, Any]) -> None:
    np.random.set_state((state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                         state["cached_gaussian"]))


def rank_rng_state() -> dict[str, Any]:
    """This process's torch RNG states (CPU, and CUDA when there is one): what draws its dropout."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rank_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, encoder: Encoder, opt, sched, epoch: int, step: int, result: TrainResult,
                    identity: dict[str, Any] | None = None, batches_done: int = 0,
                    arrays: dict[str, np.ndarray] | None = None, selection: Selection | None = None,
                    rank_rng: list[dict[str, Any]] | None = None) -> None:
    """Everything to continue exactly: adapter, optimizer, scheduler, RNG, counters, and model
    selection's state (the best epoch so far and its weights). Atomic.

    epoch: epochs done; batches_done: batches done of the next one (0 at an epoch's end);
    arrays: run state that is not weights (mined negatives: `mining.Miner.state`), in arrays.npz;
    rank_rng: under torchrun, every rank's `rank_rng_state()` in rank order (rank 0 writes them all).
    """
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sweep_leftovers(path)  # a previous checkpoint left aside by a killed writer: back in place, or removed
    state = io.BytesIO()  # serialised in memory, then written by atomic.write_bytes (one clear error per disk fault)
    torch.save({"adapter": _adapter_state(encoder), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": {**rank_rng_state(), "python": random.getstate(), "numpy": _numpy_rng_state()},
                "rank_rng": rank_rng, "epoch": epoch, "step": step, "batches_done": batches_done,
                "selection": selection.state_dict() if selection is not None else None}, state)
    progress = json.dumps({"epoch": epoch, "step": step, "batches_done": batches_done, "history": result.history,
                           "val_history": result.val_history, "identity": identity})
    fix = "free space there or set -o train.output_dir to another disk" + (
        "; the last checkpoint is kept: run again with --resume" if (path / "state.pt").is_file() else "")
    try:
        try:
            tmp.mkdir(parents=True)
        except OSError as e:
            raise write_error(tmp, e, fix) from e
        write_bytes(tmp / "state.pt", state.getbuffer().tobytes(), fix)
        if arrays:
            npz = io.BytesIO()
            np.savez(npz, **arrays)
            write_bytes(tmp / "arrays.npz", npz.getvalue(), fix)
        write_bytes(tmp / "progress.json", progress.encode("utf-8"), fix)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written checkpoint stays beside the last good one
        raise
    replace_dir(tmp, path)  # the previous checkpoint is kept until the new one is in place


def load_checkpoint(path: Path, encoder: Encoder, opt, sched, result: TrainResult,
                    selection: Selection | None = None, rank: int = 0) -> tuple[int, int, int]:
    """Restore state saved by save_checkpoint (after check_resumable), model selection's too when
    given, and under torchrun rank `rank`'s own RNG; returns (epochs done, step, batches done of
    the next epoch)."""
    progress = _read_checkpoint(path, lambda: json.loads((path / "progress.json").read_text()))
    # weights_only: tensors, numbers, strings and containers only; a checkpoint cannot run code when loaded.
    state = _read_checkpoint(path, lambda: torch.load(path / "state.pt", map_location="cpu", weights_only=True))
    params = dict(encoder.named_parameters())
    bad = [f"{k} is not in this model" for k in state["adapter"] if k not in params]
    bad += [f"{k} has shape {tuple(v.shape)} there, {tuple(params[k].shape)} now" for k, v in state["adapter"].items()
            if k in params and params[k].shape != v.shape]
    if bad:
        raise ConfigError(f"--resume: the checkpoint in {path} does not fit this model or LoRA config "
                          f"({bad[0]}); {RESUME_FIX}")
    with torch.no_grad():
        for k, v in state["adapter"].items():
            params[k].copy_(v)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    _set_numpy_rng_state(state["rng"]["numpy"])
    # Several processes: each takes its own torch RNG back (rank 0's is also the one in "rng").
    _set_rank_rng_state(state["rank_rng"][rank] if state.get("rank_rng") else state["rng"])
    result.history, result.val_history = progress["history"], progress["val_history"]
    if selection is not None and state.get("selection") is not None:
        selection.load_state_dict(state["selection"])
    return state["epoch"], state["step"], state.get("batches_done", 0)  # 0: written before mid-epoch checkpoints


def load_checkpoint_arrays(path: Path) -> dict[str, np.ndarray] | None:
    """The `arrays` a checkpoint was saved with, or None (none, or written before embedft saved them)."""
    f = Path(path) / "arrays.npz"
    if not f.is_file():
        return None

    def read() -> dict[str, np.ndarray]:
        with np.load(f) as z:
            return {k: z[k] for k in z.files}

    return _read_checkpoint(path, read)
