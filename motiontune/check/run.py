"""The dry run: one pass through what a run does, by the run's own code, at the released model's sizes on a fake
CUDA device. Each stage calls what `train` calls (train/loop.py's setup, train/step.py, train/backup.py, methods/,
train/events.py's sampling), with the parts built from their configs (parts.py) and every tensor fake."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..config import TrainConfig
from ..models import loading
from .parts import PartBuilder
from .runtime import NOT_COVERED, cuda_stand_ins, describe_error
from .watch import DeviceWatch, Finding

DEVICE = torch.device("cuda", 0)


class _FakeMode(FakeTensorMode):
    """`torch.tensor(data, device="cuda")` is made on the host and then moved, through the mode: as FakeTensorMode
    does where CUDA is not available (the stand-ins say it is)."""

    @property
    def avoid_device_init(self) -> bool:
        return True
CAPTION = "a clip"
STEPS = 100  # the schedule's length: any will do


def dry_run(config: TrainConfig, gpu_gb: float = 24.0) -> dict:
    """Run every stage; → {"stages": [...], "findings": [...], "assumed": {...}, "not_covered": [...]}."""
    mode = _FakeMode(allow_non_fake_inputs=True)
    mode.fake_tensor_converter.set_tensor_memo = lambda t, v: None  # no weak references: parameters must swap
    watch = DeviceWatch()
    folder = Path(tempfile.mkdtemp(prefix="motiontune-check-"))
    run = _Run(config, watch, folder)
    started = time.perf_counter()
    with cuda_stand_ins(int(gpu_gb * 2**30)), _building(PartBuilder(config, mode, watch.name_modules)), \
            _module_hooks(watch), _writers(watch), _pixels_out(), _own_simulations(), _copyable_fakes(), \
            watch.random_draws(), mode, watch:
        for name, stage in run.stages():
            run.do(name, stage)
    return {"stages": run.done, "findings": [f.as_dict() for f in watch.findings], "assumed": watch.assumed,
            "not_covered": NOT_COVERED, "seconds": time.perf_counter() - started, "gpu_gb": gpu_gb}


class _Run:
    def __init__(self, config: TrainConfig, watch: DeviceWatch, folder: Path):
        self.config, self.watch, self.folder = config, watch, folder
        self.done: list[dict] = []
        self.failed = False

    def do(self, name: str, stage) -> None:
        self.watch.stage = name
        started = time.perf_counter()
        note = ""
        if self.failed:
            status = "skipped"
            note = "an earlier stage failed"
        else:
            try:
                note = stage() or ""
                status = "ok"
            except Exception as error:  # the stage could not run to its end: a finding of its own
                status = "failed"
                self.failed = name not in ("backup", "save", "sample")  # the later stages need what these make
                self.watch.findings.append(Finding("error", name, describe_error(error)))
            finally:
                self.watch.modules.clear()
        self.done.append({"name": name, "status": status, "seconds": round(time.perf_counter() - started, 2), "note": note})

    def stages(self):
        from ..estimate.shapes import config_shape
        from ..models import family_for

        self.family = family_for(self.config, DEVICE)
        self.shape = config_shape(self.config)
        return [("load", self.load), ("encode a clip", self.encode_clip), ("encode captions", self.encode_captions),
                ("training step", self.train_step), ("backup", self.backup), ("save", self.save),
                ("sample", self.sample)]

    # --- the stages ---------------------------------------------------------------------------------------------
    def load(self):
        self.family.load_transformers()
        if hasattr(self.family, "estimate_prepare"):
            # what the family declares a fake-tensor run needs where its forward reads values (HunyuanVideo 1.5 sorts
            # tokens by their masks: every token counts as valid; HiDream's MoE routes every token alike)
            for module in self.family.transformers():
                self.family.estimate_prepare(module)
        return f"{', '.join(e.name for e in self.family.trained_experts())} built from {self.config.base_model_name}'s configs"

    def encode_clip(self):
        from ..data.latents import EncodedClip

        family, shape = self.family, self.shape
        family.load_vae()
        frames = np.zeros((shape.frames, shape.height, shape.width, 3), dtype=np.uint8)
        stored = {"value": family.encode_video(frames)}
        if family.encodes_first_frame:
            stored["image"] = family.encode_first_frame(frames[0])
        stored.update(family.clip_extras(frames))  # a first-and-last-frame condition
        # the conditions beside the clip (VACE's control video), encoded as data/latents.py does from the clip's frames
        conditions = {role: family.encode_condition(role, frames) for role in family.condition_roles(self.config)}
        if family.AUDIO_SAMPLE_RATE:
            fps = self.config.video_config.target_fps or 24.0
            sound = np.zeros((family.AUDIO_CHANNELS, int(family.AUDIO_SAMPLE_RATE * shape.frames / fps)), np.float32)
            stored["audio"] = family.encode_audio(sound, shape.frames, fps)
        clip = EncodedClip(Path("clip.mp4"), stored, (CAPTION,), 1.0, tuple(i / 16 for i in range(shape.frames)),
                           conditions_stored=conditions)
        self.clips = [clip] * shape.batch
        kinds = [*sorted(k for k in stored if k != "value"), *conditions]
        return f"{shape.batch} × {shape.frames} frames × {shape.width}x{shape.height}" + (f" (+ {', '.join(kinds)})" if kinds else "")

    def encode_captions(self):
        from ..sample import sample_prompts

        texts = sorted({CAPTION} | sample_prompts(self.config) | ({""} if self.config.text_encoder.dropout_probability > 0 else set()))
        self.family.text_encoders()
        encoded = self.family.encode_prompts(texts)
        self.embeddings = {text: self._cached_row(encoded[i]) for i, text in enumerate(texts)}
        return f"{len(texts)} prompts"

    def _cached_row(self, encoded):
        """What the cache hands a run: host tensors read from disk, with values (a packed row's header is read).
        The family's text row for a fake step (`estimate_step_inputs`, real zeros of its layout) stands in for the
        encoder's fake output, whose shape it must have."""
        from torch.utils._python_dispatch import _disable_current_modes

        from ..estimate.configs import load_dtype, transformer_config

        cfg = transformer_config(self.config, self.family.trained_experts()[0].name)[0]
        shape = self.shape
        with _disable_current_modes():
            x0 = torch.empty(1, cfg.get("out_channels") or cfg["in_channels"], *shape.latent, device="meta")
            row = self.family.estimate_step_inputs(cfg, x0, load_dtype(self.config))[0][0]
        if row.shape != encoded.shape:
            raise RuntimeError(f"the text encoder's rows are {list(encoded.shape)}, the family's layout for a step "
                               f"{list(row.shape)}: encode_prompts and estimate_step_inputs disagree")
        return row

    def train_step(self):
        from ..train.backup import Position
        from ..train.loop import _setup_experts
        from ..train.step import Step
        from ..train.text_conditioning import TextConditioning
        from ..util.ranks import Ranks

        config, family = self.config, self.family
        self.text_side = TextConditioning(family, config, self.embeddings)
        if not self.text_side.live:  # as data/latents.py's Encoding.release before the transformer arrives
            family.release_text_encoder()
        family.park_vae() if config.samples else family.release_vae()
        trainings = _setup_experts(config, family, Ranks(), DEVICE, STEPS)
        text_trainings = [t for t in [self.text_side.prepare(STEPS)] if t]
        self.step = Step(family, config, Ranks(), trainings, text_trainings, self.text_side)
        batch = list(range(len(self.clips)))
        for attempt in range(8):  # noise levels are drawn: until every trained expert has had a batch
            loss, _ = self.step.accumulate(self.clips, batch)
            self.step.apply(loss, Position(attempt, 0, attempt + 1), lambda position: None)
            if all(t.steps for t in self.step.trainings):
                break
        stepped = [f"{t.expert.label or t.expert.name} {t.steps}" for t in self.step.everything]
        return "optimizer steps: " + ", ".join(stepped)

    def backup(self):
        from ..train.backup import Position, write_backup
        from ..util.ranks import Ranks

        write_backup(self.folder / "backup", self.config, Position(1, 0, 1), self.step.everything, self.step.generators,
                     None, Ranks(), self.step.scaler)

    def save(self):
        from ..methods import METHODS
        from ..methods.embedding import save_additional as save_additional_embeddings

        destination = self.folder / Path(self.config.output_model_destination).name
        written = METHODS[self.config.training_method].save(self.family, self.config, destination)
        written += save_additional_embeddings(self.family, self.config, destination)
        return f"{len(written)} file(s)"

    def sample(self):
        from ..sample import prepare_samples
        from ..train.events import _sample
        from ..util.ranks import Ranks

        if not self.config.samples:
            return "the config renders no samples"
        request, fps = prepare_samples(self.config, self.family, self.embeddings)[0]
        # one denoising step (two where the pipeline refuses one, and where two experts share the steps: the first
        # step is the high-noise expert's, the last, near noise 0, the low-noise one's, so both take their turn on the
        # device), then the decode
        steps = max(getattr(self.family, "MIN_SAMPLE_STEPS", 1), len(self.family.transformers()))
        request = dataclasses.replace(request, steps=steps)
        self.text_side.refresh_samples([(request, fps)], self.config.samples[:1])
        _, errors = _sample(self.family, [(request, fps)], self.config.samples[:1], self.folder, "check",
                            not self.config.video_config.use_temporal_attention, Ranks())
        if errors:
            raise RuntimeError(errors[0])
        return f"{request.frames} × {request.width}x{request.height}, {request.steps} step(s), decoded"


@contextlib.contextmanager
def _building(builder: PartBuilder):
    loading.part_builder = builder
    try:
        yield
    finally:
        loading.part_builder = None


@contextlib.contextmanager
def _module_hooks(watch: DeviceWatch):
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    handles = [register_module_forward_pre_hook(watch.entered), register_module_forward_hook(watch.left, always_call=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _writers(watch: DeviceWatch):
    """Files a run writes from tensors (safetensors, torch.save): what would be written is checked, and a small
    placeholder written instead (fake tensors have no bytes)."""
    import safetensors.torch

    original_save_file, original_save = safetensors.torch.save_file, torch.save

    def save_file(tensors, filename, metadata=None):
        watch.saved(Path(filename).name, tensors)
        Path(filename).write_text(json.dumps(sorted(tensors)))

    def save(obj, f, *args, **kwargs):
        watch.saved(getattr(f, "name", str(f)).rpartition("/")[2], obj)
        if hasattr(f, "write"):
            f.write(b"motiontune check")
        else:
            Path(f).write_bytes(b"motiontune check")

    patched = []
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(("motiontune", "diffusers", "transformers", "safetensors", "peft")):
            continue
        for attribute in ("save_file", "safe_save_file"):
            if vars(module).get(attribute) is original_save_file:
                setattr(module, attribute, save_file)
                patched.append((module, attribute))
    torch.save = save
    try:
        yield
    finally:
        torch.save = original_save
        for module, attribute in patched:
            setattr(module, attribute, original_save_file)


@contextlib.contextmanager
def _copyable_fakes():
    """`copy.deepcopy` of a tensor as a run makes it (LTX-2's pipeline copies its scheduler, whose sigmas are host
    tensors, or GPU ones once a sample has set its timesteps). PyTorch copies a tensor's storage, which inside the fake
    mode is made on the meta device and refused: a fake tensor becomes a fake clone on its device, a real host tensor
    is copied outside the fake mode, as on the host in a run."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils._python_dispatch import _disable_current_modes

    original = torch.Tensor.__deepcopy__

    def deepcopy(tensor, memo):
        if id(tensor) in memo:
            return memo[id(tensor)]
        if not isinstance(tensor, FakeTensor):
            with _disable_current_modes():
                return original(tensor, memo)
        copied = tensor.detach().clone().requires_grad_(tensor.requires_grad)
        if hasattr(tensor, "_dry_value"):
            copied._dry_value = tensor._dry_value.clone()
        memo[id(tensor)] = copied
        return copied

    torch.Tensor.__deepcopy__ = deepcopy
    try:
        yield
    finally:
        torch.Tensor.__deepcopy__ = original


@contextlib.contextmanager
def _own_simulations():
    """Sampling asks whether a decode fits by simulating it on fake tensors of its own (models/wan_decode.py): that
    runs as in a real run, outside the dry run's fake device."""
    from torch.utils._python_dispatch import _disable_current_modes

    from ..models import wan_decode

    original = wan_decode.decode_peak

    def decode_peak(*args, **kwargs):
        with _disable_current_modes():
            return original(*args, **kwargs)

    wan_decode.decode_peak = decode_peak
    try:
        yield
    finally:
        wan_decode.decode_peak = original


@contextlib.contextmanager
def _pixels_out():
    """The pipelines' last step, decoded pixels (and a sound track) to numpy: black frames of the decoded shape,
    silence of the sound's (a fake tensor has no values to hand over; the decode itself ran)."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.video_processor import VideoProcessor

    video, image = VideoProcessor.postprocess_video, VaeImageProcessor.postprocess

    def postprocess_video(self, video, output_type="np"):
        batch, channels, frames, height, width = video.shape
        return np.zeros((batch, frames, height, width, channels), np.float32)

    def postprocess(self, image, output_type="pil", do_denormalize=None):
        batch, channels, height, width = image.shape
        return np.zeros((batch, height, width, channels), np.float32)

    from torch._subclasses.fake_tensor import FakeTensor

    to_numpy = torch.Tensor.numpy

    def numpy(tensor, *args, **kwargs):
        """A fake host tensor handed to numpy (a sample's sound track): its values where the run knows them, else
        zeros of its shape (silence). One on the GPU is refused, as a GPU run refuses it."""
        if not isinstance(tensor, FakeTensor):
            return to_numpy(tensor, *args, **kwargs)
        if tensor.device.type != "cpu":
            raise TypeError(f"can't convert {tensor.device} device type tensor to numpy. Use Tensor.cpu() to copy the "
                            "tensor to host memory first.")
        known = getattr(tensor, "_dry_value", None)
        if known is not None:
            return known.numpy()
        kind = np.float32 if tensor.is_floating_point() else np.bool_ if tensor.dtype == torch.bool else np.int64
        return np.zeros(tuple(tensor.shape), kind)

    VideoProcessor.postprocess_video, VaeImageProcessor.postprocess = postprocess_video, postprocess
    torch.Tensor.numpy = numpy
    try:
        yield
    finally:
        VideoProcessor.postprocess_video, VaeImageProcessor.postprocess = video, image
        torch.Tensor.numpy = to_numpy

