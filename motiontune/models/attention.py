"""Frame-local self-attention (`video_config.use_temporal_attention: false`) for transformers that order their
tokens frame by frame: each frame's tokens attend only to each other."""

from __future__ import annotations

from ..util.lazy import torch


class FrameLocalAttention:
    """Self-attention restricted to the tokens of each latent frame, by reshaping: (B, F·S, C) → (B·F, S, C)
    through the model's own attention processor, rotary embeddings sliced to match. `frames` is set per forward
    (see `use_frame_local_attention`)."""

    def __init__(self, processor):
        self.processor = processor
        self.frames = 1

    def __getattr__(self, name):  # attention backend and other settings stay the wrapped processor's
        return getattr(self.processor, name)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kwargs):
        batch, tokens, channels = hidden_states.shape
        frames = self.frames
        local = hidden_states.reshape(batch * frames, tokens // frames, channels)
        if rotary_emb is not None:  # (1, F·S, 1, D) → (B·F, S, 1, D), frame f of every sample gets frame f's angles
            rotary_emb = tuple(r.reshape(frames, tokens // frames, 1, -1).repeat(batch, 1, 1, 1) for r in rotary_emb)
        out = self.processor(attn, local, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        return out.reshape(batch, tokens, -1)


def use_frame_local_attention(module: torch.nn.Module, attentions: list, patch_frames: int, enabled: bool) -> None:
    """Swap the self-attention modules `attentions` of `module` to frame-local ones (`enabled`) or back to the stock
    processors. The wrappers are made once; a forward pre-hook tells them the frame count of each batch
    (latent frames of the input, whose dimension 2 is time, over the temporal patch size)."""
    if not hasattr(module, "_motiontune_frame_local"):
        processors = [FrameLocalAttention(attention.processor) for attention in attentions]

        def count_frames(_, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            for processor in processors:
                processor.frames = hidden.shape[2] // patch_frames

        module.register_forward_pre_hook(count_frames, with_kwargs=True)
        module._motiontune_frame_local = processors
    for attention, processor in zip(attentions, module._motiontune_frame_local):
        attention.set_processor(processor if enabled else processor.processor)
