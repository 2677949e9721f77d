"""The moments of a run besides the training step: encoding clips and captions (a first run fills the cache), a
live text encoder beside the step, and rendering a sample, its parts taking turns on the device as the families'
`sample` does it (first frame, denoising, decoding)."""

from __future__ import annotations

import json
from dataclasses import replace

import torch

from ..config import TrainConfig
from ..models.fake_memory import LiveBytes, fakeify, quiet, simulate_no_grad
from .configs import family, load_dtype, part_configs
from .result import CAPTIONS, DECODE_LINE, DECODING, DENOISING, ENCODING, FIRST_FRAME, Line, Shape
from .simulation import denoise_peak
from .weights import elem, module_bytes, optimizer_state_bytes, stored_text_encoder_bytes


def text_live(config: TrainConfig) -> bool:
    """Whether the text encoder runs with gradients every step (an embedding or the text encoder trains)."""
    return config.training_method == "EMBEDDING" or bool(config.additional_embeddings) or config.text_encoder.train


def _text_encoders(config: TrainConfig, layers: int | None = None) -> list[tuple[str, torch.nn.Module]]:
    configs = part_configs(config)
    if layers is not None:  # a short copy of a single text encoder (the one that trains live)
        cfg = configs["text_encoder"]
        configs["text_encoder"] = dict(cfg, **{k: layers for k in ("num_layers", "num_hidden_layers") if k in cfg})
    return family(config).estimate_text_encoders(configs)


_TEXT: dict = {}


def text_encoder_lines(config: TrainConfig, shape: Shape, on_cpu: bool) -> list[Line]:
    """The text encoder on the device during training (embeddings or text-encoder training)."""
    key = (shape.batch, on_cpu, config.model_dump_json())
    from .result import EstimateError

    if key not in _TEXT:
        from ..util.sim_cache import cached

        def made():  # the lines, or the refusal (kept too: building the encoders to refuse takes seconds)
            try:
                return [vars(line) for line in _text_encoder_lines(config, shape, on_cpu)]
            except EstimateError as refusal:
                return {"refused": str(refusal)}

        on_disk = (key, json.dumps(part_configs(config), sort_keys=True))  # a local folder's configs may change
        _TEXT[key] = cached("text_live", on_disk, made)
    if "refused" in _TEXT[key]:
        raise EstimateError(_TEXT[key]["refused"])
    return [Line(**line) for line in _TEXT[key]]


