"""ComfyUI in the tests: `harness` (imported by tests) runs `runner.py` in the ComfyUI venv."""
