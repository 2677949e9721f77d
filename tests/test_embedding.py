"""Embedding (textual inversion), end to end with the stock WanPipeline: train new token vectors on one real clip
with everything else frozen, load the saved file into the stock pipeline's tokenizer and text encoder with plain
transformers calls (docs/embeddings.md), and check that prompts with the placeholder move generated latents
towards the clip while prompts without it give the same latents bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import base_config, write_config
from motiontune.cli import main
from stock_checks import stock_samples
from test_lora_end_to_end import _channel_stats_distance, _make_clip, _stock_target_latents

PLACEHOLDER = "<shapes>"
SEEDS = range(6)
TOKENS = 16
KEY_SCALE, OUT_SCALE = 8.0, 30.0


def load_embedding_into(pipe, path: Path) -> str:
    """docs/embeddings.md, verbatim: add the file's tokens to the stock tokenizer and their vectors to the text
    encoder's embedding table; returns the placeholder (replace it by "".join(tokens) in prompts)."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        vectors = f.get_tensor("umt5xxl")
    tokens = json.loads(metadata["tokens"])
    pipe.tokenizer.add_tokens(tokens)
    ids = pipe.tokenizer.convert_tokens_to_ids(tokens)
    if max(ids) >= pipe.text_encoder.get_input_embeddings().num_embeddings:
        pipe.text_encoder.resize_token_embeddings(max(ids) + 1)
    with torch.no_grad():
        table = pipe.text_encoder.get_input_embeddings().weight
        table[ids] = vectors.to(table.dtype)
    return metadata["placeholder"]


def _latents(pipe, prompt: str) -> torch.Tensor:
    return stock_samples(pipe, SEEDS, prompt=prompt, height=32, width=32, num_frames=9, num_inference_steps=20, guidance_scale=1.0)


def _train(tmp: Path, model: Path, data: Path, destination: Path, **keys) -> None:
    config = base_config(tmp, model, data, timestep_shift=3.0, video_config={"max_frames": 9, "target_fps": 16.0}, **keys)
    assert main(["train", "--config", str(write_config(tmp / "config.json", **config))]) == 0


