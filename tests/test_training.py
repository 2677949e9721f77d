"""Training runs on tiny real-architecture models: every WAN variant, dtypes, batching, outputs."""

from __future__ import annotations

from pathlib import Path

import av
import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA, base_config, write_config
from motiontune.cli import main
from motiontune.data.buckets import epoch_batches
from motiontune.train.flow import sample_sigmas


@pytest.fixture
def clips(tmp_path) -> Path:
    """Two real clips with captions beside them, and one in the videos/ + captions/ layout."""
    folder = tmp_path / "clips"
    folder.mkdir()
    for name in ("shapes_200px_30fps.mp4", "big_buck_bunny_432_433.webm"):
        (folder / name).write_bytes((DATA / name).read_bytes())
        (folder / name).with_suffix(".txt").write_text("moving shapes\na test clip\n")
    return folder


def run(tmp_path: Path, config: dict) -> int:
    return main(["train", "--config", str(write_config(tmp_path / "config.json", **config))])


def frame_count(path: Path) -> tuple[int, int, int]:
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    return len(frames), frames[0].height, frames[0].width


def expert_outputs(pipe) -> list[torch.Tensor]:
    """Both A14B experts' outputs on one fixed input."""
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 16, 3, 4, 4, generator=generator), torch.tensor([300.0]), torch.randn(1, 512, 32, generator=generator))
    with torch.no_grad():
        return [m(*inputs, return_dict=False)[0] for m in (pipe.transformer, pipe.transformer_2)]


@pytest.mark.parametrize("family", ["wan-2.1", "wan-2.2-a14b", "wan-2.2-ti2v-5b"])
def test_make_tiny_model_writes_a_folder_the_stock_pipeline_loads(tmp_path, family):
    from diffusers import WanPipeline

    assert main(["make-tiny-model", "--family", family, "--out", str(tmp_path / family)]) == 0
    pipe = WanPipeline.from_pretrained(tmp_path / family)
    assert (pipe.transformer_2 is not None) == (family == "wan-2.2-a14b")
    assert pipe.config.expand_timesteps == (family == "wan-2.2-ti2v-5b")
    assert pipe.vae.config.z_dim == (48 if family == "wan-2.2-ti2v-5b" else 16)
    size = 32 if family == "wan-2.2-ti2v-5b" else 16
    video = pipe("a red circle", height=size, width=size, num_frames=5, num_inference_steps=2, guidance_scale=1.0).frames
    assert video.shape == (1, 5, size, size, 3)


def test_bf16_batches_accumulation_saves_samples_and_logs(tmp_path, tiny_models, clips):
    config = base_config(
        tmp_path, tiny_models("wan-2.1"), clips,
        train_dtype="BFLOAT_16", batch_size=2, gradient_accumulation_steps=2, epochs=2,
        gradient_checkpointing="ON", learning_rate_scheduler="COSINE", learning_rate_warmup_steps=1,
        save_every=1, save_every_unit="STEP", sample_after=2, sample_after_unit="STEP",
        samples=[{"prompt": "moving shapes", "frames": 8, "height": 40, "width": 40, "steps": 2, "cfg_scale": 2.0, "fps": 8}],
        video_config={"max_frames": 9, "target_fps": 8.0, "video_batch_size_multiplier": 1.0},
    )
    assert run(tmp_path, config) == 0
    workspace = tmp_path / "workspace"
    # The clips differ in length (9 and 5 frames), so they are two buckets of one clip each: two batches
    # per epoch, accumulated into one optimizer step; two epochs give two steps.
    assert sorted(p.name for p in (workspace / "save").iterdir()) == ["step1.safetensors", "step2.safetensors"]
    sample = workspace / "samples" / "step2-0.mp4"
    assert frame_count(sample) == (5, 32, 32)  # 8 frames → 5 (4n+1), 40 → 32 (multiple of 16)
    lora = load_file(str(tmp_path / "lora.safetensors"))
    assert all(t.dtype == torch.float32 for t in lora.values())
    assert any(t.abs().sum() > 0 for k, t in lora.items() if "lora_B" in k)  # it trained

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workspace / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "loss/flow", "loss/temporal_consistency"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("loss")) == 2


