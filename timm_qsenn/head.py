"""QSENNHead: channel selection, mean pooling, feature normalisation and a class layer that becomes ternary.

The head moves through three stages instead of being swapped for another class:

* ``dense``: reads every backbone channel, normalisation is the identity, the class layer trains;
* ``selected``: reads ``n_f`` selected channels, normalised by learnable mean/std, class layer frozen
  (a real-valued sparse layer, e.g. the SLDD-Model);
* ``ternary``: as ``selected`` with a frozen class layer in {-a, 0, +a}.

The stage is one attribute, ``stage``. The state dict carries it as ``stage_id`` next to the selected channels
and the normalisation, so loading a checkpoint restores the head's structure (number of selected channels,
stage, frozen layers) before its values.
"""

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .ternary import unpack_layer

__all__ = ["QSENNHead", "QSENNOutput", "STAGES"]

STAGES = ("dense", "selected", "ternary")
_POOL_TYPES = ("avg", "")
_STAGE_KEY = "stage_id"


class QSENNOutput(NamedTuple):
    """Everything a Q-SENN forward computes: the trainer, the loss, metrics and explanations read this."""

    logits: Tensor  # B x num_classes
    features: Tensor  # B x n_f pooled feature activations, before dropout and normalisation
    feature_maps: Tensor  # B x n_f x H x W maps of the features the class layer reads


def _check_pool_type(pool_type: str) -> str:
    if pool_type not in _POOL_TYPES:
        raise ValueError(
            f"Q-SENN heads pool by the spatial mean; global_pool must be 'avg' or '' (no pooling), got {pool_type!r}"
        )
    return pool_type


def _create_fc(in_features: int, num_classes: int, device=None, dtype=None) -> nn.Module:
    if num_classes <= 0:
        return nn.Identity()
    return nn.Linear(in_features, num_classes, device=device, dtype=dtype)


def _save_stage(module: "QSENNHead", state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]) -> None:
    state_dict[prefix + _STAGE_KEY] = torch.tensor(STAGES.index(module.stage), dtype=torch.int64)