def text_sensitive_model(tiny_models, folder: Path) -> Path:
    """The tiny WAN 2.1 made to listen to its prompt. A random tiny transformer barely does (latents of two
    prompts differ by 1e-6 of their variance): 509 of the 512 text tokens are zero padding, which the text
    embedder's and keys' biases turn into keys that take almost all the cross-attention. With those biases zero,
    padding is silent; sharper keys and a stronger cross-attention output do the rest (0.2 of the variance)."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_models("wan-2.1"))
    with torch.no_grad():
        embedder = pipe.transformer.condition_embedder.text_embedder
        embedder.linear_1.bias.zero_()
        embedder.linear_2.bias.zero_()
        for block in pipe.transformer.blocks:
            block.attn2.to_k.bias.zero_()
            block.attn2.to_v.bias.zero_()
            block.attn2.norm_k.weight.mul_(KEY_SCALE)
            block.attn2.to_out[0].weight.mul_(OUT_SCALE)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embedding")
    model = text_sensitive_model(tiny_models, tmp / "model")
    clip = _make_clip(tmp / "data", 32)
    (clip.parent / "shapes.txt").write_text(f"a video of {PLACEHOLDER}\n")
    destination = tmp / "shapes.safetensors"
    _train(tmp, model, clip.parent, destination, training_method="EMBEDDING", output_model_format="SAFETENSORS",
           output_model_destination=str(destination), epochs=400, batch_size=1, learning_rate=1e-3,
           embedding_learning_rate=0.4, embedding={"placeholder": PLACEHOLDER, "token_count": TOKENS, "initial_embedding_text": "shapes"})
    return model, clip, destination


def test_saved_file_format(trained):
    _, _, destination = trained
    with safe_open(str(destination), "pt") as f:
        assert list(f.keys()) == ["umt5xxl"]
        assert f.get_tensor("umt5xxl").shape == (TOKENS, 32)  # (token_count, the tiny UMT5's width)
        metadata = f.metadata()
    assert metadata["placeholder"] == PLACEHOLDER
    assert json.loads(metadata["tokens"]) == [f"<shapes>_{i}" for i in range(TOKENS)]
    assert metadata["format"] == "motiontune.embedding/1"


def test_stock_pipeline_with_the_embedding(trained):
    from diffusers import WanPipeline

    model, clip, destination = trained
    pipe = WanPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    target = _stock_target_latents(pipe, clip)
    prompt = f"a video of {PLACEHOLDER}"
    plain = "moving shapes"
    before, plain_before = _latents(pipe, prompt), _latents(pipe, plain)
    plain_text_before = pipe.encode_prompt(plain, do_classifier_free_guidance=False)[0]

    placeholder = load_embedding_into(pipe, destination)
    with safe_open(str(destination), "pt") as f:
        tokens = json.loads(f.metadata()["tokens"])
    after = _latents(pipe, prompt.replace(placeholder, "".join(tokens)))
    ratio = ((after - target) ** 2).mean().item() / ((before - target) ** 2).mean().item()
    stats_ratio = _channel_stats_distance(after, target) / _channel_stats_distance(before, target)
    print(f"embedding: placeholder prompt with / without the trained embedding: MSE ratio to the clip {ratio:.3f}, "
          f"channel statistics ratio {stats_ratio:.3f}")
    # Text moves a tiny random transformer far less than its own weights do (a LoRA gets 0.60, a fine-tune 0.23);
    # measured here: 0.883 / 0.575 (400 steps at 0.4; 800 at 0.2 gave 0.856 / 0.408, 500 at 0.3 0.889 / 0.561)
    assert ratio < 0.93
    assert stats_ratio < 0.7

    # the rest of the text encoder was not touched: a prompt without the placeholder is unchanged bit for bit
    assert torch.equal(pipe.encode_prompt(plain, do_classifier_free_guidance=False)[0], plain_text_before)
    assert torch.equal(_latents(pipe, plain), plain_before)


def test_additional_embedding_trains_beside_a_lora(tmp_path, tiny_models):
    """`additional_embeddings` in a LoRA run: the LoRA and `<lora>_embeddings/<placeholder>.safetensors` are
    written, the vectors moved from their start, and both load into the stock pipeline together."""
    from diffusers import WanPipeline

    model = tiny_models("wan-2.1")
    clip = _make_clip(tmp_path / "data", 32)
    (clip.parent / "shapes.txt").write_text("<extra> moving shapes\n")
    lora = tmp_path / "lora.safetensors"
    _train(tmp_path, model, clip.parent, lora, epochs=10, output_model_destination=str(lora), embedding_learning_rate=1e-2,
           additional_embeddings=[{"placeholder": "<extra>", "token_count": 2, "initial_embedding_text": "shapes"}])
    saved = tmp_path / "lora_embeddings" / "extra.safetensors"
    assert lora.is_file() and saved.is_file()

    pipe = WanPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    start = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer("shapes", add_special_tokens=False).input_ids[0]]
    with safe_open(str(saved), "pt") as f:
        vectors = f.get_tensor("umt5xxl")
    assert vectors.shape == (2, 32) and not torch.allclose(vectors, start.expand(2, -1))  # they trained
    pipe.load_lora_weights(str(lora))
    placeholder = load_embedding_into(pipe, saved)
    assert placeholder == "<extra>"
    latents = pipe("<extra>_0<extra>_1 moving shapes", height=32, width=32, num_frames=9, num_inference_steps=2,
                   guidance_scale=1.0, output_type="latent").frames
    assert torch.isfinite(latents).all()


def test_presets():
    from motiontune.configure import load_config

    embedding = load_config("#wan 2.2 Embedding")
    assert (embedding.training_method, embedding.batch_size, embedding.learning_rate, embedding.embedding_learning_rate) == (
        "EMBEDDING", 4, 1e-3, 5e-3)
    finetune = load_config("#wan 2.2 Finetune")
    assert (finetune.batch_size, finetune.learning_rate, finetune.text_encoder.learning_rate) == (1, 1e-4, 5e-5)
    for family, model_type in (("hidream", "HI_DREAM_DEV"), ("hunyuan video", "HUNYUAN_VIDEO")):
        embedding = load_config(f"#{family} Embedding")
        assert (embedding.model_type, embedding.training_method, embedding.embedding_learning_rate) == (model_type, "EMBEDDING", 5e-3)
        assert "<embedding>" in embedding.samples[0].prompt
        finetune = load_config(f"#{family} Finetune")
        assert (finetune.model_type, finetune.training_method, finetune.output_model_format) == (model_type, "FINE_TUNE", "DIFFUSERS")
        assert (finetune.learning_rate, finetune.text_encoder.learning_rate) == (1e-4, 5e-5)


def test_placeholder_that_is_already_a_word_is_refused(tmp_path, tiny_models, capsys):
    model = tiny_models("wan-2.1")
    clip = _make_clip(tmp_path / "data", 32)
    config = base_config(tmp_path, model, clip.parent, training_method="EMBEDDING", output_model_format="SAFETENSORS",
                         output_model_destination=str(tmp_path / "e.safetensors"), epochs=1,
                         embedding={"placeholder": "shapes"})
    assert main(["train", "--config", str(write_config(tmp_path / "c.json", **config))]) == 2
    assert "the tokenizer already has the token(s) ['shapes']" in capsys.readouterr().err


def test_backup_holds_the_vectors_and_resumes_exactly(tmp_path, tiny_models):
    """A backup keeps the embedding's vectors and their optimizer state: continuing from step 3 of 6 ends with
    exactly the vectors of an uninterrupted run."""
    from safetensors.torch import load_file

    model = tiny_models("wan-2.1")
    clip = _make_clip(tmp_path / "data", 32)
    (clip.parent / "shapes.txt").write_text("<shapes>\n")

    def run(name: str, *extra: str) -> torch.Tensor:
        config = base_config(
            tmp_path, model, clip.parent, training_method="EMBEDDING", output_model_format="SAFETENSORS",
            output_model_destination=str(tmp_path / f"{name}.safetensors"), epochs=6, embedding_learning_rate=1e-2,
            embedding={"placeholder": "<shapes>", "token_count": 2}, workspace_dir=str(tmp_path / name),
            backup_after=3, backup_after_unit="STEP", video_config={"max_frames": 9, "target_fps": 16.0})
        assert main(["train", *extra, "--config", str(write_config(tmp_path / f"{name}.json", **config))]) == 0
        return load_file(str(tmp_path / f"{name}.safetensors"))["umt5xxl"]

    whole = run("whole")
    backup = sorted((tmp_path / "whole" / "backup").glob("step-0000003*"))[0]
    saved = load_file(str(backup / "adapters-text_encoder.safetensors"))
    assert list(saved) == ["embeddings.0_umt5xxl"] and not torch.equal(saved["embeddings.0_umt5xxl"], whole)
    assert torch.equal(run("resumed", "--resume", str(backup)), whole)


def test_config_refusals(tmp_path):
    from motiontune.config import ConfigError
    from motiontune.configure import load_config

    def problems(**keys) -> str:
        config = {"concepts": [{"path": str(tmp_path)}], **keys}
        with pytest.raises(ConfigError) as error:
            load_config(str(write_config(tmp_path / "c.json", **config)))
        return str(error.value)

    assert "a EMBEDDING run saves as SAFETENSORS" in problems(training_method="EMBEDDING", output_model_format="COMFY_LORA")
    twice = problems(additional_embeddings=[{"placeholder": "<a>"}, {"placeholder": "<a>", "train": False}])
    assert 'additional_embeddings[1].placeholder = "<a>": two embeddings use it' in twice
    assert "additional_embeddings[1].train = false needs additional_embeddings[1].model_name" in twice
    assert "additional_embeddings[0].stop_training_after: not supported yet" in problems(
        additional_embeddings=[{"stop_training_after": 3, "stop_training_after_unit": "EPOCH"}])


def test_saved_embedding_used_as_it_is(tmp_path, tiny_models):
    """An embedding file given as `model_name` with `train: false` rides along a LoRA unchanged (and is saved
    again beside it); its token count comes from the file."""
    from safetensors.torch import load_file

    model = tiny_models("wan-2.1")
    clip = _make_clip(tmp_path / "data", 32)
    (clip.parent / "shapes.txt").write_text("<old> moving shapes\n")
    first = tmp_path / "old.safetensors"
    _train(tmp_path, model, clip.parent, first, training_method="EMBEDDING", output_model_format="SAFETENSORS",
           output_model_destination=str(first), epochs=3, embedding={"placeholder": "<old>", "token_count": 3})
    lora = tmp_path / "lora.safetensors"
    _train(tmp_path, model, clip.parent, lora, epochs=3, output_model_destination=str(lora),
           additional_embeddings=[{"placeholder": "<old>", "model_name": str(first), "train": False, "token_count": None}])
    again = load_file(str(tmp_path / "lora_embeddings" / "old.safetensors"))["umt5xxl"]
    assert again.shape == (3, 32) and torch.equal(again, load_file(str(first))["umt5xxl"])


def test_embedding_through_both_a14b_experts(tmp_path, tiny_models, capsys):
    """WAN 2.2 A14B (the preset's model): every noise level trains the one embedding, through whichever expert
    serves it; both experts stay frozen."""
    from safetensors.torch import load_file

    model = tiny_models("wan-2.2-a14b")
    clip = _make_clip(tmp_path / "data", 32)
    (clip.parent / "shapes.txt").write_text("<shapes>\n")
    destination = tmp_path / "e.safetensors"
    _train(tmp_path, model, clip.parent, destination, model_type="WAN_2_2_T2V_A14B", experts="both",
           training_method="EMBEDDING", output_model_format="SAFETENSORS", output_model_destination=str(destination),
           epochs=6, embedding_learning_rate=1e-2, embedding={"placeholder": "<shapes>", "initial_embedding_text": "shapes"},
           save_every=1, save_every_unit="EPOCH", backup_after_unit="NEVER", backup_before_save=False)
    vectors = load_file(str(destination))["umt5xxl"]
    assert vectors.shape == (1, 32)
    # saved after each epoch: the vectors kept moving, whichever expert the step's noise level went to
    saves = [load_file(str(tmp_path / "workspace" / "save" / f"epoch{i}.safetensors"))["umt5xxl"] for i in range(1, 7)]
    assert all(not torch.equal(a, b) for a, b in zip(saves, saves[1:]))
    assert torch.equal(saves[-1], vectors)
    log = capsys.readouterr().err
    assert "EMBEDDING of high_noise and low_noise" in log and "0.00M trained parameters" in log  # both frozen
    assert "text side: embedding <shapes> at lr 0.01; 32 trained parameters" in log
