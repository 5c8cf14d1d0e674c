"""Training: run configs, the loop, checkpoints, distributed wrapping, logs and plots."""
from .checkpoint import Checkpoint, CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import PRECISIONS, RUN_PRESETS, TrainConfig, make_config, parse_overrides
from .loop import NonFiniteLossError, TrainResult, lr_at, train
from .metrics import plot_runs, read_log

__all__ = [
    "Checkpoint", "CheckpointError", "latest_checkpoint", "load_checkpoint", "save_checkpoint",
    "PRECISIONS", "RUN_PRESETS", "TrainConfig", "make_config", "parse_overrides",
    "NonFiniteLossError", "TrainResult", "lr_at", "train", "plot_runs", "read_log",
]