class QSENNHead(nn.Module):
    """Q-SENN classifier head: select channels, mean-pool, dropout, normalise, class layer."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        pool_type: str = "avg",
        drop_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.num_classes = num_classes
        self.pool_type = _check_pool_type(pool_type)
        self.drop = nn.Dropout(drop_rate)
        self.stage = "dense"
        self.register_buffer("selection", torch.arange(in_features, device=device))
        # While dense the normalisation is the identity and not used: buffers, not frozen parameters.
        self.register_buffer("mean", torch.zeros(in_features, **dd))
        self.register_buffer("std", torch.ones(in_features, **dd))
        self.fc = _create_fc(in_features, num_classes, **dd)
        self.register_state_dict_post_hook(_save_stage)

    @property
    def is_dense(self) -> bool:
        """Whether the head still reads every backbone channel with a trainable class layer."""
        return self.stage == "dense"

    @property
    def num_features(self) -> int:
        """Number of features the class layer reads (all backbone channels while dense)."""
        return self.selection.shape[0]

    def reset(self, num_classes: int, pool_type: str | None = None) -> None:
        """Rebuild the class layer for ``num_classes`` (0 removes it); the learned features are kept."""
        if pool_type is not None:
            self.pool_type = _check_pool_type(pool_type)
        self.num_classes = num_classes
        self.fc = _create_fc(self.num_features, num_classes, device=self.mean.device, dtype=self.mean.dtype)
        self.fc.train(self.training)
        if self.stage == "ternary":
            self.stage = "selected"

    # -- forward -------------------------------------------------------------------------------------------

    def select_maps(self, x: Tensor) -> Tensor:
        """B x C x H x W backbone maps -> B x n_f x H x W maps of the selected features."""
        if self.stage == "dense":
            return x
        return x.index_select(1, self.selection)

    def normalize(self, features: Tensor) -> Tensor:
        """(f - mean) / std of B x n_f pooled features, as the class layer reads them (identity while dense)."""
        if self.stage == "dense":
            return features
        # The reference clamps the learned std at 1e-6 so a dead feature cannot divide by zero.
        return (features - self.mean) / self.std.clamp(min=1e-6)

    def normalize_maps(self, maps: Tensor) -> Tensor:
        """The normalisation of :meth:`normalize` applied at every location of B x n_f x H x W maps."""
        if self.stage == "dense":
            return maps
        return (maps - self.mean[:, None, None]) / self.std.clamp(min=1e-6)[:, None, None]

    def classify(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """Pooled B x n_f features -> logits (or the normalised features with ``pre_logits``)."""
        x = self.normalize(self.drop(features))
        return x if pre_logits else self.fc(x)

    @torch.jit.ignore
    def forward_qsenn(self, x: Tensor) -> QSENNOutput:
        """Logits plus the pooled features and the feature maps they come from (always pooled)."""
        maps = self.select_maps(x)
        features = maps.mean(dim=(2, 3))
        return QSENNOutput(self.classify(features), features, maps)

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        maps = self.select_maps(x)
        if self.pool_type == "avg":
            return self.classify(maps.mean(dim=(2, 3)), pre_logits)
        # Without pooling the (linear) head runs per location: the maps average to the pooled logits.
        x = self.normalize_maps(self.drop(maps))
        if pre_logits or self.num_classes <= 0:
            return x
        return self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    # -- moving through the stages --------------------------------------------------------------------------

    @torch.jit.ignore
    def _set_norm(self, mean: Tensor, std: Tensor, trainable: bool) -> None:
        """Hold mean and std as buffers (dense) or as parameters (selected, ternary), with the given values."""
        del self.mean, self.std
        if self.stage == "dense":
            self.register_buffer("mean", mean)
            self.register_buffer("std", std)
        else:
            self.mean = nn.Parameter(mean, requires_grad=trainable)
            self.std = nn.Parameter(std, requires_grad=trainable)

    @torch.jit.ignore
    def _resize(self, num_features: int, stage: str, norm_trainable: bool) -> None:
        dd = {"device": self.mean.device, "dtype": self.mean.dtype}
        self.stage = stage
        self.selection = torch.zeros(num_features, dtype=torch.int64, device=self.selection.device)
        self._set_norm(torch.zeros(num_features, **dd), torch.ones(num_features, **dd), norm_trainable)
        self.fc = _create_fc(num_features, self.num_classes, **dd)
        self.fc.train(self.training)

    @torch.jit.ignore
    def select(self, channels: Tensor | list[int]) -> None:
        """Read only the given backbone channels; the head moves to the ``selected`` stage.

        Class-layer columns, mean and std of channels the head already read are carried over; new channels
        start with zero weights, mean 0 and std 1. Mean and std become trainable parameters.
        """
        channels = torch.as_tensor(channels, dtype=torch.int64).flatten().cpu()
        if channels.numel() == 0:
            raise ValueError("select() needs at least one channel")
        if channels.unique().numel() != channels.numel():
            raise ValueError("selected channels must be distinct")
        if int(channels.min()) < 0 or int(channels.max()) >= self.in_features:
            raise ValueError(
                f"selected channels must lie in [0, {self.in_features}), the backbone's channels; "
                f"got {int(channels.min())}..{int(channels.max())}"
            )
        lookup = torch.full((self.in_features,), -1, dtype=torch.int64)
        lookup[self.selection.cpu()] = torch.arange(self.num_features)
        old_pos = lookup[channels]
        present = (old_pos >= 0).to(self.mean.device)
        old_pos = old_pos.clamp(min=0).to(self.mean.device)
        with torch.no_grad():
            mean = torch.where(present, self.mean[old_pos], torch.zeros_like(self.mean[old_pos]))
            std = torch.where(present, self.std[old_pos], torch.ones_like(self.std[old_pos]))
            weight = None
            if isinstance(self.fc, nn.Linear):
                weight = self.fc.weight[:, old_pos] * present
                bias = self.fc.bias.clone()
            self._resize(channels.numel(), "selected", norm_trainable=True)
            self.selection.copy_(channels.to(self.selection.device))
            self.mean.copy_(mean)
            self.std.copy_(std)
            if weight is not None:
                self.fc.weight.copy_(weight)
                self.fc.bias.copy_(bias)

    @torch.jit.ignore
    def set_normalization(self, mean: Tensor, std: Tensor) -> None:
        """Set the feature mean and (population) standard deviation used to normalise pooled features."""
        if self.is_dense:
            raise ValueError("select features with select() before setting their normalisation")
        for name, value in (("mean", mean), ("std", std)):
            if tuple(value.shape) != (self.num_features,):
                raise ValueError(f"{name} must have shape ({self.num_features},), got {tuple(value.shape)}")
            if not torch.isfinite(value).all():
                raise ValueError(f"{name} contains NaN or inf")
        with torch.no_grad():
            self.mean.copy_(mean)
            self.std.copy_(std)

    @torch.jit.ignore
    def set_class_layer(self, weight: Tensor, bias: Tensor, ternary: bool = True) -> None:
        """Install a fitted class layer over the selected features and freeze it.

        With ``ternary`` the weights must take at most one magnitude, {-a, 0, +a}, and the head moves to the
        ``ternary`` stage; otherwise it stays ``selected`` with a frozen real-valued layer.
        """
        if self.is_dense:
            raise ValueError("select features with select() before installing a sparse class layer")
        expected = (self.num_classes, self.num_features)
        if tuple(weight.shape) != expected or tuple(bias.shape) != (self.num_classes,):
            raise ValueError(
                f"class layer must be {expected[0]} x {expected[1]} with a bias of {expected[0]}, got "
                f"{tuple(weight.shape)} and {tuple(bias.shape)}"
            )
        if ternary and weight.abs()[weight != 0].unique().numel() > 1:
            raise ValueError("a ternary class layer may hold only the values -a, 0 and +a")
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(bias)
        self.fc.requires_grad_(False)
        self.stage = "ternary" if ternary else "selected"

    @torch.jit.ignore
    def ternary_codes(self) -> tuple[Tensor, float]:
        """The class layer as int8 codes in {-1, 0, +1} and its magnitude ``a`` (ternary stage only)."""
        if self.stage != "ternary":
            raise ValueError(f"the head is in the {self.stage!r} stage, not 'ternary'")
        weight = self.fc.weight.detach()
        nonzero = weight[weight != 0]
        scale = float(nonzero.abs().max()) if nonzero.numel() else 0.0
        return torch.sign(weight).to(torch.int8), scale

    # -- loading ----------------------------------------------------------------------------------------------

    @torch.jit.ignore
    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Shape the head like the checkpoint (feature count, stage) before torch copies any value into it.
        unpack_layer(state_dict, prefix + "fc")
        selection = state_dict.get(prefix + "selection")
        stage_id = state_dict.pop(prefix + _STAGE_KEY, None)
        stage = self.stage
        if stage_id is not None:
            stage_index = int(stage_id)
            if not 0 <= stage_index < len(STAGES):
                raise ValueError(f"checkpoint has unknown Q-SENN head stage id {stage_index}")
            stage = STAGES[stage_index]
        elif strict:
            missing_keys.append(prefix + _STAGE_KEY)
        fitted_layer = prefix + "fc.weight" in state_dict
        # A class layer dropped for a new num_classes is fresh, so it is no longer ternary.
        if stage == "ternary" and not fitted_layer:
            stage = "selected"
        resized = selection is not None and selection.shape[0] != self.num_features
        if stage != self.stage or resized:
            # Trainability follows the stage; a reload into the same stage keeps the user's choices.
            num_features = selection.shape[0] if selection is not None else self.num_features
            self._resize(num_features, stage, norm_trainable=stage != "dense")
            self.fc.requires_grad_(stage == "dense" or not fitted_layer)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if selection is not None and selection.numel():
            if selection.dtype.is_floating_point or int(selection.min()) < 0:
                raise ValueError("checkpoint's selected channels must be non-negative integers")
            if int(selection.max()) >= self.in_features:
                raise ValueError(
                    f"checkpoint selects channel {int(selection.max())} but the backbone has only "
                    f"{self.in_features} channels; it was trained on a different backbone"
                )

    def extra_repr(self) -> str:
        return (
            f"stage={self.stage}, in_features={self.in_features}, num_features={self.num_features}, "
            f"num_classes={self.num_classes}, pool_type={self.pool_type!r}"
        )
