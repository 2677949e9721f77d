"""Memory options: each keeps the loss of the plain bf16 run, and each does what it says (blocks really leave
the device, checkpointed inputs really wait in host memory, quantized weights really shrink)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA, base_config
from motiontune.configure import load_config
from motiontune.config.schema import TrainConfig
from motiontune.train import loop, memory
from motiontune.train.memory import MemoryPlan, QuantizedLinear, module_bytes, quantize_frozen_linears

LAYERS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 4-block tiny WAN, two real clips, one cache for every run."""
    from motiontune.testing.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("memory")
    model = make_tiny_model("wan-2.1", root / "model", layers=LAYERS)
    clips = root / "clips"
    clips.mkdir()
    for name, caption in (("shapes_200px_30fps.mp4", "moving shapes"), ("big_buck_bunny_432_433.webm", "a rabbit")):
        (clips / name).write_bytes((DATA / name).read_bytes())
        (clips / name).with_suffix(".txt").write_text(caption)
    return root, model, clips


def run(setup, name: str, monkeypatch=None, **keys):
    """Train 4 steps in bf16 with `keys`; → (per-step losses, LoRA, the memory objects of the transformer)."""
    root, model, clips = setup
    folder = root / name
    config = base_config(folder, model, clips, cache_dir=str(root / "cache"), dataloader_threads=0)
    config.update({"train_dtype": "BFLOAT_16", "backup_after_unit": "NEVER", **keys})
    seen = {}
    if monkeypatch is not None:
        def recording(family, expert, config, device):
            seen["offloader"] = memory.prepare_memory(family, expert, config, device)
            seen["module"] = expert.module
            return seen["offloader"]

        monkeypatch.setattr(loop, "prepare_memory", recording)
    result = loop.train(TrainConfig(**config))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "workspace" / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("loss")]
    assert len(losses) == result.steps == 4 and all(math.isfinite(v) for v in losses)
    return losses, load_file(str(folder / "lora.safetensors")), seen


@pytest.fixture(scope="module")
def plain(setup):
    return run(setup, "plain")


def relative_gap(losses, reference) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference))


def whole_lora_gap(lora, reference) -> float:
    """The relative difference of all the LoRA's tensors taken together."""
    difference = sum(((lora[k] - reference[k]) ** 2).sum() for k in reference)
    return (difference / sum((reference[k] ** 2).sum() for k in reference)).sqrt().item()


def lora_gap(lora, reference) -> float:
    return max(((lora[k] - reference[k]).norm() / reference[k].norm()).item() for k in reference)


# Recomputing a block, or computing it from weights streamed in, changes no number: the same losses and LoRA.
@pytest.mark.parametrize("keys", [{"gradient_checkpointing": "ON"}, {"gradient_checkpointing": "CPU_OFFLOADED"},
                                  {"transformer": {"gradient_checkpointing": True, "activation_offloading": True}}],
                         ids=["ON", "CPU_OFFLOADED", "CPU_OFFLOADED-newer-form"])
def test_checkpointing_keeps_the_loss_exactly(setup, plain, monkeypatch, keys):
    losses, lora, seen = run(setup, "checkpoint-" + str(len(str(keys))), monkeypatch, **keys)
    assert relative_gap(losses, plain[0]) < 1e-6 and lora_gap(lora, plain[1]) < 1e-5
    host = seen["module"]._motiontune_host_checkpoint
    if "ON" in str(keys):
        assert host is None
    else:  # block inputs were held in host memory during forward and all given back by backward
        assert host.peak_host_bytes > 0 and host.host_bytes == 0


@pytest.mark.parametrize("fraction,prefetch", [(0.5, 2), (0.75, 1), (1.0, 2)])
def test_layer_offloading_keeps_the_loss_and_the_resident_bound(setup, plain, monkeypatch, fraction, prefetch):
    losses, lora, seen = run(setup, f"offload-{fraction}-{prefetch}", monkeypatch,
                             layer_offload_fraction=fraction, layer_offload_prefetch=prefetch)
    assert relative_gap(losses, plain[0]) < 1e-6 and lora_gap(lora, plain[1]) < 1e-5
    offloader = seen["offloader"]
    assert len(offloader.offloaded) == math.floor(fraction * LAYERS)
    # the bound: ceil((1-f)·blocks) resident blocks plus the prefetch window
    assert offloader.max_resident <= math.ceil((1 - fraction) * LAYERS) + prefetch
    # blocks were loaded again for every forward and recomputation, not once and kept
    assert offloader.loads >= 4 * len(offloader.offloaded)
    # between steps the offloaded blocks that are not in the window hold no weights at all
    parked = [i for i in offloader.offloaded if i not in offloader.resident]
    assert len(parked) == max(len(offloader.offloaded) - prefetch, 0)
    assert all(t.numel() == 0 for i in parked for t in offloader.blocks[i].parameters() if not t.requires_grad)
    # LoRA parameters never moved
    assert all(p.numel() > 0 for p in seen["module"].parameters() if p.requires_grad)


