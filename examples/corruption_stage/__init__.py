"""The corruption-stage lab: a CPU-scale latent diffusion model and the few-shot fine-tuning experiment.

Run from the repository root: `python -m examples.corruption_stage` (`--help` for the options). Code: ``data``
(procedural images), ``models`` (autoencoder, condition embedding, UNet; save/load), ``pretrain``, ``diffusion``
(loss, DDIM sampling, learned width), ``experiment`` (the arms and the measurement loop), ``report`` (figure, JSON,
markdown) and ``__main__`` (the command). Weights in ``base_model/``, what the runs found in ``RESULTS.md``, their
outputs in ``results/``.
"""