def test_a14b_trains_only_the_chosen_expert(tmp_path, tiny_models, clips):
    from diffusers import WanPipeline

    model = tiny_models("wan-2.2-a14b")
    config = base_config(
        tmp_path, model, clips, model_type="WAN_2_2_T2V_A14B",
        transformer={"train": False}, transformer_2={"train": True}, epochs=3, timestep_shift=5.0,
    )
    assert run(tmp_path, config) == 0
    pipe = WanPipeline.from_pretrained(model)
    high_before, low_before = expert_outputs(pipe)
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"), load_into_transformer_2=True)
    high_after, low_after = expert_outputs(pipe)
    assert torch.equal(high_before, high_after)
    assert not torch.allclose(low_before, low_after)


@pytest.mark.parametrize("distribution", ["UNIFORM", "LOGIT_NORMAL", "SIGMOID"])
@pytest.mark.parametrize("sigma_range", [(0.875, 1.0), (0.0, 0.875)])
def test_expert_noise_levels_stay_in_the_expert_range(distribution, sigma_range):
    sigmas = sample_sigmas(4000, distribution, 5.0, sigma_range, torch.Generator().manual_seed(0))
    assert sigmas.min() >= sigma_range[0] and (sigmas.max() < sigma_range[1] or sigma_range[1] == 1.0)
    # the whole range is used, not clamped onto its edges
    assert (sigmas == sigma_range[0]).float().mean() < 0.01 and (sigmas >= sigma_range[1] - 1e-6).float().mean() < 0.01
    assert sigmas.std() > 0.02


