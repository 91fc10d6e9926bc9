"""Saving a Q-SENN model in timm's Hub layout: config.json, model.safetensors with the ternary class layer packed,
and a model card, written together into a folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from timm.models._hub import save_config_for_hf  # the config half of save_for_hf; timm.models exports only that
from torch import Tensor

from ..qsenn import QSENN
from ..ternary import PACKED_FORMAT, pack_layer
from .card import model_card, write_card
from .describe import (
    architecture,
    check_model,
    export_args,
    export_cfg,
    label_names,
    notes,
    packable,
    qsenn_metadata,
)
from .format import CARD_FILE, CONFIG_FILE, CONFIG_KEY, WEIGHTS_FILE, weights_metadata

__all__ = ["save_pretrained", "staging"]


def save_pretrained(
    model: QSENN,
    folder: str | os.PathLike,
    *,
    metrics: Mapping[str, Any] | None = None,
    recipe: Mapping[str, Any] | Any | None = None,
    dataset: str | None = None,
    compact: bool = True,
    overwrite: bool = False,
    repo_id: str | None = None,
    environment: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` (packed ternary layer) and a model card into ``folder``.

    ``environment`` records what produced the model (versions, device, CPU); by default this process on the
    model's device (``timm_qsenn._utils.environment``). The model is not changed.
    """
    check_model(model)
    meta = qsenn_metadata(model, metrics, recipe, dataset, packed=compact and packable(model), environment=environment)
    model_config: dict[str, Any] = {
        CONFIG_KEY: meta,
        "pretrained_cfg": {"architecture": architecture(model), "notes": [notes(meta)]},
    }
    labels = label_names(model)
    if labels:
        model_config["label_names"] = labels
    with staging(folder, overwrite) as tmp:
        args = export_args(model)
        save_config_for_hf(_ExportView(model), tmp / CONFIG_FILE, model_config=model_config, model_args=args)
        state = _state_dict(model, packed=meta["class_layer_format"] == PACKED_FORMAT)
        save_file(state, tmp / WEIGHTS_FILE, metadata=weights_metadata(meta))
        write_card(tmp / CARD_FILE, model_card(model, meta, repo_id=repo_id, folder_name=Path(folder).name))
    return Path(folder)


class _ExportView:
    """The model as timm's config exporter reads it, without changing the model.

    timm takes the pretrained cfg and the recorded constructor args from the model's attributes. The view gives
    it the model's cfg (its backbone's for a QSENN built without timm.create_model, which has none) and no
    recorded args, so the explicit ``model_args`` are all that is written; every other attribute is the model's.
    """

    def __init__(self, model: QSENN):
        self._model = model
        self._model_args: dict[str, Any] = {}
        self.pretrained_cfg = export_cfg(model)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _state_dict(model: QSENN, packed: bool) -> dict[str, Tensor]:
    """The model's state dict on the CPU, contiguous, with the class layer packed when asked."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if packed:
        state = pack_layer(state, "head.fc", *model.head.ternary_codes())
    return state


@contextlib.contextmanager
def staging(folder: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """A temporary folder next to ``folder`` whose files replace those in ``folder`` when the block succeeds."""
    target = Path(folder)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file; pass a folder to write the model into")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{target} is not empty; choose an empty or new folder, or pass overwrite=True to replace the "
            "model files in it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".qsenn-", dir=target.parent))
    try:
        yield tmp
        target.mkdir(exist_ok=True)
        for path in tmp.iterdir():
            os.replace(path, target / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
