#!/usr/bin/env bash
# Set-up for benchmarks/peers.py: brings the three peer trainers' source into the folder PEERS names, each at a
# recorded commit, and installs each into its own virtualenv there with the CPU build of torch.
# Never touches the project's own venv. Idempotent: a step already done is skipped.
#
#   PEERS=~/peers bash benchmarks/peers_setup.sh                               # all peers, cloned from GitHub
#   PEERS=~/peers MIRRORS=~/mirrors bash benchmarks/peers_setup.sh musubi-tuner   # one peer, from local mirrors
#
# Source: cloned from GitHub into PEERS, or, when MIRRORS names a folder, read from a bare git repository there
# named <owner>+<name> or <owner>+<name>/repo (for example ~/mirrors/kohya-ss+musubi-tuner). The work tree is the
# pinned commit below (PINNED) when the repository has it, else its HEAD, which is then reported.
# torch: pinned to 2.13.0 (add --index-url https://download.pytorch.org/whl/cpu where pip does not find a CPU
# build on its own) through a constraints file, so no peer's requirement upgrades it.
set -euo pipefail
if [ -z "${PEERS:-}" ]; then
  echo "PEERS is not set: name the folder the peers go into, e.g. PEERS=~/peers bash $0" >&2
  exit 2
fi
MIRRORS=${MIRRORS:-}
PY=${PYTHON:-python3.11}
TORCH=2.13.0
TORCHVISION=0.28.0
declare -A REPO=([musubi-tuner]=kohya-ss/musubi-tuner [diffusion-pipe]=tdrussell/diffusion-pipe
                 [finetrainers]=a-r-r-o-w/finetrainers [ComfyUI]=Comfy-Org/ComfyUI)
declare -A PINNED=([musubi-tuner]=30c658c4f4b0bf05038b3346eff9670259b10fc7
                   [diffusion-pipe]=8f83dbf25d03219df705570ec03e62be04bc402f
                   [finetrainers]=f476c3717da6cbfb1070505a99ee989426b46d9c)
mkdir -p "$PEERS"
CONSTRAINTS="$PEERS/constraints.txt"
printf 'torch==%s\ntorchvision==%s\n' "$TORCH" "$TORCHVISION" > "$CONSTRAINTS"

# Work tree of repo $1 at $PEERS/$1 (files only; blobs missing from a partial mirror, e.g. large
# tokenizer files we do not use, are skipped and listed). Writes $PEERS/$1/.commit.
checkout() {
  local name=$1 dest="$PEERS/$1" git_dir=""
  [ -f "$dest/.commit" ] && return 0
  if [ -n "$MIRRORS" ]; then
    for candidate in "$MIRRORS/${REPO[$1]/\//+}/repo" "$MIRRORS/${REPO[$1]/\//+}"; do
      [ -d "$candidate" ] && git --git-dir="$candidate" rev-parse -q --verify HEAD >/dev/null 2>&1 && { git_dir=$candidate; break; }
    done
    [ -n "$git_dir" ] || echo "  $name: no mirror of ${REPO[$1]} in $MIRRORS, cloning it"
  fi
  if [ -z "$git_dir" ]; then
    git_dir="$PEERS/.git-$name"
    [ -d "$git_dir" ] || git clone --bare --filter=blob:limit=5m "https://github.com/${REPO[$1]}" "$git_dir"
  fi
  local rev=HEAD  # the pinned commit where the repository has it
  if [ -n "${PINNED[$name]:-}" ] && git --git-dir="$git_dir" cat-file -e "${PINNED[$name]}^{commit}" 2>/dev/null; then
    rev=${PINNED[$name]}
  fi
  local commit; commit=$(git --git-dir="$git_dir" rev-parse "$rev")
  rm -rf "$dest"; mkdir -p "$dest"
  git --git-dir="$git_dir" ls-tree -r "$rev" | while read -r _mode type sha path; do
    [ "$type" = blob ] || continue
    mkdir -p "$dest/$(dirname "$path")"
    git --git-dir="$git_dir" cat-file blob "$sha" > "$dest/$path" 2>/dev/null \
      || { rm -f "$dest/$path"; echo "  $name: skipped $path (blob not in the mirror)"; }
  done
  echo "$commit" > "$dest/.commit"
  if [ -n "${PINNED[$name]:-}" ] && [ "$commit" != "${PINNED[$name]}" ]; then
    echo "  $name: at $commit, not the pinned ${PINNED[$name]} (figures in RESULTS.md are for the pinned one)"
  fi
}

