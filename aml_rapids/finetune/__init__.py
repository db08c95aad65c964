"""Fine-tuning a registry network with a new head on a manifest's training split (``aml-rapids finetune``)."""
