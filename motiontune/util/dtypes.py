"""The config's dtype names as torch dtypes."""

import torch

TORCH_DTYPES = {"FLOAT_32": torch.float32, "BFLOAT_16": torch.bfloat16, "FLOAT_16": torch.float16}
# The half-precision dtypes autocast computes in (FLOAT_32 runs without autocast)
HALF_DTYPES = {"BFLOAT_16": torch.bfloat16, "FLOAT_16": torch.float16}
