"""motiontune: fine-tune video diffusion models on your own clips."""

import logging as _logging

# peft imports torchao whenever it is installed, and torchao then warns about optional CUDA kernels it cannot
# load and enum registrations: noise on every run that says nothing about the user's training.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
