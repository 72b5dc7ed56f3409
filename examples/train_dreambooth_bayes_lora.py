#!/usr/bin/env python
"""DreamBooth-style few-shot fine-tuning of Stable Diffusion (1.x, 2.x, XL, 3/3.5), Flux.1, Flux.2, Qwen-Image, Z-Image
or SANA with Bayesian LoRA.

The structure follows diffusers' `examples/dreambooth/train_dreambooth_lora.py`: instance images and an instance
prompt, optional prior preservation with class images, accelerate for devices, processes, mixed precision,
checkpoints and trackers. The differences: the LoRA adapters are `bayes_adapter.BayesLoraConfig` adapters (a learnt
posterior standard deviation per Bayesian LoRA weight, sampled while training), the loss adds the weighted KL to the
prior, and the final output is the posterior *mean* as a plain LoRA that `pipe.load_lora_weights(output_dir)` loads
without this package. The whole Bayesian adapter (means and standard deviations) is kept next to it.

The model family is read from the pipeline's `model_index.json` (`_class_name`), not from a flag: SD 1.x/2.x and
SDXL UNets are trained by noise (or v) prediction, the transformers (SD3, Flux, ...) by flow matching with the sigmas drawn by
`--weighting_scheme`, as diffusers' `train_dreambooth_lora_sd3.py` / `_flux.py` do. The trainer lives in the package
`examples/dreambooth/` beside this script (`dreambooth/families/` holds what differs between the families).

Example (see examples/README.md for the paper's setting):

    accelerate launch examples/train_dreambooth_bayes_lora.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --instance_data_dir ./dog --instance_prompt "a photo of sks dog" \
        --output_dir ./bayes-lora-dog --resolution 512 --rank 4 --learning_rate 1e-4 --max_train_steps 2400
"""

import sys

# Run as a script, this file's folder is first on sys.path: the trainer package beside it imports as `dreambooth`.
from dreambooth.settings import ArgumentsError, Settings, parse_args
from dreambooth.training import main, run_command


__all__ = ["ArgumentsError", "Settings", "main", "parse_args", "run_command"]  # for callers that embed the script


if __name__ == "__main__":
    sys.exit(run_command())
