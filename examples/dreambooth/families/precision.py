"""The precisions a run's components are kept in: the dtype of a precision name, and methods that run outside
mixed-precision autocast (a component the family keeps in another dtype than the run's)."""

from __future__ import annotations

import torch


def half_precision_dtype(precision: str | None) -> torch.dtype | None:
    """The dtype of a precision name ("fp16", "bf16", as accelerate's `mixed_precision` and
    `--prior_generation_precision` spell it); None for full precision ("no", "fp32", None)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)


class _OutsideAutocast:
    """`module.<method>` run with autocast disabled, in the module's own dtype (an object, not a closure: a deep copy
    of the module gets one bound to the copy, and the module still pickles)."""

    runs_outside_autocast = True

    def __init__(self, module: torch.nn.Module, original, cast_inputs: bool):
        self.module, self.original, self.cast_inputs = module, original, cast_inputs

    def __call__(self, *args, **kwargs):
        tensors = [v for v in (*args, *kwargs.values()) if torch.is_tensor(v)]
        if self.cast_inputs:
            dtype = self.module.dtype

            def cast(value):
                return value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value

            args, kwargs = tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
        # the inputs' device: with CPU offload the module's weights still sit on the CPU when it is called
        device = tensors[0].device if tensors else self.module.device
        with torch.autocast(device.type, enabled=False):
            return self.original(*args, **kwargs)


def run_outside_autocast(module: torch.nn.Module, method: str, cast_inputs: bool) -> None:
    """Replaces `module.<method>` (once) with one that runs with autocast disabled, in the module's own dtype; with
    `cast_inputs`, floating tensor arguments are first cast to that dtype."""
    original = getattr(module, method)
    if not getattr(original, "runs_outside_autocast", False):
        setattr(module, method, _OutsideAutocast(module, original, cast_inputs))
