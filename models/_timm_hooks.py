"""timm's model hooks beyond the classifier interface, for the code that calls them:
``forward_intermediates`` / ``prune_intermediate_layers`` (feature extraction without
``features_only``) and ``group_matcher`` / ``no_weight_decay`` (timm's optimizer factory,
layer-wise learning-rate decay). Mixed into ``ImageClassifier``; nothing here runs in
``forward``, so TorchScript never compiles it."""
from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from ._base import FeatureInfo

__all__ = ["TimmHooks"]


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


class TimmHooks:
    """The methods; ``ImageClassifier`` provides what they read."""

    if TYPE_CHECKING:  # ImageClassifier's (declared here for type checkers only: TorchScript reads annotations)
        feature_info: FeatureInfo
        features_only: bool
        grad_checkpointing: bool
        num_features: int
        head_hidden_size: int
        _TAIL_NAMES: tuple[str, ...]
        _HEAD_NAMES: tuple[str, ...]

        def _stages(self) -> list[tuple[str, nn.Module]]: ...
        def _prepare_input(self, x: torch.Tensor) -> torch.Tensor: ...
        def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None: ...

    def _take_indices(self, indices: int | Iterable[int] | None) -> list[int]:
        """timm's ``feature_take_indices``: None, all taps; an int n, the last n; else those
        taps (negative: from the end). Sorted, as the maps come out in forward order."""
        count = len(self.feature_info)
        if indices is None:
            return list(range(count))
        if isinstance(indices, numbers.Integral) and not isinstance(indices, bool):
            if not 1 <= indices <= count:
                raise ValueError(f"indices={indices} asks for the last {indices} feature maps; there are {count}")
            return list(range(count - int(indices), count))
        if isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
            raise TypeError(f"indices must be None, an int (the last n maps) or a sequence of tap indices, "
                            f"got {type(indices).__name__} {indices!r}")
        taken = list(indices)
        for i in taken:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not -count <= i < count:
                raise ValueError(f"indices {tuple(taken)}: {i!r} is not a tap; taps are 0..{count - 1} "
                                 f"(or -{count}..-1)")
        if not taken:
            raise ValueError("indices is empty: ask for at least one feature map")
        return sorted({int(i) % count for i in taken})

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Iterable[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates``: the feature maps of ``feature_info`` (the taps of
        ``features_only``, strides 2 to 32) on the way through the network.

        Args:
            indices: None for every tap, an int n for the last n, or a sequence of tap indices.
            norm: timm's switch for a final norm layer; these models have none to apply.
            stop_early: stop at the last tap asked for; the first value returned is then that
                map instead of the final features.
            output_fmt: "NCHW", the only layout.
            intermediates_only: return only the maps (the network stops at the last one).

        Returns:
            ``(final features, maps)`` (the final features as ``forward_features``), or the maps.
        """
        if self.features_only:
            raise RuntimeError("a features_only model returns its feature maps from model(x)")
        for name, value in (("norm", norm), ("stop_early", stop_early), ("intermediates_only", intermediates_only)):
            _check_flag(name, value)
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' (these models produce no other layout), got {output_fmt!r}")
        wanted = [self.feature_info[i]["module"] for i in self._take_indices(indices)]
        x = self._prepare_input(x)
        maps: list[torch.Tensor] = []
        for name, module in self._stages():
            if name.startswith("blocks.") and self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(module, x, use_reentrant=False)
            else:
                x = module(x)
            if name in wanted:
                maps.append(x)
                if name == wanted[-1] and (stop_early or intermediates_only):
                    break
        return maps if intermediates_only else (x, maps)

    def prune_intermediate_layers(self, indices: int | Iterable[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm's ``prune_intermediate_layers``: keep what the taps ``indices`` need, in place.

        The stages after the last tap become nothing, the head goes (``reset_classifier(0,
        global_pool="")``: ``model(x)`` is then the last tap's map), and ``feature_info`` ends
        at that tap. As in timm, nothing is pruned when the last tap is the final one and
        ``prune_head`` and ``prune_norm`` are False. Returns the tap indices taken."""
        if self.features_only:
            raise RuntimeError("a features_only model has only its taps already")
        _check_flag("prune_norm", prune_norm)
        _check_flag("prune_head", prune_head)
        taken = self._take_indices(indices)
        last = taken[-1]
        if not (prune_norm or prune_head or last < len(self.feature_info) - 1):
            return taken
        tap = self.feature_info[last]
        names = [name for name, _ in self._stages()]
        after = names[names.index(tap["module"]) + 1:]
        kept_blocks = len([n for n in names[: names.index(tap["module"]) + 1] if n.startswith("blocks.")])
        module: Any = self
        module.blocks = module.blocks[:kept_blocks]
        for name in [n for n in after if not n.startswith("blocks.")] + list(self._HEAD_NAMES):
            setattr(self, name, nn.Identity())
        self.num_features = self.head_hidden_size = tap["num_chs"]
        self.feature_info = type(self.feature_info)(self.feature_info[: last + 1])
        self.reset_classifier(0, global_pool="")
        return taken

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups: the stem, each block (``coarse``: each stage), then the
        head; the patterns timm's GhostNet and EfficientNet use, for layer-wise decay."""
        head = [name for name in self._TAIL_NAMES + self._HEAD_NAMES
                if any(True for _ in getattr(self, name).parameters())]
        blocks: list[tuple[str, tuple[int, ...] | None]] = [
            (r"^blocks\.(\d+)" if coarse else r"^blocks\.(\d+)\.(\d+)", None)]
        if head:  # (none left after prune_intermediate_layers)
            blocks.append(("|".join(head), (99999,)))
        return {"stem": r"^conv_stem|bn1", "blocks": blocks}

    def no_weight_decay(self) -> set[str]:
        """timm's: no parameter is exempted by name (its optimizer factory already exempts
        biases and norm weights, the 1-d parameters)."""
        return set()
