"""The corruption-stage lab: a CPU-scale latent diffusion model and the few-shot fine-tuning experiment run by
``examples/corruption_stage.py``. Modules: ``data`` (procedural images), ``models`` (autoencoder, condition
embedding, UNet; save/load), ``pretrain``, ``diffusion`` (loss, DDIM sampling, learned width), ``experiment``
(the arms and the measurement loop) and ``report`` (figure, JSON, markdown)."""