venv() {  # $1 = name; creates $PEERS/venv-$1 with the CPU torch
  local v="$PEERS/venv-$1"
  [ -x "$v/bin/python" ] || "$PY" -m venv "$v"
  "$v/bin/pip" install -q -c "$CONSTRAINTS" "torch==$TORCH" "torchvision==$TORCHVISION" psutil
  torchvision_without_ops "$v"
}

# The only torchvision wheel for Linux on PyPI is a CUDA build: its operator library (_C.so, needs libc10_cuda.so)
# cannot load beside the CPU torch, and its _meta_registrations module then fails on import
# ("operator torchvision::nms does not exist"), taking `import torchvision` down with it. The peers use only its
# Python parts (transforms), so skip the registrations when the operators are missing (a patch of this venv's
# torchvision; with a CPU torchvision from the PyTorch index, nothing changes).
torchvision_without_ops() {
  local tv; tv=$("$1/bin/python" -c 'import importlib.util as u; print(u.find_spec("torchvision").submodule_search_locations[0])')
  [ -f "$tv/_meta_registrations_ops.py" ] && return 0
  mv "$tv/_meta_registrations.py" "$tv/_meta_registrations_ops.py"
  printf '%s\n' 'import torchvision.extension' 'if torchvision.extension._has_ops():' \
    '    from torchvision._meta_registrations_ops import *  # noqa: F401,F403' > "$tv/_meta_registrations.py"
}

setup_musubi() {
  checkout musubi-tuner; venv musubi-tuner
  # Its pyproject pins, less bitsandbytes (8-bit optimizers only, a CUDA library; we train with AdamW) and
  # opencv's GUI build (headless is enough); the package itself without deps.
  "$PEERS/venv-musubi-tuner/bin/pip" install -q -c "$CONSTRAINTS" accelerate==1.6.0 av==14.0.1 diffusers==0.32.1 \
    einops==0.7.0 huggingface-hub==0.34.3 opencv-python-headless==4.10.0.84 "pillow>=11.3.0" safetensors==0.4.5 \
    toml==0.10.2 tqdm==4.67.1 transformers==4.57.6 voluptuous==0.15.2 ftfy==6.3.1 easydict==1.13 \
    sentencepiece==0.2.1 tensorboard
  "$PEERS/venv-musubi-tuner/bin/pip" install -q --no-deps -e "$PEERS/musubi-tuner"
  patch_musubi
}

# Local patches of musubi-tuner's copy (never of motiontune), each an exact replacement that fails loudly if the
# peer's code moved. They let it load the benchmark's reduced model (it hard-codes the full-size one) and run on
# a CPU build of torch. See benchmarks/RESULTS.md for why each is needed.
# patch_peer NAME ROOT < python defining PATCHES = [(file under ROOT, old text, new text[, count]), ...]
patch_peer() {
  local code; code="$(cat)
import pathlib, sys
root = pathlib.Path(sys.argv[1])
for name, old, new, *count in PATCHES:
    path = root / name
    text = path.read_text()
    if new in text:
        continue
    if text.count(old) != (count or [1])[0]:
        sys.exit(f'$1 patch: {name} no longer has {(count or [1])[0]} of {old!r}')
    path.write_text(text.replace(old, new))
    print(f'  patched $1: {name}')"
  "$PEERS/venv-$1/bin/python" -c "$code" "$2"
}

