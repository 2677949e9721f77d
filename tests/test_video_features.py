"""The video_config training features: frame-local attention, frame dropout, compression ratios,
temporal consistency."""

from __future__ import annotations

import torch

from conftest import DATA, base_config
from motiontune.config import TrainConfig
from motiontune.models.base import Expert
from motiontune.models.wan import WanFamily
from motiontune.train.losses import flow_matching_loss, frame_dropout_mask, temporal_consistency_loss


def tiny_expert(folder) -> tuple[WanFamily, Expert]:
    from diffusers import WanTransformer3DModel

    family = WanFamily(TrainConfig.model_validate({"concepts": [{"path": "."}]}), torch.device("cpu"))
    transformer = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer")
    return family, Expert("transformer", "", transformer, (0.0, 1.0))


class OneFrameAtATime:
    """Reference: the stock processor run separately on each latent frame's tokens."""

    def __init__(self, processor, frames):
        self.processor, self.frames = processor, frames

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kwargs):
        per_frame = hidden_states.shape[1] // self.frames
        outputs = []
        for f in range(self.frames):
            span = slice(f * per_frame, (f + 1) * per_frame)
            rotary = tuple(r[:, span] for r in rotary_emb)
            outputs.append(self.processor(attn, hidden_states[:, span], None, None, rotary))
        return torch.cat(outputs, dim=1)


def test_frame_local_attention_equals_each_frame_attending_on_its_own(tiny_models):
    family, expert = tiny_expert(tiny_models("wan-2.1"))
    model = expert.module
    generator = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(2, 16, 4, 4, 6, generator=generator), timestep=torch.tensor([300.0, 800.0]),
        encoder_hidden_states=torch.randn(2, 512, 32, generator=generator), return_dict=False,
    )
    with torch.no_grad():
        full = model(**inputs)[0]
        stock = [block.attn1.processor for block in model.blocks]
        for block, processor in zip(model.blocks, stock):
            block.attn1.set_processor(OneFrameAtATime(processor, frames=4))
        reference = model(**inputs)[0]
        for block, processor in zip(model.blocks, stock):
            block.attn1.set_processor(processor)
        family.set_frame_local_attention(expert, True)
        local = model(**inputs)[0]
        family.set_frame_local_attention(expert, False)
        restored = model(**inputs)[0]
    assert torch.allclose(local, reference, atol=1e-5)
    assert not torch.allclose(local, full, atol=1e-3)  # it does change what self-attention sees
    assert torch.equal(restored, full)


def test_frame_dropout_keeps_the_first_frame_and_renormalises():
    mask = frame_dropout_mask(64, 5, 0.3, torch.Generator().manual_seed(1))
    assert mask[:, 0].all() and 0.55 < mask[:, 1:].float().mean() < 0.85
    assert torch.equal(mask, frame_dropout_mask(64, 5, 0.3, torch.Generator().manual_seed(1)))  # from the seed
    prediction, target = torch.zeros(2, 3, 5, 2, 2), torch.ones(2, 3, 5, 2, 2)
    assert flow_matching_loss(prediction, target, mask[:2]).item() == flow_matching_loss(prediction, target).item() == 1.0
    target[:, :, 4] = 3.0  # a frame with a larger error counts only when kept
    only_first = torch.zeros(2, 5, dtype=torch.bool)
    only_first[:, 0] = True
    assert flow_matching_loss(prediction, target, only_first).item() == 1.0


def test_temporal_consistency_gradient_reaches_the_lora(tiny_models):
    from motiontune.methods.lora import prepare

    family, expert = tiny_expert(tiny_models("wan-2.1"))
    family.weight_dtype = torch.float32
    parameters = prepare(family, expert, TrainConfig.model_validate({"concepts": [{"path": "."}], "lora_rank": 4}))
    for p in parameters:  # LoRA B starts at zero: give the adapters a non-trivial state
        torch.nn.init.normal_(p, std=0.02)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 16, 3, 4, 4, generator=generator), torch.randn(1, 16, 3, 4, 4, generator=generator)
    sigma = torch.tensor([0.5])
    noisy = (1 - sigma) * x0 + sigma * noise
    prediction = family.predict(noisy, sigma, torch.randn(1, 512, 32, generator=generator), expert)
    temporal_consistency_loss(prediction, noisy, sigma, x0).backward()
    assert sum(p.grad.abs().sum().item() for p in parameters if p.grad is not None) > 0


