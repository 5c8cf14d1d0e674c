"""Checkpoints: weights in safetensors, trainer state beside them, written atomically.

Layout of ``<run>/checkpoints/step_000200/``:
  model.safetensors  the model's full (unsharded) state dict, fp32 master weights
  trainer.pt         {"optimizer": ..., "rng": ...}: tensors and plain containers only, read with
                     ``torch.load(weights_only=True)``
  state.json         step, config, metrics, and the size + SHA-256 of the two files above
A checkpoint folder is built under a temporary name, fsynced, then renamed; ``<run>/checkpoints/latest``
(the folder's name) is replaced last. A crash at any point leaves the previous checkpoint readable.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .killpoints import kill_point

__all__ = ["Checkpoint", "CheckpointError", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
           "resolve_checkpoint", "check_state_dict", "save_weights", "load_weights", "checkpoint_folders",
           "newest_intact"]

CKPT_DIR = "checkpoints"
LATEST = "latest"
MODEL_FILE, TRAINER_FILE, STATE_FILE = "model.safetensors", "trainer.pt", "state.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, truncated or does not fit the model."""


@dataclass
class Checkpoint:
    path: Path
    model: dict[str, torch.Tensor]
    trainer: dict
    state: dict

    @property
    def step(self) -> int:
        return self.state["step"]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors; tensors sharing storage (tied embeddings) are stored once, aliases in metadata."""
    seen: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().cpu().contiguous()
    meta = dict(metadata or {})
    if aliases:
        meta["aliases"] = json.dumps(aliases)
    save_file(tensors, str(path), metadata=meta)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file missing")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err}); it is corrupt or truncated") from None
    for alias, name in json.loads(meta.get("aliases", "{}")).items():
        tensors[alias] = tensors[name]
    return tensors


def save_checkpoint(run_dir: str | Path, step: int, model_sd: dict, trainer: dict, state: dict,
                    keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, keep the newest ``keep``."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    def reached(fname: str) -> None:
        kill_point(f"ckpt:{fname}", f"ckpt:{name}/{fname}")

    try:
        reached(MODEL_FILE)
        save_weights(model_sd, tmp / MODEL_FILE)
        reached(TRAINER_FILE)
        torch.save(trainer, tmp / TRAINER_FILE)
        files = {}
        for fname in (MODEL_FILE, TRAINER_FILE):
            _fsync_file(tmp / fname)
            files[fname] = {"bytes": (tmp / fname).stat().st_size, "sha256": _sha256(tmp / fname)}
        reached(STATE_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "files": files}, indent=1))
        _fsync_file(tmp / STATE_FILE)
        _fsync_dir(tmp)
        final = root / name
        if final.exists():  # re-saving a step (e.g. after a resume): move the old one out of the way
            old = root / f".old-{name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    reached(LATEST)
    write_text_atomic(root / LATEST, name + "\n")
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for stale in [p for p in steps if p.name != name][: max(0, len(steps) - keep)]:
        shutil.rmtree(stale)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / CKPT_DIR / LATEST
    if not pointer.is_file():
        return None
    target = pointer.parent / pointer.read_text().strip()
    if not target.is_dir():
        raise CheckpointError(f"{pointer} names {target.name}, which does not exist; "
                              "point it at an existing step_* folder or delete it" + _intact_hint(run_dir, target))
    return target


def checkpoint_folders(run_dir: str | Path) -> list[Path]:
    """The run's step_* checkpoint folders, newest first."""
    root = Path(run_dir) / CKPT_DIR
    return sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True) if root.is_dir() else []


def newest_intact(run_dir: str | Path, exclude: Path | None = None) -> Path | None:
    """The newest checkpoint of the run whose files match their recorded sizes and SHA-256 (None if none)."""
    for folder in checkpoint_folders(run_dir):
        if exclude is not None and folder.resolve() == Path(exclude).resolve():
            continue
        try:
            _verify(folder, with_trainer=True)
        except CheckpointError:
            continue
        return folder
    return None


def _intact_hint(run_dir: str | Path, bad: Path | None) -> str:
    alt = newest_intact(run_dir, exclude=bad)
    if alt is None:
        return "; the run has no other intact checkpoint"
    step = int(alt.name.split("_")[-1])
    return (f"; the newest intact checkpoint is {alt} (step {step}): continue training from it with "
            f"resume_from={step}, or pass that folder to `int8flow sample` / `int8flow export`")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a run folder (e.g. runs/tiny) or one of its "
                                f"{CKPT_DIR}/step_* folders")
    if (path / STATE_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        found = checkpoint_folders(path)
        raise CheckpointError(f"{path}: neither a checkpoint folder (no {STATE_FILE}) nor a run folder "
                              f"with {CKPT_DIR}/{LATEST}" + (_intact_hint(path, None) if found else ""))
    return latest


def _run_of(folder: Path) -> Path | None:
    return folder.parent.parent if folder.parent.name == CKPT_DIR else None


def load_checkpoint(path: str | Path, with_trainer: bool = True) -> Checkpoint:
    """Read and verify (sizes, SHA-256) a checkpoint folder or a run folder's latest checkpoint.

    A damaged checkpoint raises CheckpointError naming the file and, when the folder belongs to a run, the
    newest intact checkpoint of that run and how to use it."""
    folder = resolve_checkpoint(path)
    try:
        return _load(folder, with_trainer)
    except CheckpointError as err:
        run = _run_of(folder)
        if run is None:
            raise
        raise CheckpointError(f"{err}{_intact_hint(run, folder)}") from None


def _verify(folder: Path, with_trainer: bool) -> dict:
    """state.json of ``folder`` after checking each file's size and SHA-256."""
    state_path = folder / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
        files = state["files"]
    except (json.JSONDecodeError, KeyError, OSError) as err:
        raise CheckpointError(f"{state_path}: unreadable ({err}); the checkpoint is corrupt") from None
    for fname in (MODEL_FILE, TRAINER_FILE) if with_trainer else (MODEL_FILE,):
        fpath, want = folder / fname, files.get(fname, {})
        if not fpath.is_file():
            raise CheckpointError(f"{fpath}: missing from the checkpoint")
        size = fpath.stat().st_size
        if size != want.get("bytes"):
            raise CheckpointError(f"{fpath}: {size} bytes, {STATE_FILE} records {want.get('bytes')}; "
                                  "the file is truncated or was replaced")
        if _sha256(fpath) != want.get("sha256"):
            raise CheckpointError(f"{fpath}: SHA-256 differs from {STATE_FILE}; the file is corrupt")
    return state


def _load(folder: Path, with_trainer: bool) -> Checkpoint:
    state = _verify(folder, with_trainer)
    model_sd = load_weights(folder / MODEL_FILE)
    trainer = {}
    if with_trainer:
        try:
            trainer = torch.load(folder / TRAINER_FILE, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for damaged zip/pickle data
            raise CheckpointError(f"{folder / TRAINER_FILE}: unreadable ({err})") from None
    return Checkpoint(folder, model_sd, trainer, state)


def check_state_dict(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: Path) -> None:
    """Raise naming ``source`` and the first differences when names or shapes do not match."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    shapes = [f"{k}: file {tuple(loaded[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in loaded and loaded[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} ({', '.join(unexpected[:4])}"
                        f"{', ...' if len(unexpected) > 4 else ''})")
    if shapes:
        problems.append(f"shape mismatch {len(shapes)} ({'; '.join(shapes[:4])})")
    if problems:
        raise CheckpointError(f"{source} does not fit this model: {'; '.join(problems)}. "
                              "Use the model, precision and model.* settings the checkpoint was made with "
                              "(see its state.json), or a new out_dir")
