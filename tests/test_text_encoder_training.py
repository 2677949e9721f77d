"""FINE_TUNE with `text_encoder.train`: the text encoder trains with its own learning rate, read from the run's
real optimizers, and the weights that changed are the ones that should have (its token table stays as it was)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from conftest import base_config, write_config
from motiontune.cli import main

LR, TEXT_LR = 1e-3, 5e-5


def test_text_encoder_trains_with_its_own_learning_rate(tmp_path, tiny_models, dataset):
    from diffusers import WanTransformer3DModel
    from transformers import UMT5EncoderModel

    model = tiny_models("wan-2.1")
    seen = []  # every optimizer that steps during the run
    hook = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: seen.append(optimizer))
    config = base_config(
        tmp_path, model, dataset, training_method="FINE_TUNE", output_model_format="DIFFUSERS",
        output_model_destination=str(tmp_path / "tuned"), epochs=2, batch_size=1, learning_rate=LR,
        learning_rate_warmup_steps=0, text_encoder={"train": True, "learning_rate": TEXT_LR},
    )
    try:
        assert main(["train", "--config", str(write_config(tmp_path / "c.json", **config))]) == 0
    finally:
        hook.remove()

    text = UMT5EncoderModel.from_pretrained(tmp_path / "tuned_text_encoder")
    base_text = UMT5EncoderModel.from_pretrained(model, subfolder="text_encoder")
    optimizers = {id(o): o for o in seen}.values()
    groups = [g for o in optimizers for g in o.param_groups]
    text_groups = [g for g in groups if g.get("name") == "text encoder umt5xxl"]
    assert len(text_groups) == 1 and text_groups[0]["lr"] == TEXT_LR
    assert {g["lr"] for g in groups if g not in text_groups} == {LR}  # the transformer's
    # the text encoder's group holds every text-encoder weight except the token table, and nothing else
    trained_shapes = sorted(tuple(p.shape) for p in text_groups[0]["params"])
    expected = sorted(tuple(p.shape) for n, p in base_text.named_parameters() if n != "shared.weight")
    assert trained_shapes == expected

    # what changed: each text-encoder weight, by no more than its learning rate allows (AdamW moves a weight
    # by about lr a step), and not the token table
    steps = sum(1 for o in seen if any(g.get("name") == "text encoder umt5xxl" for g in o.param_groups))
    assert steps >= 2
    tuned, base = dict(text.named_parameters()), dict(base_text.named_parameters())
    assert torch.equal(tuned["shared.weight"], base["shared.weight"])
    for name, weight in base.items():
        if name != "shared.weight":
            change = (tuned[name] - weight).abs().max().item()
            assert 0 < change <= steps * TEXT_LR * 1.01, (name, change)
    transformer = WanTransformer3DModel.from_pretrained(tmp_path / "tuned")
    base_transformer = WanTransformer3DModel.from_pretrained(model, subfolder="transformer")
    biggest = max((a - b).abs().max().item() for a, b in zip(transformer.parameters(), base_transformer.parameters()))
    assert steps * TEXT_LR * 2 < biggest <= steps * LR * 1.01  # the transformer moved at its own, larger rate


def test_text_encoder_training_needs_fine_tune(tmp_path, tiny_models, capsys):
    config = base_config(tmp_path, tiny_models("wan-2.1"), tmp_path, text_encoder={"train": True})
    assert main(["train", "--config", str(write_config(tmp_path / "c.json", **config))]) == 2
    assert "text_encoder.train = true: the text encoder trains in FINE_TUNE runs only" in capsys.readouterr().err


def test_comfy_single_file_text_encoder(tmp_path, tiny_models, dataset):
    """COMFY_TRANSFORMER saves the trained text encoder as one file with transformers' names, tables once."""
    from transformers import UMT5EncoderModel

    model = tiny_models("wan-2.1")
    config = base_config(
        tmp_path, model, dataset, training_method="FINE_TUNE", output_model_format="COMFY_TRANSFORMER",
        output_model_destination=str(tmp_path / "tuned.safetensors"), epochs=1, text_encoder={"train": True},
    )
    assert main(["train", "--config", str(write_config(tmp_path / "c.json", **config))]) == 0
    state = load_file(str(tmp_path / "tuned_text_encoder.safetensors"))
    base = UMT5EncoderModel.from_pretrained(model, subfolder="text_encoder")
    assert "shared.weight" in state and "encoder.embed_tokens.weight" not in state
    missing, unexpected = base.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}
