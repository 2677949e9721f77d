"""Device bugs of the kinds users hit, planted in the real code path for tests/test_dry_run.py. The dry run's process
calls these before it starts (motiontune/check/child.py: "before"); each swaps one small piece of motiontune for a
copy with the bug."""

import torch


def cpu_tensor_in_step():
    """A step makes its noise levels on the host (a forgotten `device=`): the transformer's time embedding meets them."""
    from motiontune.models.wan import WanFamily

    predict = WanFamily.predict

    def predict_with_host_sigma(self, noisy, sigma, text, expert, conditioning=None):
        sigma = torch.full(tuple(sigma.shape), 0.5)  # the planted bug: no device=
        return predict(self, noisy, sigma, text, expert, conditioning)

    WanFamily.predict = predict_with_host_sigma


def cpu_generator_for_cuda_noise():
    """The step's noise generator made for the CPU while the noise is drawn on the GPU."""
    from motiontune.train.step import Step

    init = Step.__init__

    def init_with_host_generator(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.generators["noise"] = torch.Generator().manual_seed(self.config.seed)  # the planted bug: no device=

    Step.__init__ = init_with_host_generator


def saved_tensor_left_on_device():
    """The LoRA's tensors handed to the file writer without moving them to host memory."""
    from peft import get_peft_model_state_dict

    from motiontune.methods import lora

    def lora_state_dict_on_device(expert):
        state = get_peft_model_state_dict(expert.module, adapter_name=lora.ADAPTER)
        return {k: v.detach().float().contiguous() for k, v in state.items()}  # the planted bug: no .to("cpu")

    lora.lora_state_dict = lora_state_dict_on_device


def imported_objects_frozen():
    """Not a bug: a speed-up for the tests' dry runs. The libraries' objects (millions, once torch, transformers,
    diffusers and every family are imported) moved out of the collector's reach with `gc.freeze`, so each
    `gc.collect` the run's code calls after releasing an encoder (models/loading.py) scans only what the run made."""
    import gc

    import diffusers  # noqa: F401  (the pipelines and models the stages use, imported now rather than by the first run)
    import transformers  # noqa: F401

    import motiontune.check.run  # noqa: F401
    from motiontune.models.registry import families

    families()
    for name in ("diffusers.pipelines", "diffusers.models", "transformers.models.umt5", "transformers.models.t5"):
        __import__(name)
    gc.collect()
    gc.freeze()