def _text_encoder_lines(config: TrainConfig, shape: Shape, on_cpu: bool) -> list[Line]:
    encoders = _text_encoders(config)
    if len(encoders) != 1:
        from .result import EstimateError

        raise EstimateError(f"model_type {config.model_type}: a text encoder that trains live is modelled for WAN only")
    name, encoder = encoders[0]
    dtype = torch.float32 if on_cpu else load_dtype(config)  # the family's text_dtype
    weights = module_bytes(encoder, dtype)
    layers = encoder.config.num_layers
    tokens = family(config).text_tokens

    def kept(depth: int) -> int:
        model = _text_encoders(config, depth)[0][1].to(dtype).eval()  # loaded in eval mode, never switched
        model.requires_grad_(config.text_encoder.train)
        mode = torch._subclasses.fake_tensor.FakeTensorMode()
        fakeify(model, mode)
        with mode:
            embeds = torch.empty(shape.batch, tokens, encoder.config.d_model, dtype=dtype, requires_grad=True)
            mask = torch.ones(shape.batch, tokens, dtype=torch.long)
        tracker = LiveBytes([*model.parameters(), *model.buffers(), embeds, mask])
        with mode, tracker, quiet():
            hidden = model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            alive = tracker.current  # what stays alive for backward through the transformer step
        del hidden
        return alive

    two, three = kept(2), kept(3)
    lines = [Line("text encoder weights (trains live)", weights, 0, f"{name} in {str(dtype).replace('torch.', '')}"),
             Line("text encoder activations", three + (layers - 3) * (three - two), 0,
                  f"{shape.batch} × {tokens} tokens, kept for backward")]
    if config.text_encoder.train:
        trained = weights - encoder.get_input_embeddings().weight.numel() * elem(dtype)  # all but the token table
        lines.append(Line("text encoder gradients + optimizer state",
                          trained + optimizer_state_bytes([((trained // elem(dtype),), dtype)], config), 0, ""))
    return lines


_ENCODERS: dict = {}


def encoder_facts(config: TrainConfig, on_cpu: bool) -> tuple[int, str, int]:
    """(the VAE's bytes, the text encoders' names, their bytes as loaded): counted once per model and dtype (building
    them on the meta device takes a second or two; a planner asks for every option set)."""
    text_dtype = torch.float32 if on_cpu else load_dtype(config)
    key = (config.model_type, config.base_model_name, config.text_encoder.weight_dtype, str(text_dtype),
           str(family(config).vae_dtype), json.dumps(part_configs(config), sort_keys=True))
    if key not in _ENCODERS:
        from ..util.sim_cache import cached

        def count():
            owner = family(config)
            vae_bytes = module_bytes(owner.estimate_vae(part_configs(config)["vae"]), owner.vae_dtype)
            encoders = _text_encoders(config)
            return (vae_bytes, " + ".join(name for name, _ in encoders),
                    sum(stored_text_encoder_bytes(config, encoder, text_dtype) for _, encoder in encoders))

        _ENCODERS[key] = tuple(cached("encoders", key, count))
    return _ENCODERS[key]


def other_phases(config: TrainConfig, shape: Shape, cfg: dict, transformers: int, left: int, quantized: str | None,
                 on_cpu: bool, reserve: list[Line]) -> tuple[dict[str, list[Line]], int]:
    """Encoding (the VAE and the text encoders, before training, when something is not cached), and rendering a
    sample: on an accelerator its parts take turns on the device (the VAE encoding a given first frame, the
    transformer denoising, the VAE decoding) beside what training leaves there (`left`: optimizer state, a live
    text encoder). `reserve`: the CUDA lines every moment carries. (the phases, bytes of the sample's decoding in
    tiles: 0 without samples)."""
    from .shapes import make_shape

    owner = family(config)
    vae_cfg = part_configs(config)["vae"]
    vae_bytes, names, text_bytes = encoder_facts(config, on_cpu)
    vae_weights = f"VAE weights ({str(owner.vae_dtype).removeprefix('torch.')})"
    vae_key = json.dumps(vae_cfg, sort_keys=True)

    def encoded(frames: int, height: int, width: int) -> int:
        return simulate_no_grad(("encode", vae_key, frames, height, width, owner.vae_dtype), lambda: owner.estimate_vae(vae_cfg),
                                lambda: (torch.empty(owner.estimate_pixels(frames, height, width), dtype=owner.vae_dtype),),
                                lambda model, x: model.encode(x).latent_dist.mean)

    image_encoder = getattr(owner, "estimate_image_encoder_bytes", lambda: 0)()
    clip = [Line("CLIP image encoder (float32)", image_encoder)] if image_encoder else []
    phases = {ENCODING: [Line(vae_weights, vae_bytes),
                         Line(f"VAE encoding one clip ({shape.frames} × {shape.width}x{shape.height})",
                              encoded(shape.frames, shape.height, shape.width))] + clip + reserve}
    storage = config.text_encoder.weight_dtype or str(load_dtype(config)).replace("torch.", "")
    phases[CAPTIONS] = [Line("text encoder weights", text_bytes, 0, f"{names} ({storage}); the VAE waits in host memory")] + reserve
    samples = list(config.samples) if config.samples and config.sample_after_unit != "NEVER" else []
    if config.experts_on == "split":  # the run renders no samples (each process holds one expert)
        samples = []
    if not samples:
        return phases, 0

    def size(sample) -> Shape:
        return make_shape(config, 1, sample.frames, sample.height, sample.width)

    largest = size(max(samples, key=lambda s: s.frames * s.height * s.width))
    what = f"{largest.frames} × {largest.width}x{largest.height}"
    kept = [Line("left on the device by training", left, 0,
                 "optimizer state" + (", the live text encoder" if text_live(config) else ""))] if left else []
    vae = [Line(vae_weights, vae_bytes)]
    transformer = [Line("the transformer", transformers, 0,
                        "one A14B expert at a time, each brought in when the pipeline calls it"
                        if getattr(owner, "is_a14b", False) and not on_cpu else "")]
    with_image = [s for s in samples if s.image] if hasattr(owner, "estimate_first_frame") else []
    if with_image:
        first = size(max(with_image, key=lambda s: s.frames * s.height * s.width))
        frames = owner.estimate_first_frame(first.frames)
        phases[FIRST_FRAME] = vae + clip + [
            Line("VAE encoding the first frame", encoded(frames, first.height, first.width), 0,
                 f"{frames} × {first.width}x{first.height}" + (" (the other frames empty)" if frames > 1 else ""))
        ] + kept + (transformer if on_cpu else []) + reserve
    phases[DENOISING] = transformer + [
        Line("one transformer forward", denoise_peak(cfg, config, largest.latent, quantized), 0, f"{what}, no grad"),
    ] + kept + (vae + clip if on_cpu else []) + reserve
    whole, tiled = owner.estimate_decode(vae_cfg, largest.latent, False), owner.estimate_decode(vae_cfg, largest.latent, True)
    tiles = f"; in tiles {tiled / 2**30:.1f} GB (used when whole frames do not fit)" if tiled != whole else ""
    phases[DECODING] = vae + [Line(DECODE_LINE, whole, 0, f"{what}, whole frames{tiles}")] + kept + \
        (transformer + clip if on_cpu else []) + reserve
    return phases, tiled
