"""Z-Image: a flow-matching DiT conditioned on a Qwen3 text encoder's states."""

from __future__ import annotations

import torch

from .base import (
    FlowMatchingFamily,
    text_only_pipeline,
)


class ZImage(FlowMatchingFamily):
    """Z-Image: a Qwen3 text encoder (its second-to-last hidden states of the prompt's tokens, frozen), the
    transformer taking lists of per-image latents `(C, 1, H, W)` and of prompt states, the time as `1 - sigma`, and
    predicting the negated velocity."""

    name = "zimage"
    label = "Z-Image"
    pipeline_class = "ZImagePipeline"
    class_name_prefixes = ("ZImagePipeline", "ZImageImg2ImgPipeline")
    text_encoders = ("text_encoder",)
    trainable_text_encoders = ()  # a 4B-parameter language model: it stays frozen
    default_targets = "attention.to_q,attention.to_k,attention.to_v,attention.to_out.0"
    resolution_multiple = 16  # the VAE downsamples by 8, and the transformer patches 2x2
    default_max_sequence_length = 512
    default_weighting_scheme = "none"

    def encode_prompts(self, text_encoders, tokenizers, prompts, device, max_sequence_length=None):
        from diffusers import ZImagePipeline

        pipeline = text_only_pipeline(ZImagePipeline, text_encoders[0], tokenizers[0])
        states, _ = pipeline.encode_prompt(
            list(prompts),
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length or self.default_max_sequence_length,
        )
        # One tensor per prompt, as long as its tokens: padded into a batch with a mask (`PromptCache` pads too).
        lengths = torch.tensor([len(s) for s in states], device=states[0].device)
        padded = torch.nn.utils.rnn.pad_sequence(states, batch_first=True)
        mask = (torch.arange(padded.shape[1], device=padded.device)[None] < lengths[:, None]).long()
        return {"encoder_hidden_states": padded, "mask": mask}

    def predict(self, denoiser, noisy, timesteps, cond, time_ids=None, guidance_scale=None):
        states, mask = cond["encoder_hidden_states"], cond["mask"].bool()
        outputs = denoiser(
            list(noisy.unsqueeze(2).unbind(0)),
            (1000 - timesteps) / 1000,  # the pipeline's time: 1 - sigma
            [state[keep] for state, keep in zip(states, mask)],
            return_dict=False,
        )[0]
        return -torch.stack(outputs).squeeze(2)  # the transformer predicts the negated velocity