def test_extra_compression_shrinks_the_latent_grid(tmp_path, tiny_models):
    from motiontune.data.cache import Cache
    from motiontune.data.latents import Encoding
    from motiontune.data.survey import survey_dataset

    folder = tmp_path / "clips"
    folder.mkdir()
    (folder / "shapes.mp4").write_bytes((DATA / "shapes_200px_30fps.mp4").read_bytes())

    def latent_shape(**video):
        keys = base_config(tmp_path, tiny_models("wan-2.1"), folder, resolution="64", dataloader_threads=0)
        keys["video_config"] = {"max_frames": 17, "target_fps": 16.0, **video}
        config = TrainConfig.model_validate(keys)
        family = WanFamily(config, torch.device("cpu"))
        encoding = Encoding(family, config, Cache(tmp_path / "cache", enabled=False))
        return encoding.clips(survey_dataset(config, family))[0].shape

    assert latent_shape() == (16, 5, 8, 8)
    assert latent_shape(spatial_compression_ratio=16) == (16, 5, 4, 4)  # half the side
    assert latent_shape(temporal_compression_ratio=8) == (16, 3, 8, 8)  # 17 frames → 9 at 8 fps → 3 latent frames


def test_a_run_with_every_built_video_option(tmp_path, tiny_models):
    from conftest import write_config
    from motiontune.cli import main

    folder = tmp_path / "clips"
    folder.mkdir()
    (folder / "shapes.mp4").write_bytes((DATA / "shapes_200px_30fps.mp4").read_bytes())
    config = base_config(
        tmp_path, tiny_models("wan-2.1"), folder, resolution="64", epochs=2,
        samples=[{"prompt": "moving shapes", "frames": 5, "height": 32, "width": 32, "steps": 2, "cfg_scale": 1.0}],
        sample_after_unit="EPOCH", sample_after=2,
        video_config={
            "max_frames": 17, "target_fps": 16.0, "use_temporal_attention": False, "frame_dropout_probability": 0.3,
            "temporal_consistency_weight": 2.0, "spatial_compression_ratio": 16, "temporal_compression_ratio": 8,
        },
    )
    assert main(["train", "--config", str(write_config(tmp_path / "c.json", **config))]) == 0
    assert (tmp_path / "workspace" / "samples" / "epoch2-0.mp4").is_file()


def test_temporal_augmentation_crops_and_swaps_reproducibly():
    from motiontune.data.augment import augment_clip

    clip = tuple(2.0 + i / 8 for i in range(9))
    variants = [augment_clip(clip, 10.0, 8.0, 42, v, "a.mp4") for v in range(200)]
    assert variants[5] == augment_clip(clip, 10.0, 8.0, 42, 5, "a.mp4")  # from the seed
    moved = [v for v in variants if sorted(v)[0] != clip[0]]
    swapped = [v for v in variants if list(v) != sorted(v)]
    assert 0.4 < len(moved) / 200 < 0.6 and 0.15 < len(swapped) / 200 < 0.35  # the documented 0.5 and 0.25
    for v in variants:
        assert 0.0 <= min(v) and max(v) <= 10.0 - 1 / 8 and v[0] == min(v)  # inside the file; the first stays first
        assert abs(max(v) - min(v) - 1.0) < 1e-9 and len(set(v)) == 9  # still 9 consecutive grid frames
        out_of_place = [i for i in range(9) if v[i] != sorted(v)[i]]
        assert not out_of_place or out_of_place == [out_of_place[0], out_of_place[0] + 1]  # at most one neighbouring pair


def test_temporal_augmentation_variants_are_cached(tmp_path, tiny_models, dataset):
    import json

    from conftest import write_config
    from motiontune.cli import main

    video = {"max_frames": 5, "target_fps": 8.0, "temporal_augmentation": True, "window_variants": 2}
    config = base_config(tmp_path, tiny_models("wan-2.1"), dataset, epochs=4, video_config=video)
    assert main(["train", "--config", str(write_config(tmp_path / "c.json", **config))]) == 0
    calls = json.loads((tmp_path / "workspace" / "result.json").read_text())["encoder_calls"]
    assert calls["video"] <= 4  # 2 files x 2 variants at most (an unchanged variant is one cache entry)