def test_an_offloaded_block_used_while_parked_fails_instead_of_computing(setup):
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    blocks = [WanTransformerBlock(48, 96, 2).requires_grad_(False) for _ in range(2)]  # frozen: offloadable
    offloader = memory.BlockOffloader(blocks, 1.0, 1, torch.device("cpu"))
    x, text = torch.randn(1, 4, 48), torch.randn(1, 3, 48)
    temb, rotary = torch.randn(1, 6, 48), (torch.ones(1, 4, 1, 24), torch.zeros(1, 4, 1, 24))
    blocks[0](x, text, temb, rotary)  # the hook loads it
    offloader._drop(0)  # bypass the hook: a parked block has no weights to compute with
    with pytest.raises(RuntimeError):
        type(blocks[0]).forward(blocks[0], x, text, temb, rotary)
    blocks[0](x, text, temb, rotary)  # through the hook it is loaded again and computes


# Quantized storage: stated tolerances on the 4-step loss curve of the tiny model (measured: FLOAT_8 0.1 %,
# NFLOAT_4 0.3 %, FLOAT_16 0.1 %), and the run really used the quantized weights (its LoRA differs).
@pytest.mark.parametrize("keys,tolerance", [({"transformer": {"weight_dtype": "FLOAT_8"}}, 0.01),
                                            ({"transformer": {"weight_dtype": "NFLOAT_4"}}, 0.03),
                                            ({"train_dtype": "FLOAT_16"}, 0.01)],
                         ids=["FLOAT_8", "NFLOAT_4", "FLOAT_16"])
def test_weight_and_train_dtypes_keep_the_loss_within_tolerance(setup, plain, monkeypatch, keys, tolerance):
    name = str(keys).split("'")[-2]
    losses, lora, seen = run(setup, name, monkeypatch, **keys)
    assert relative_gap(losses, plain[0]) < tolerance
    assert lora_gap(lora, plain[1]) > 1e-4  # not the plain run under another name
    kinds = {m.kind for m in seen["module"].modules() if isinstance(m, QuantizedLinear)}
    assert kinds == ({name} if name != "FLOAT_16" else set())


def test_float16_backups_carry_the_loss_scale(setup):
    root, _, _ = setup
    run(setup, "fp16-backup", train_dtype="FLOAT_16", backup_after=2, backup_after_unit="STEP")
    backup = sorted((root / "fp16-backup" / "workspace" / "backup").glob("step-*"))[-1]
    state = torch.load(backup / "state.pt", weights_only=True)
    assert state["grad_scaler"]["scale"] > 0


@pytest.mark.parametrize("optimizer,keys", [("ADAMW_8BIT", {}), ("ADAFACTOR", {}), ("PRODIGY", {"learning_rate": 1.0}),
                                            ("SGD", {"learning_rate": 1e-2})])
