"""`motiontune estimate`: the memory a run will need on its training device, from the model config alone.

No weights are read. The family (models/) declares what is needed: its released models' configs, its transformer
class and kinds of block, the inputs of a step and of a sampling call, its VAE and text encoders. Modules:
- configs.py: the family and its parts' configs (a local folder's, or the released model's);
- weights.py: weights, trained parameters and optimizer state, from a meta-device transformer;
- simulation.py: activations, from one step on fake tensors (models/fake_memory.py);
- moments.py: a first run's encoding, a live text encoder, rendering a sample;
- cuda.py: what a CUDA run adds that the CPU simulation does not see, and the headroom "fits" keeps;
- host.py: host memory (RAM) at the moments of a run on an accelerator;
- step.py: the estimate itself; advice.py: the cheapest changes that fit; report.py: the printed text.
"""

from .advice import cheapest_changes, smallest_floor
from .configs import transformer_config
from .report import SEED_TABLE, report
from .result import DECODING, DENOISING, GB, Estimate, EstimateError, Line, Options, Shape
from .shapes import config_shape, make_shape
from .simulation import activation_peak, simulate_step
from .step import estimate
from .weights import count_weights

__all__ = ["DECODING", "DENOISING", "GB", "SEED_TABLE", "Estimate", "EstimateError", "Line", "Options", "Shape",
           "activation_peak", "cheapest_changes", "config_shape", "count_weights", "estimate", "make_shape", "report",
           "simulate_step", "smallest_floor", "transformer_config"]