patch_musubi() {
  patch_peer musubi-tuner "$PEERS/musubi-tuner/src/musubi_tuner" <<'PY'
PATCHES = [
    # 1. the UMT5-XXL encoder's shape is fixed in umt5_xxl(): read the benchmark's one-layer encoder shape
    ("wan/modules/t5.py", "model = umt5_xxl(encoder_only=True, return_tokenizer=False)",
     "model = umt5_xxl(encoder_only=True, return_tokenizer=False, "
     "**__import__('json').loads(os.environ.get('MUSUBI_T5_CONFIG', '{}')))"),
    # 2. the tokenizer comes from the Hub ("Wan-AI/Wan2.1-T2V-14B"); the CLI has no option for a local one
    ("wan/modules/t5.py", "        if tokenizer_path is None:\n            tokenizer_path = \"Wan-AI/Wan2.1-T2V-14B\"",
     "        tokenizer_path = tokenizer_path or os.environ.get('MUSUBI_T5_TOKENIZER')\n"
     "        if tokenizer_path is None:\n            tokenizer_path = \"Wan-AI/Wan2.1-T2V-14B\""),
    # 3. the block count comes from the task's config (30 for t2v-1.3B): the benchmark's DiT has fewer blocks
    ("wan/modules/model.py", "            num_layers=config.num_layers,",
     "            num_layers=int(__import__('os').environ.get('MUSUBI_WAN_NUM_LAYERS', config.num_layers)),"),
    # 4. CPU blocker: a default argument calls torch.cuda.current_device() when the module is imported, which
    #    raises "Torch not compiled with CUDA enabled" on a CPU build of torch (every WAN script imports it)
    ("wan/modules/t5.py", "        device=torch.cuda.current_device(),", "        device=\"cpu\","),
    # 5. CPU blocker: the time embedding is computed in float32 under `autocast(dtype=torch.float32)`, which CUDA
    #    honours and the CPU does not ("CPU autocast only supports bfloat16/float16": disabled), so its bf16
    #    weights meet a float32 input: "mat1 and mat2 must have the same dtype". Compute it in float32 as on
    #    CUDA by casting those two frozen layers to float32 (their outputs must be float32: asserted below it).
    ("wan/modules/model.py",
     "                e = self.time_embedding(sinusoidal_embedding_1d(self.freq_dim, t).float())\n"
     "                e0 = self.time_projection(e).unflatten(1, (6, self.dim))",
     "                e = self.time_embedding.float()(sinusoidal_embedding_1d(self.freq_dim, t).float())\n"
     "                e0 = self.time_projection.float()(e).unflatten(1, (6, self.dim))"),
    # 6. CPU blocker: WanLayerNorm normalises in float32 with the affine weights still bf16 (norm3, the
    #    cross-attention norm); CUDA's layer_norm accepts mixed dtypes, the CPU's does not ("mixed dtype (CPU):
    #    expect parameter to have scalar type of Float"). Upcast the weights as CUDA does internally.
    ("wan/modules/model.py", "        return super().forward(x.float()).type_as(x)",
     "        w, b = self.weight, self.bias\n"
     "        return torch.nn.functional.layer_norm(x.float(), self.normalized_shape, None if w is None else w.float(),\n"
     "            None if b is None else b.float(), self.eps).type_as(x)"),
]
PY
}

setup_finetrainers() {
  checkout finetrainers; venv finetrainers
  # requirements.txt less bitsandbytes (CUDA), ruff (lint) and torchao (finetrainers never imports it; today's
  # torchao breaks diffusers 0.33's import: "name 'logger' is not defined" in diffusers/quantizers/torchao);
  # wandb stays (imported at the top of its trainer, disabled by WANDB_MODE at run time); decord is its video
  # reader. Its requirements are unpinned: pin the libraries to their releases of the commit's time (June 2025),
  # as a user installing it then got them; datasets at its floor, 3.3.2, the last that decodes videos with decord
  # (3.4+ returns torchvision's VideoReader, which torchvision 0.28 no longer has).
  grep -v -E '^(bitsandbytes|ruff|torchao)' "$PEERS/finetrainers/requirements.txt" > "$PEERS/finetrainers-req.txt"
  "$PEERS/venv-finetrainers/bin/pip" uninstall -q -y torchao 2>/dev/null || true
  printf '%s\n' diffusers==0.33.1 transformers==4.52.4 accelerate==1.7.0 peft==0.15.2 datasets==3.3.2 \
    torchdata==0.11.0 huggingface-hub==0.32.4 > "$PEERS/finetrainers-pins.txt"
  "$PEERS/venv-finetrainers/bin/pip" install -q -c "$CONSTRAINTS" -c "$PEERS/finetrainers-pins.txt" \
    -r "$PEERS/finetrainers-req.txt"
  "$PEERS/venv-finetrainers/bin/pip" install -q --no-deps -e "$PEERS/finetrainers"
  patch_peer finetrainers "$PEERS/finetrainers/finetrainers" <<'PY'
PATCHES = [
    # 1. import error with torch >= 2.8 (the only CPU torch here is 2.13): torch's private context-parallel API
    #    moved (`from torch.distributed.tensor.experimental._attention import _AttentionOp` fails). We train
    #    without context parallelism: take the branch it has for torch < 2.6.
    ("models/attention_dispatch.py", 'if is_torch_version(">=", "2.6.0"):\n    from torch.distributed.tensor.experimental._attention import (',
     'def _has_cp_api():\n    try:\n        from torch.distributed.tensor.experimental._attention import _AttentionOp  # noqa: F401\n'
     '    except ImportError:\n        return False\n    return True\n\n\n'
     'if is_torch_version(">=", "2.6.0") and _has_cp_api():\n    from torch.distributed.tensor.experimental._attention import ('),
    # 2. CPU blocker: with no accelerator, the device type falls back to "cuda" (utils/torch.py, get_device_info)
    ("utils/torch.py", '    if device_type is None:\n        device_type = "cuda"',
     '    if device_type is None:\n        device_type = "cpu"'),
    # 3. torchvision 0.28 (the release for torch 2.13) has no io.video_reader: a type check names it. Videos here
    #    are read with decord (datasets < 3.4, pinned above), so check for decord's reader alone.
    ("data/dataset.py", "(decord.VideoReader, torchvision.io.video_reader.VideoReader)", "(decord.VideoReader,)"),
    # 4. CPU blocker: without WORLD_SIZE the world size is torch.cuda.device_count(), 0 on a CPU, and then
    #    "Data parallel degree must be equal to world size" (trainer/base.py). One process is one.
    ("trainer/base.py", 'world_size = int(os.environ.get("WORLD_SIZE", torch.cuda.device_count()))',
     'world_size = int(os.environ.get("WORLD_SIZE", max(1, torch.cuda.device_count())))'),
    # 5. CPU blocker: the memory statistics it logs are None without CUDA or MPS, and round(None) raises
    #    (utils/memory.py, get_memory_statistics). Report 0 GB there.
    ("utils/memory.py", "    if x is not None:\n        return x / 1024**3", "    if x is not None:\n        return x / 1024**3\n    return 0.0"),
    # 6. CPU blocker: after precomputing (and validating) it resets CUDA's peak-memory counter on the training
    #    device: "Expected a cuda device, but got: cpu" (trainer/sft_trainer/trainer.py, twice). Only with CUDA.
    ("trainer/sft_trainer/trainer.py", "torch.cuda.reset_peak_memory_stats(parallel_backend.device)",
     "torch.cuda.is_available() and torch.cuda.reset_peak_memory_stats(parallel_backend.device)", 2),
    # 7. CPU blocker: precomputed items are loaded to `torch.device(self._rank)`, an accelerator index: "Cannot
    #    access accelerator device when none is available" (data/precomputation.py, twice). Load to the CPU there.
    ("data/precomputation.py", "        map_location = torch.device(self._rank)",
     "        map_location = torch.device(self._rank) if torch.cuda.is_available() else torch.device(\"cpu\")", 2),
]
PY
}

