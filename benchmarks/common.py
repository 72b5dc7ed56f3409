"""What the benchmark scripts share: models built from configs, adapters, timing, memory sampling, reports.

Nothing here touches the Hub: every model is built from a config with random weights. The scripts are meant to be
run from the repository root as modules of the `benchmarks` package (`python -m benchmarks.bench_train_step ...`); each prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


REPO_ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402 (after the Hub environment above)

from tests.tiny_models import TINY_UNET_CONFIG  # noqa: E402


RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
ATTN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
CONV_TARGETS = ("conv1", "conv2")
TARGET_SETS = {"attn": ATTN_TARGETS, "attn+conv": ATTN_TARGETS + CONV_TARGETS}
ESTIMATORS = ("weight", "local", "flipout")
FACTORS = ("A", "B", "AB")
PLAIN = "plain"

# UNet2DConditionModel configs. "tiny": the one tests/tiny_models.py uses (diffusers' tests); "small": the UNet of
# the team notes' measured step (block_out_channels (32, 64)); "sd15": SD1.5's UNet config (~860M parameters).
UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": TINY_UNET_CONFIG,
    "small": dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    ),
    "sd15": dict(
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
    ),
}
# Tokens of the random text conditioning: SD1.5's 77, fewer for the small models.
TEXT_TOKENS = {"tiny": 16, "small": 16, "sd15": 77}


# --- set-up ---------------------------------------------------------------------------------------------------------


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (default 1: the machine is shared)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (cuda is accepted but untested in this session)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON output path (default: benchmarks/results/...)")
    return parser


def setup(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


def dtype_of(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_unet(size: str, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIGS[size])


def share_base_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `model` whose parameters and buffers are the very tensors of `model` (no extra weight memory).

    Each benchmark arm gets its own module tree (its own adapter) over one set of frozen base weights.
    """
    memo: dict[int, Any] = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def lora_config(arm: str, targets: Sequence[str], r: int = 4, kl_weight: float = 1.0):
    """The adapter config of an arm: "plain" (PEFT LoraConfig) or "<estimator>_<factors>[-<parametrisation>][+unbounded]"
    (BayesLoraConfig; the posterior-std parametrisation defaults to the library's, e.g. weight_B-softplus for 0.1.0's;
    "+unbounded": `posterior_std_max=None`, without the default std bound, as before it existed)."""
    common = dict(r=r, lora_alpha=r, target_modules=list(targets), init_lora_weights=True)
    if arm == PLAIN:
        from peft import LoraConfig

        return LoraConfig(**common)
    from bayes_adapter import BayesLoraConfig

    estimator, factors, parametrisation, bounded = parse_arm(arm)
    extra = {"posterior_std_parametrisation": parametrisation} if parametrisation else {}
    if not bounded:
        extra["posterior_std_max"] = None
    return BayesLoraConfig(**common, estimator=estimator, bayesian_factors=factors, kl_weight=kl_weight, **extra)


def parse_arm(arm: str) -> tuple[str, str, str | None, bool]:
    """`(estimator, factors, parametrisation or None, bounded)` of a Bayesian arm's name."""
    from bayes_adapter.bayes import POSTERIOR_STD_PARAMETRISATIONS

    spec, plus, suffix = arm.partition("+")
    name, _, parametrisation = spec.partition("-")
    estimator, _, factors = name.partition("_")
    if (
        estimator not in ESTIMATORS
        or factors not in FACTORS
        or (parametrisation and parametrisation not in POSTERIOR_STD_PARAMETRISATIONS)
        or (plus and suffix != "unbounded")
    ):
        raise ValueError(
            f"unknown arm {arm!r}: 'plain' or '<estimator>_<factors>[-<parametrisation>][+unbounded]', e.g. weight_B, "
            "weight_B-softplus or weight_B+unbounded"
        )
    return estimator, factors, parametrisation or None, not plus


def all_arms(estimators: Sequence[str] = ESTIMATORS, factors: Sequence[str] = FACTORS) -> list[str]:
    return [PLAIN] + [f"{e}_{f}" for e in estimators for f in factors]


def add_adapter(
    unet: torch.nn.Module, arm: str, targets: Sequence[str], r: int = 4, seed: int = 0, kl_weight: float = 1.0
) -> torch.nn.Module:
    """Injects the arm's adapter with diffusers' `add_adapter` (the path users take); same seed, same initial A."""
    import bayes_adapter  # noqa: F401  (registers the Bayesian tuner with PEFT)

    torch.manual_seed(seed)
    unet.add_adapter(lora_config(arm, targets, r=r, kl_weight=kl_weight))
    return unet