def test_shift_moves_noise_levels_up_as_the_scheduler_does():
    plain = sample_sigmas(20000, "UNIFORM", 1.0, generator=torch.Generator().manual_seed(0))
    shifted = sample_sigmas(20000, "UNIFORM", 3.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(shifted, 3 * plain / (1 + 2 * plain), atol=1e-6)


def test_ti2v_5b_trains_and_samples(tmp_path, tiny_models, clips):
    config = base_config(
        tmp_path, tiny_models("wan-2.2-ti2v-5b"), clips, model_type="WAN_2_2_TI2V_5B", resolution="40",
        samples=[{"prompt": "moving shapes", "frames": 5, "height": 32, "width": 32, "steps": 2, "cfg_scale": 1.0}],
        sample_after_unit="EPOCH", sample_after=2, output_model_format="COMFY_LORA",
    )
    assert run(tmp_path, config) == 0
    assert frame_count(tmp_path / "workspace" / "samples" / "epoch2-0.mp4") == (5, 32, 32)
    assert any(k.endswith(".alpha") for k in load_file(str(tmp_path / "lora.safetensors")))


def test_video_and_image_buckets_use_their_batch_sizes():
    shapes = [(16, 3, 4, 4)] * 5 + [(16, 1, 4, 4)] * 5
    batches = epoch_batches(shapes, [1.0] * 10, batch_size=4, video_multiplier=0.5, seed=1, epoch=0)
    video_batches = [b for b in batches if b[0] < 5]
    image_batches = [b for b in batches if b[0] >= 5]
    assert sorted(len(b) for b in video_batches) == [1, 2, 2]  # floor(4 × 0.5) = 2
    assert sorted(len(b) for b in image_batches) == [1, 4]
    assert all(len({shapes[i] for i in b}) == 1 for b in batches)
    assert epoch_batches(shapes, [1.0] * 10, 4, 0.5, 1, 0) == batches  # reproducible from the seed


def test_temporal_consistency_is_zero_for_a_perfect_prediction_and_grows_with_frame_errors():
    from motiontune.train.flow import flow_target, noisy_latents
    from motiontune.train.losses import temporal_consistency_loss

    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 16, 4, 4, 4, generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    sigma = torch.tensor([0.3, 0.8])
    noisy = noisy_latents(x0, noise, sigma)
    perfect = flow_target(x0, noise)
    assert temporal_consistency_loss(perfect, noisy, sigma, x0).item() == pytest.approx(0.0, abs=1e-10)
    constant_error = perfect + 0.5  # the same error on every frame leaves frame differences intact
    assert temporal_consistency_loss(constant_error, noisy, sigma, x0).item() == pytest.approx(0.0, abs=1e-10)
    flicker = perfect.clone()
    flicker[:, :, 1] += 1.0
    assert temporal_consistency_loss(flicker, noisy, sigma, x0).item() > 0.1
    single_frame = x0[:, :, :1]
    assert temporal_consistency_loss(perfect[:, :, :1], noisy[:, :, :1], sigma, single_frame).item() == 0.0


def test_a14b_both_experts_route_each_sample_by_its_noise_level(tmp_path, tiny_models, clips, monkeypatch):
    """With experts: both, each expert sees (and so gets gradients from) only the samples of its range,
    and each gets its own LoRA file."""
    from diffusers import WanPipeline

    from motiontune.models.wan import WanFamily

    seen = {"transformer": [], "transformer_2": []}
    grads = {"transformer": 0, "transformer_2": 0}
    original = WanFamily.load_transformers

    def load_with_hooks(self):
        original(self)
        for name in seen:
            module = getattr(self, name)
            module.register_forward_pre_hook(
                lambda m, args, kwargs, name=name: seen[name].extend(kwargs["timestep"].tolist()), with_kwargs=True
            )
            module.register_forward_hook(count_gradients(name))

    def count_gradients(name):
        def hook(module, args, output):  # the gradient flowing back into this expert's output, per batch
            if output[0].requires_grad:
                output[0].register_hook(lambda grad: grads.__setitem__(name, grads[name] + len(grad)))
        return hook

    monkeypatch.setattr(WanFamily, "load_transformers", load_with_hooks)
    model = tiny_models("wan-2.2-a14b")
    config = base_config(
        tmp_path, model, clips, model_type="WAN_2_2_T2V_A14B", experts="both", epochs=12, batch_size=2,
        timestep_distribution="UNIFORM", video_config={"max_frames": 5, "target_fps": 8.0, "video_batch_size_multiplier": 1.0},
    )
    assert run(tmp_path, config) == 0
    assert seen["transformer"] and seen["transformer_2"]
    assert min(seen["transformer"]) >= 875.0 and max(seen["transformer_2"]) < 875.0
    # gradients reach each expert from exactly the samples it was given
    assert grads == {name: len(times) for name, times in seen.items()}

    high, low = tmp_path / "lora_high_noise.safetensors", tmp_path / "lora_low_noise.safetensors"
    assert high.is_file() and low.is_file() and not (tmp_path / "lora.safetensors").exists()
    pipe = WanPipeline.from_pretrained(model)
    before = expert_outputs(pipe)
    pipe.load_lora_weights(str(high))
    pipe.load_lora_weights(str(low), load_into_transformer_2=True, adapter_name="low")
    after = expert_outputs(pipe)
    assert not torch.allclose(before[0], after[0]) and not torch.allclose(before[1], after[1])


def test_a14b_experts_have_their_own_step_counts(tmp_path, tiny_models, clips, monkeypatch):
    """transformer.max_steps: the high-noise expert stops after 3 optimizer steps; from then on every noise
    level is drawn from the low-noise expert's range, which trains to the end of the epochs."""
    import json

    from motiontune.models.wan import WanFamily

    calls = []
    original = WanFamily.load_transformers

    def load_with_hooks(self):
        original(self)
        for name in ("transformer", "transformer_2"):
            getattr(self, name).register_forward_pre_hook(lambda m, a, k, name=name: calls.append(name), with_kwargs=True)

    monkeypatch.setattr(WanFamily, "load_transformers", load_with_hooks)
    config = base_config(tmp_path, tiny_models("wan-2.2-a14b"), clips, model_type="WAN_2_2_T2V_A14B", experts="both",
                         epochs=20, transformer={"max_steps": 3}, timestep_distribution="UNIFORM",
                         video_config={"max_frames": 5, "target_fps": 8.0})
    assert run(tmp_path, config) == 0
    assert calls.count("transformer") == 3  # one sample per step: three steps of the high-noise expert
    last_high = max(i for i, name in enumerate(calls) if name == "transformer")
    assert last_high < len(calls) - 10 and all(name == "transformer_2" for name in calls[last_high + 1:])
    assert json.loads((tmp_path / "workspace" / "result.json").read_text())["steps"] == len(calls)


def test_single_file_transformer_in_the_original_wan_layout_loads_like_the_folder(tmp_path, tiny_models):
    """A transformer saved with original WAN (ComfyUI) key names, given as transformer.model_name, loads
    through diffusers' from_single_file with the base model's own config and computes the same outputs."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from safetensors.torch import save_file

    from motiontune.config import TrainConfig
    from motiontune.models.wan import WanFamily, original_name

    folder = tiny_models("wan-2.1")
    reference = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer")
    original = {original_name(k): v.contiguous() for k, v in reference.state_dict().items()}
    assert "blocks.0.self_attn.q.weight" in original and "head.modulation" in original and "blocks.1.norm3.weight" in original
    assert set(convert_wan_transformer_to_diffusers(dict(original))) == set(reference.state_dict())  # names round-trip
    save_file(original, str(tmp_path / "wan_original.safetensors"))

    config = TrainConfig.model_validate({
        "base_model_name": str(folder), "concepts": [{"path": "."}], "train_dtype": "FLOAT_32",
        "transformer": {"model_name": str(tmp_path / "wan_original.safetensors")},
    })
    family = WanFamily(config, torch.device("cpu"))
    family.load_transformers()
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 16, 3, 4, 4, generator=generator), torch.tensor([300.0]), torch.randn(1, 512, 32, generator=generator))
    with torch.no_grad():
        loaded, expected = family.transformer.state_dict(), reference.state_dict()
        assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)  # bit for bit
        # outputs equal to float32 rounding: CPU matrix kernels round differently with the weights' memory alignment
        torch.testing.assert_close(family.transformer(*inputs, return_dict=False)[0], reference(*inputs, return_dict=False)[0],
                                   rtol=1e-5, atol=1e-5)


def test_a14b_samples_with_one_expert_on_the_device_at_a_time(tiny_models):
    """Sampling brings each expert in when the pipeline first calls it (the high-noise one, then the low-noise
    one) instead of both at once, which would need twice the memory on a GPU."""
    from motiontune.config import TrainConfig
    from motiontune.models.base import SampleRequest
    from motiontune.models.wan import WanFamily

    config = TrainConfig.model_validate({"model_type": "WAN_2_2_T2V_A14B", "base_model_name": str(tiny_models("wan-2.2-a14b")),
                                         "concepts": [{"path": "."}], "train_dtype": "FLOAT_32"})
    family = WanFamily(config, torch.device("cpu"))
    family.load_transformers()
    brought = []
    original = family._bring
    family._bring = lambda module: (brought.append(module), original(module))
    embeds = torch.randn(1, 512, family.transformer.config.text_dim, generator=torch.Generator().manual_seed(0))
    request = SampleRequest(prompt_embeds=embeds, negative_prompt_embeds=None, frames=5, height=32, width=32, steps=4,
                            cfg_scale=1.0, seed=0)
    family.sample(request)
    order = [m for i, m in enumerate(brought) if i == 0 or m is not brought[i - 1]]
    assert order == [family.transformer, family.transformer_2]  # high noise first, one swap
    assert not family.transformer._forward_pre_hooks and not family.transformer_2._forward_pre_hooks  # hooks removed


def test_adapters_train_on_their_half_precision_input_under_autocast(tmp_path, tiny_models, dataset, monkeypatch):
    """With train_dtype BFLOAT_16 peft's cast of each adapter's input to float32 (which autocast casts straight back
    for the matmul) is skipped in the training step: lora_A sees the bf16 activations, forward and the checkpointed
    recompute alike; a sample after it, outside autocast, still runs (there peft casts as it always does)."""
    import motiontune.methods.lora as lora

    seen = []
    prepare = lora.prepare

    def observed(family, expert, config):
        parameters = prepare(family, expert, config)
        for name, module in expert.module.named_modules():
            if name.endswith("lora_A.default"):
                module.register_forward_pre_hook(lambda module, args: seen.append((torch.is_autocast_enabled("cpu"), args[0].dtype)))
        return parameters

    monkeypatch.setattr(lora, "prepare", observed)
    sample = {"prompt": "moving shapes", "frames": 5, "height": 32, "width": 32, "steps": 2}
    config = base_config(tmp_path, tiny_models("wan-2.1"), dataset, epochs=1, train_dtype="BFLOAT_16",
                         gradient_checkpointing="ON", samples=[sample], sample_after_unit="EPOCH", sample_after=1)
    assert main(["train", "--config", str(write_config(tmp_path / "config.json", **config))]) == 0
    training = [dtype for autocast, dtype in seen if autocast]
    assert training and set(training) == {torch.bfloat16}, set(training)
    assert any(not autocast for autocast, _ in seen)  # the sample's forwards ran
    assert (tmp_path / "workspace" / "samples" / "epoch1-0.mp4").exists()
