"""The Accelerate trainer: the whole Q-SENN pipeline from a config, resumable inside every phase."""

from .config import TrainConfig, load_config
from .pipeline import QSENNTrainer
from .run_folder import RunExistsError, RunInUseError
from .summary import format_summary

__all__ = ["TrainConfig", "load_config", "QSENNTrainer", "RunExistsError", "RunInUseError", "format_summary", "train"]


def train(config: TrainConfig, overwrite: bool = False) -> dict:
    """Run (or resume) the pipeline for ``config``; returns the summary written to ``summary.json``."""
    return QSENNTrainer(config, overwrite=overwrite).run()