def test_optimizers_train_and_back_up(setup, plain, optimizer, keys):
    root, _, _ = setup
    losses, lora, _ = run(setup, optimizer, optimizer={"optimizer": optimizer}, backup_after=4, backup_after_unit="STEP", **keys)
    assert all(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # B starts at zero: it moved
    if optimizer == "ADAMW_8BIT":
        # torchao keeps full moments for tensors under 4096 values, which every tensor of this tiny LoRA is: AdamW's rule
        # then (the gap this test once saw came from another initial LoRA, before each expert's LoRA had its own seed);
        # the 8-bit moments of larger tensors: test_adamw_8bit_keeps_8_bit_moments_for_large_tensors. Compared over the
        # whole LoRA: a few cross-attention B matrices get near-zero gradients that Adam divides by their own size, so
        # torchao's other order of float operations moves them by up to 6 % (measured: whole LoRA 3.1e-4 off AdamW's,
        # Adafactor and SGD 1.7e-2)
        assert whole_lora_gap(lora, plain[1]) < 2e-3
    else:
        assert lora_gap(lora, plain[1]) > 1e-3  # another update rule than AdamW's
    backup = sorted((root / optimizer / "workspace" / "backup").glob("step-*"))[-1]
    torch.load(backup / "state.pt", weights_only=True)  # an 8-bit state loads without running code


def test_quantized_weights_shrink_to_the_targets_and_stay_close():
    """On a block of half WAN-1.3B width (benchmarks/memory.py measures the full width): FLOAT_8 ≤ 0.55×, NFLOAT_4 ≤ 0.30× the bf16 bytes of the block."""
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    torch.manual_seed(0)
    reference = WanTransformerBlock(768, 4480, 6).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(1, 64, 768, dtype=torch.bfloat16)
    expected = reference.ffn(x).float()
    for kind, limit, error_limit in (("FLOAT_8", 0.55, 0.05), ("NFLOAT_4", 0.30, 0.2)):
        block = WanTransformerBlock(768, 4480, 6).to(torch.bfloat16).requires_grad_(False)
        block.load_state_dict(reference.state_dict())
        assert quantize_frozen_linears([block], kind, torch.device("cpu")) == 10  # q k v o twice, two FFN layers
        ratio = module_bytes(block) / module_bytes(reference)
        assert ratio <= limit, (kind, ratio)
        error = ((block.ffn(x).float() - expected).norm() / expected.norm()).item()
        assert error < error_limit, (kind, error)
        assert block.scale_shift_table.dtype == torch.bfloat16  # modulation keeps the train dtype


def test_plans_read_both_config_forms():
    older = load_config("#wan 2.2 LoRA 8GB", ["gradient_checkpointing=CPU_OFFLOADED", "transformer.gradient_checkpointing=null"])
    assert MemoryPlan.of(older).checkpointing == "CPU_OFFLOADED"
    offload = load_config("#wan 2.2 LoRA 8GB", ["transformer.gradient_checkpointing=false", "transformer.offload_fraction=0.5"])
    assert MemoryPlan.of(offload).checkpointing == "ON"  # offloading needs recomputation
    assert MemoryPlan.of(offload).offload_fraction == 0.5


def test_quantized_or_offloaded_weights_cannot_be_fine_tuned():
    from motiontune.config import ConfigError

    with pytest.raises(ConfigError, match="transformer_2.weight_dtype = FLOAT_8"):
        load_config("#wan 2.2 Finetune", ["transformer_2.weight_dtype=FLOAT_8"])
    with pytest.raises(ConfigError, match="layer offloading"):
        load_config("#wan 2.2 Finetune", ["layer_offload_fraction=0.5"])


def test_host_checkpoint_and_offloading_on_hunyuan_blocks_give_the_same_gradients(tiny_models):
    """HunyuanVideo's blocks take tuples (rotary tables) and return two tensors: the LoRA gradients through
    CPU_OFFLOADED checkpointing and through fully offloaded blocks equal those through plain checkpointing."""
    from diffusers import HunyuanVideoTransformer3DModel
    from peft import LoraConfig

    folder = tiny_models("hunyuan-video")
    gradients = {}
    for mode in ("ON", "CPU_OFFLOADED", "offloaded"):
        model = HunyuanVideoTransformer3DModel.from_pretrained(folder, subfolder="transformer").requires_grad_(False)
        torch.manual_seed(0)
        model.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights="gaussian"))
        host = memory.HostCheckpoint(torch.device("cpu")) if mode == "CPU_OFFLOADED" else None
        model.enable_gradient_checkpointing(**({"gradient_checkpointing_func": host} if host else {}))
        if mode == "offloaded":
            blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
            offloader = memory.BlockOffloader(blocks, 1.0, 1, torch.device("cpu"))
        model.train()
        g, config = torch.Generator().manual_seed(1), model.config
        out = model(hidden_states=torch.randn(1, config.in_channels, 3, 8, 8, generator=g), timestep=torch.tensor([500]),
                    encoder_hidden_states=torch.randn(1, 8, config.text_embed_dim, generator=g),
                    encoder_attention_mask=torch.ones(1, 8, dtype=torch.bool),
                    pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
                    guidance=torch.tensor([1000.0]), return_dict=False)[0]
        out.square().mean().backward()
        gradients[mode] = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        if host is not None:
            assert host.peak_host_bytes > 0 and host.host_bytes == 0
    assert gradients["ON"].norm() > 0
    assert torch.equal(gradients["CPU_OFFLOADED"], gradients["ON"]) and torch.equal(gradients["offloaded"], gradients["ON"])
    assert offloader.max_resident <= 1 and offloader.loads == 2 * len(blocks) - 1  # the last block stays for backward


