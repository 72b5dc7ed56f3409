"""The corruption-stage lab: a CPU-scale latent diffusion model and the few-shot fine-tuning studies judged by the
package's stage judge. Run from the repository root: `python -m examples.corruption_stage` (see README.md there).
Code in ``model/`` (data, model, pretraining), ``study/`` (arms, runs, studies, controls, lab v2's gate and
experiment) and ``report/`` (figures and readings); plans in ``PLAN_V2.md`` and ``PLAN_V3.md``; findings in
``RESULTS.md``; outputs in ``results/<study>/``.
"""
