"""Which parameters train in which epoch (Lightning's fine-tuning callback, as a small object apart from the
step): the new head alone for ``freeze_epochs``, then the whole network or its last convolutional block and
everything after it. Frozen parameters get no gradient, so the one Adam optimizer leaves them as they are, and
batch-norm layers whose parameters are all frozen stay in eval mode, so their running statistics do not drift
either."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from ..features.backbones import BackboneSpec


class FreezeSchedule:
    def __init__(self, spec: BackboneSpec, freeze_epochs: int, unfreeze: str):
        if unfreeze == "last_block" and spec.last_block is None:
            raise ConfigError(f"{spec.name}'s last block is not known (its timm feature_info names no module of the "
                              "network), so finetune.unfreeze=last_block cannot be honoured; use unfreeze: all")
        self.spec, self.freeze_epochs, self.unfreeze = spec, freeze_epochs, unfreeze

    def first_trained(self, epoch: int) -> str | None:
        """The module from which on (in parameter order) parameters train in ``epoch``; None: all of them."""
        if epoch < self.freeze_epochs:
            return self.spec.head
        return self.spec.last_block if self.unfreeze == "last_block" else None

    def apply(self, model: nn.Module, epoch: int) -> int:
        """Put ``model`` in training mode for ``epoch``: ``requires_grad`` set, frozen batch-norm layers in eval
        mode; returns how many parameters train."""
        start = self.first_trained(epoch)
        training = start is None
        count = 0
        for name, parameter in model.named_parameters():
            training = training or name.startswith(f"{start}.")
            parameter.requires_grad_(training)
            count += parameter.numel() if training else 0
        model.train()
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in module.parameters()):
                module.eval()
        return count