def test_a_float8_text_encoder_encodes_close_to_the_plain_one_and_caches_apart(tiny_models, tmp_path):
    """text_encoder.weight_dtype FLOAT_8 (UMT5-XXL: ~11 GB in bf16 would not fit an 8 GB GPU while captions
    are encoded): every Linear of the encoder stored in 8 bits, embeddings close to the plain encoder's, and
    a cache entry of their own."""
    from motiontune.data.cache import Cache
    from motiontune.data.latents import Encoding
    from motiontune.models.wan import WanFamily

    def family(**keys):
        config = TrainConfig.model_validate({"base_model_name": str(tiny_models("wan-2.1")), "concepts": [{"path": "."}],
                                             "train_dtype": "FLOAT_32", "cache_dir": str(tmp_path), **keys})
        wan = WanFamily(config, torch.device("cpu"))
        return config, wan

    plain_config, plain = family()
    quantized_config, quantized = family(text_encoder={"train": False, "weight_dtype": "FLOAT_8"})
    for wan in (plain, quantized):
        wan.load_text_encoder()
    layers = [m for m in quantized.text_encoder.modules() if isinstance(m, QuantizedLinear)]
    assert layers and not any(isinstance(m, torch.nn.Linear) for m in quantized.text_encoder.encoder.modules())
    assert module_bytes(quantized.text_encoder.encoder.block) < 0.55 * module_bytes(plain.text_encoder.encoder.block)
    expected, got = plain.encode_prompts(["a rabbit in a field"]), quantized.encode_prompts(["a rabbit in a field"])
    error = ((got - expected).norm() / expected.norm()).item()
    assert 0 < error < 0.05, error
    identity = [Encoding(wan, config, Cache(config.cache_dir, True), None).text_identity
                for config, wan in ((plain_config, plain), (quantized_config, quantized))]
    assert identity[0] != identity[1]


@pytest.mark.parametrize("optimizer", ["ADAMW", "ADAFACTOR", "PRODIGY"])
def test_optimizer_state_bytes_is_what_the_optimizer_allocates(optimizer):
    """The state size the log and `estimate` quote, against the optimizer's own state after a step, for
    parameters of 1 to 4 dimensions (Adafactor factors each trailing matrix: one value per row and per column)."""
    from motiontune.train.optim import make_optimizer, optimizer_state_bytes

    config = TrainConfig.model_validate({"concepts": [{"path": "."}], "optimizer": {"optimizer": optimizer}})
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in [(7,), (6, 5), (3, 4, 5), (2, 3, 4, 5)]]
    opt = make_optimizer([{"params": params, "lr": 1e-3}], config)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    allocated = sum(v.numel() * v.element_size() for state in opt.state.values() for key, v in state.items()
                    if torch.is_tensor(v) and v.numel() > 1 and key != "step")
    assert optimizer_state_bytes(opt, config) == allocated


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim; elsewhere it does nothing")
def test_freed_heap_memory_goes_back_to_the_system():
    """What a released encoder leaves: blocks freed inside the heap (a live one above them keeps the heap from
    shrinking by itself) count in the resident size until return_free_memory hands them back."""
    from motiontune.util.host_memory import return_free_memory

    def resident() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    blocks = [bytearray(b"x" * 65536) for _ in range(3200)]  # 200 MB in blocks below malloc's mmap threshold
    top = bytearray(b"x" * 65536)
    del blocks
    before = resident()
    return_free_memory()
    assert before - resident() > 100 * 2**20, (before, resident())
    del top


def test_adamw_8bit_keeps_8_bit_moments_for_large_tensors():
    """ADAMW_8BIT is torchao's AdamW8bit: a tensor of 4096 values or more gets 8-bit moments (a quarter of float32's
    bytes, as optimizer_state_bytes counts them); a smaller one keeps full moments."""
    from torchao.optim.subclass_8bit import OptimState8bit

    from motiontune.train.optim import make_optimizer, optimizer_state_bytes

    big, small = torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(16, 16))
    config = TrainConfig(optimizer={"optimizer": "ADAMW_8BIT"})
    optimizer = make_optimizer([big, small], config)
    (big.square().sum() + small.square().sum()).backward()
    optimizer.step()
    assert isinstance(optimizer.state[big]["exp_avg"], OptimState8bit)
    assert not isinstance(optimizer.state[small]["exp_avg"], OptimState8bit)
    full = 2 * 4 * (big.numel() + small.numel())
    assert optimizer_state_bytes(optimizer, config) < full / 2
