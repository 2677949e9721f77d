"""Helpers every layer may use and that use nothing of motiontune: atomic files, ranks, quantized
Linear layers, the dtype names, process liveness."""
