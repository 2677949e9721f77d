"""A tiny base model worth a speed LoRA, and a speed LoRA distilled from it, for tests/test_frozen_loras.py.

Why not the tiny random WAN model itself: it barely denoises, so its 4-step samples are already its 30-step ones
(MSE 0.008 on latents of variance 1.35) and guidance changes nothing (3, 5 or 8: the same 0.008); a speed LoRA has
nothing to do there. A real base has learned a distribution, and its many-step guided samples differ from its 4-step
unguided ones, which is what speed LoRAs (lightx2v, Lightning) fix. So:

- `pretrain_base`: the tiny random model's transformer is fully trained by flow matching (the shift and σ sampling of
  the stock scheduler, 10% of captions dropped as bases are trained for guidance) on twelve 9-frame windows of four
  clips (never the bunny clip the new LoRA learns), written as a diffusers folder the stock pipeline loads.
- `distill_speed_lora`: a LoRA on that base trained so that the stock `WanPipeline`'s own 4-step, guidance-1 loop
  (its `__call__` run with gradients, through the stock scheduler) lands where the same pipeline lands from the same
  noise in 30 steps at guidance 5 (WAN's default guidance, empty negative prompt): trajectory distillation on
  teacher samples, which is how speed LoRAs are made; no clip is involved. Written in ComfyUI's names, as the
  speed LoRAs people download are (via `motiontune lora convert`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from motiontune.cli import main

ROOT = Path(__file__).parent.parent
PROMPT = "moving shapes"
# (file, caption, window starts in seconds): 9 frames 1/16 s apart each, at 32 x 32
PRETRAINING = [(ROOT / "motiontune/demo/clips/chaplin.mp4", "old silent comedy film, black and white, a man walking", (0, 1, 2)),
               (ROOT / "motiontune/demo/clips/pigs.mp4", "cartoon animation, pigs dancing", (0, 1, 1.9)),
               (ROOT / "motiontune/demo/clips/shapes.mp4", PROMPT, (0, 1, 2)),
               (ROOT / "tests/data/shapes_200px_30fps.mp4", PROMPT, (2, 5, 8))]
TEACHER = {"steps": 30, "guidance": 5.0}
SPEED = {"steps": 4, "guidance": 1.0}
LATENT_SHAPE = (16, 3, 4, 4)  # 9 frames at 32 x 32 through the tiny VAE


def _pipeline(model: Path):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(seeds) -> torch.Tensor:
    return torch.cat([torch.randn(1, *LATENT_SHAPE, generator=torch.Generator().manual_seed(s)) for s in seeds])


def sample(pipe, latents: torch.Tensor, steps: int, guidance: float, grad: bool = False) -> torch.Tensor:
    """The stock pipeline's latents (normalised) from these starting latents; with `grad`, its loop with gradients."""
    n = latents.shape[0]
    cond, negative = pipe.encode_prompt(PROMPT, negative_prompt="", do_classifier_free_guidance=True)
    keys = dict(prompt_embeds=cond.expand(n, -1, -1).detach(), latents=latents.clone(), height=32, width=32,
                num_frames=9, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                negative_prompt_embeds=negative.expand(n, -1, -1).detach() if guidance > 1 else None)
    if grad:  # `__call__` is wrapped in no_grad; its undecorated body is the same loop
        return type(pipe).__call__.__wrapped__(pipe, **keys).frames
    return pipe(**keys).frames


def pretrain_base(tiny_model: Path, out: Path, iterations: int, learning_rate: float = 1e-3, seed: int = 0) -> Path:
    from motiontune.data.video import decode_frames

    pipe = _pipeline(tiny_model)
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    latents, captions = [], []
    with torch.no_grad():
        for path, caption, starts in PRETRAINING:
            for start in starts:
                frames = decode_frames(path, [start + i / 16 for i in range(9)], (32, 32))
                pixels = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
                latents.append((vae.encode(pixels).latent_dist.mean - mean) / std)
                captions.append(caption)
        texts = {c: pipe.encode_prompt(c, do_classifier_free_guidance=False)[0] for c in {*captions, ""}}
    x0, text = torch.cat(latents), torch.cat([texts[c] for c in captions])
    transformer, shift = pipe.transformer, pipe.scheduler.config.shift
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(iterations):
        rows = torch.randint(len(x0), (8,), generator=generator)
        clean, prompt = x0[rows], text[rows].clone()
        prompt[torch.rand(8, generator=generator) < 0.1] = texts[""]
        u = torch.rand(8, generator=generator)
        sigma = (shift * u / (1 + (shift - 1) * u)).view(-1, 1, 1, 1, 1)  # the stock scheduler's shift
        eps = torch.randn(clean.shape, generator=generator)
        velocity = transformer((1 - sigma) * clean + sigma * eps, sigma.flatten() * 1000, prompt, return_dict=False)[0]
        loss = ((velocity - (eps - clean)) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pipe.save_pretrained(out)
    return out


def distill_speed_lora(base: Path, out: Path, iterations: int, teacher_seeds, rank: int = 16,
                       learning_rate: float = 3e-3, seed: int = 0) -> Path:
    """A COMFY_LORA file at `out` (rank = alpha = `rank`, every Linear of the blocks)."""
    from diffusers import WanPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = _pipeline(base)
    starts = noise(teacher_seeds)
    with torch.no_grad():
        teacher = sample(pipe, starts, TEACHER["steps"], TEACHER["guidance"])
    transformer = pipe.transformer
    modules = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")]
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=modules, init_lora_weights="gaussian")
    torch.manual_seed(seed)  # the adapter's initial factors
    transformer.add_adapter(config, adapter_name="speed")
    for name, parameter in transformer.named_parameters():
        parameter.requires_grad_("lora" in name)
    optimizer = torch.optim.AdamW([p for p in transformer.parameters() if p.requires_grad], lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(iterations):
        rows = torch.randint(len(starts), (8,), generator=generator)
        loss = ((sample(pipe, starts[rows], SPEED["steps"], SPEED["guidance"], grad=True) - teacher[rows]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    diffusers_file = out.with_name(out.stem + "-diffusers.safetensors")
    WanPipeline.save_lora_weights(out.parent, weight_name=diffusers_file.name,
                                  transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name="speed"),
                                  transformer_lora_adapter_metadata=config.to_dict())
    assert main(["lora", "convert", str(diffusers_file), str(out), "--to", "COMFY_LORA",
                 "--model-type", "WAN_2_1_T2V", "--model", str(base)]) == 0
    return out
