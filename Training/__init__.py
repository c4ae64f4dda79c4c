"""Medical SAM3 training: full fine-tuning of SAM3's detector on medical volumes (text-prompted).

Stages, one module each: ``data`` (dataset JSON, validation, slice sampling, the engine's own
preprocessing), ``model`` (transformers' Sam3Model with every decoder layer's outputs),
``matcher`` (one-to-one Hungarian and one-to-many assignment), ``losses``, ``optim``
(parameter groups, layer-wise LR decay, schedule) and ``train`` (the loop: DDP, checkpoints,
validation, export). Run ``medsam3-train --config Training/configs/NAME.yaml``.
"""