def randomise_lora(unet: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Gives every lora_A / lora_B a non-zero random value (a "trained" adapter), identical for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(unet.named_parameters()):
            if ".lora_A." in name or ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count(params: Sequence[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


# --- training step --------------------------------------------------------------------------------------------------


@dataclass
class TrainInputs:
    noisy: torch.Tensor
    timesteps: torch.Tensor
    text: torch.Tensor
    target: torch.Tensor


def train_inputs(
    size: str, batch: int, latent: int, device: str = "cpu", dtype=torch.float32, seed: int = 0
) -> TrainInputs:
    cfg = UNET_CONFIGS[size]
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, cfg["in_channels"], latent, latent)
    return TrainInputs(
        noisy=torch.randn(shape, generator=generator).to(device, dtype),
        timesteps=torch.randint(0, 1000, (batch,), generator=generator).to(device),
        text=torch.randn((batch, TEXT_TOKENS[size], cfg["cross_attention_dim"]), generator=generator).to(
            device, dtype
        ),
        target=torch.randn(shape, generator=generator).to(device, dtype),
    )


class Trainer:
    """One arm: a UNet with its adapter and an AdamW over its trainable parameters; `step()` is one training step.

    The step is what a fine-tuning loop does: forward, MSE to the noise target, plus `kl_loss` for a Bayesian adapter
    (with kl_weight > 0 it computes the closed-form KL), backward, AdamW step, zero_grad. `optim`: "adamw" (torch's
    default implementation: a per-tensor loop on CPU, foreach on CUDA), "adamw-foreach" or "adamw-fused".
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        arm: str,
        inputs: TrainInputs,
        lr: float = 1e-4,
        include_kl: bool = True,
        optim: str = "adamw",
    ):
        self.unet, self.arm, self.inputs = unet, arm, inputs
        self.unet.train()
        self.params = trainable_parameters(unet)
        kwargs = {"adamw": {}, "adamw-foreach": {"foreach": True}, "adamw-fused": {"fused": True}}[optim]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, **kwargs)
        self.include_kl = include_kl and arm != PLAIN

    def loss(self) -> torch.Tensor:
        i = self.inputs
        prediction = self.unet(i.noisy, i.timesteps, encoder_hidden_states=i.text).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), i.target.float())
        if self.include_kl:
            import bayes_adapter

            loss = loss + bayes_adapter.kl_loss(self.unet, num_examples=1)
        return loss

    def step(self) -> float:
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


# --- timing ---------------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], device: str = "cpu") -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, result) of one call."""
    synchronize(device)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    result = fn()
    synchronize(device)
    return time.perf_counter() - wall0, time.process_time() - cpu0, result


def interleaved(
    arms: dict[str, Callable[[], Any]],
    rounds: int,
    warmup: int = 1,
    device: str = "cpu",
    on_round: Callable[[int], None] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Runs every arm once per round, A, B, C, A, B, C, ..., the order rotated each round so no arm always goes first.

    Returns per arm the list of wall and CPU times, and `loadavg`, the 1-minute load average after each round.
    """
    names = list(arms)
    for _ in range(warmup):
        for name in names:
            arms[name]()
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    load = []
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            wall, cpu, _ = timed(arms[name], device)
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
        load.append(os.getloadavg()[0])
        if on_round is not None:
            on_round(r)
    times["_load"] = {"loadavg_1min": load}
    return times


def summarise(times: dict[str, dict[str, list[float]]], baseline: str) -> dict[str, dict[str, float]]:
    """Median wall / CPU time per arm, the ratio of medians to the baseline's, and the median of per-round ratios."""
    out = {}
    base = times[baseline]
    for name, t in times.items():
        if name.startswith("_"):
            continue
        paired = [a / b for a, b in zip(t["wall"], base["wall"])]
        paired_cpu = [a / b for a, b in zip(t["cpu"], base["cpu"])]
        out[name] = {
            "n": len(t["wall"]),
            "median_wall_s": statistics.median(t["wall"]),
            "min_wall_s": min(t["wall"]),
            "median_cpu_s": statistics.median(t["cpu"]),
            "ratio_wall": statistics.median(t["wall"]) / statistics.median(base["wall"]),
            "ratio_cpu": statistics.median(t["cpu"]) / statistics.median(base["cpu"]),
            "paired_ratio_wall": statistics.median(paired),
            "paired_ratio_cpu": statistics.median(paired_cpu),
        }
    return out


# --- memory ---------------------------------------------------------------------------------------------------------


def current_rss() -> int:
    """Resident set size of this process in bytes, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss() -> int:
    """Lifetime peak RSS of this process in bytes (`getrusage(RUSAGE_SELF).ru_maxrss`, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssSampler:
    """Samples this process's RSS from a background thread (every `interval` s) while active: the peak of a phase."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = current_rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())


# --- reports --------------------------------------------------------------------------------------------------------


def machine_info(args: argparse.Namespace | None = None) -> dict[str, Any]:
    import diffusers
    import peft

    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "diffusers": diffusers.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args is not None:
        info["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return info


def write_json(payload: dict[str, Any], path: Path | None, default_name: str) -> Path:
    path = path or RESULTS_DIR / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    payload.setdefault("machine", {})["loadavg_end"] = os.getloadavg()
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table; columns are (key, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, rule]
    for row in rows:
        cells = []
        for key, _, spec in columns:
            value = row.get(key, "")
            cells.append(format(value, spec) if spec and isinstance(value, (int, float)) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_line(machine: dict[str, Any]) -> str:
    start = ", ".join(f"{x:.2f}" for x in machine["loadavg_start"])
    end = ", ".join(f"{x:.2f}" for x in machine.get("loadavg_end", os.getloadavg()))
    return f"torch threads {machine['torch_threads']}; load average (1, 5, 15 min) start {start}, end {end}"
