"""Share Q-SENN models: timm's Hub layout with a packed ternary class layer, model cards, push and pull, and a
plugin-free export folded into the backbone's own timm classifier.

What :func:`save_pretrained` writes, :func:`load_model` reads, and the model card is generated from the same
metadata (the ``"qsenn"`` block of ``config.json``):

* ``config.json``: timm's config (``architecture``, ``model_args``, ``pretrained_cfg``, ``label_names``) plus a
  top-level ``"qsenn"`` block (stage, selected channels, weights per class, scale, feature names, metrics,
  recipe, dataset, the environment that produced it, format and package versions). timm ignores unknown
  top-level keys.
* ``model.safetensors``: the state dict with the ternary class layer packed into 2-bit codes
  (``head.fc.weight_packed`` and friends, see :func:`timm_qsenn.ternary.pack_layer`); the header
  metadata names the file format and the class-layer format with their versions.
* ``README.md``: a model card made with huggingface_hub's ``ModelCard``.

Every timm loading path reads such a folder: ``create_model('local-dir:...' / 'hf-hub:...', pretrained=True)``,
registered tags, ``checkpoint_path=`` and ``pretrained_cfg_overlay=dict(file=...)``.

One concern per module: ``format`` (file names, versions, the checks), ``files`` (finding a model's files),
``describe`` (what a saved model records), ``save``, ``load``, ``card``, ``remote`` (push and pull), ``fold``
(the plain-timm export) and ``tags`` (hub configs of registered tags).
"""

from .card import model_card
from .fold import export_folded, fold
from .format import CONFIG_KEY, FORMAT_VERSION, SIDECAR_NAME
from .load import load_model
from .remote import pull, push_to_hub
from .save import save_pretrained
from .tags import write_hub_config

__all__ = [
    "save_pretrained",
    "load_model",
    "push_to_hub",
    "pull",
    "export_folded",
    "fold",
    "model_card",
    "write_hub_config",
    "CONFIG_KEY",
    "FORMAT_VERSION",
    "SIDECAR_NAME",
]
