"""The DreamBooth trainer behind `examples/train_dreambooth_bayes_lora.py`, one module per job.

- `arguments`, `training_arguments`: the command line (every option, its help and default).
- `settings`: the options checked before any model loads, resolved into read-only `Settings`; `errors`: the error
  the command line reports with exit status 2.
- `families/`: what differs between the model families, one class per family.
- `sources`: where the instance images and their prompts come from (a folder with caption files, an imagefolder, a
  saved or Hub dataset).
- `data`: instance and class images loaded, cropped and batched; class images generated.
- `adapters`: the Bayesian LoRA config, checkpoints, the exported mean LoRA; `targets`: the LoRA target names checked
  against the model before any weights load.
- `outputs`: what a run writes into `--output_dir`, and the guard against mixing with a previous run.
- `quantized_base`: the denoiser loaded, quantised with `--quantize_base` (at load time through diffusers' config
  where it loads, else after loading).
- `training`: `main()` step by step (setup, models, data, optimizer); `loop`: the loop and the final save/export.
- `losses`, `validation`: the denoising losses; validation images, the corruption monitor and the metrics.
- `stage_monitor`: `<output_dir>/monitor.jsonl`, the records `bayes-adapter stage` judges for the corruption stage.
"""