setup_diffusion_pipe() {
  checkout diffusion-pipe; checkout ComfyUI; venv diffusion-pipe
  # its submodules/ComfyUI is a git submodule: link the checked-out ComfyUI in its place
  rm -rf "$PEERS/diffusion-pipe/submodules/ComfyUI"; mkdir -p "$PEERS/diffusion-pipe/submodules"
  ln -sfn "$PEERS/ComfyUI" "$PEERS/diffusion-pipe/submodules/ComfyUI"
  # requirements.txt less bitsandbytes (CUDA), wandb, optimum-quanto, comfy-kitchen/comfy-aimdo (CUDA kernels);
  # deepspeed built without its CUDA ops (DS_BUILD_OPS=0, its default: ops are JIT-built when used, we use none).
  grep -v -E '^(bitsandbytes|wandb|optimum-quanto|comfy-kitchen|comfy-aimdo)' "$PEERS/diffusion-pipe/requirements.txt" \
    > "$PEERS/diffusion-pipe-req.txt"
  DS_BUILD_OPS=0 "$PEERS/venv-diffusion-pipe/bin/pip" install -q -c "$CONSTRAINTS" -r "$PEERS/diffusion-pipe-req.txt"
  if [ -f "$PEERS/ComfyUI/requirements.txt" ]; then
    # less torch/torchvision (pinned above) and ComfyUI's web front-end packages
    grep -v -E '^(torch|torchvision)$|^comfyui-' "$PEERS/ComfyUI/requirements.txt" > "$PEERS/comfyui-req.txt"
    "$PEERS/venv-diffusion-pipe/bin/pip" install -q -c "$CONSTRAINTS" -r "$PEERS/comfyui-req.txt" || true
  fi
}

todo=("$@"); [ ${#todo[@]} -gt 0 ] || todo=(musubi-tuner finetrainers diffusion-pipe)
for name in "${todo[@]}"; do
  echo "== $name"
  case $name in
    musubi-tuner) setup_musubi;; finetrainers) setup_finetrainers;; diffusion-pipe) setup_diffusion_pipe;;
    *) echo "unknown peer $name" >&2; exit 2;;
  esac
done
for name in "${todo[@]}"; do echo "$name $(cat "$PEERS/$name/.commit")"; done
