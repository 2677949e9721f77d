#!/usr/bin/env bash
# Set-up for benchmarks/peers.py: brings the three peer trainers' source to $PEERS (default /work/peers),
# each at a recorded commit, and installs each into its own virtualenv there with the CPU build of torch.
# Never touches the project's own venv. Idempotent: a step already done is skipped.
#
#   bash benchmarks/peers_setup.sh            # all peers
#   PEERS=/somewhere bash benchmarks/peers_setup.sh musubi-tuner finetrainers
#
# Source: a bare git mirror of each repository is expected at $MIRRORS/<owner>+<name>/repo (the agent tooling's
# `fetch github:<owner>/<name>` puts it there); without one, the script clones from GitHub. The work tree is the
# mirror's HEAD, and the commit is checked against PINNED below (a different commit is used but reported).
# torch: pinned to 2.13.0 (this machine's pip finds the CPU wheel locally; elsewhere add
# --index-url https://download.pytorch.org/whl/cpu) through a constraints file, so no peer's requirement upgrades it.
set -euo pipefail
PEERS=${PEERS:-/work/peers}
MIRRORS=${MIRRORS:-/work/.mirror}
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
  local name=$1 dest="$PEERS/$1" git_dir="$MIRRORS/${REPO[$1]/\//+}/repo"
  [ -f "$dest/.commit" ] && return 0
  if [ ! -d "$git_dir" ]; then
    git_dir="$PEERS/.git-$name"
    [ -d "$git_dir" ] || git clone --bare --filter=blob:limit=5m "https://github.com/${REPO[$1]}" "$git_dir"
  fi
  local commit; commit=$(git --git-dir="$git_dir" rev-parse HEAD)
  rm -rf "$dest"; mkdir -p "$dest"
  git --git-dir="$git_dir" ls-tree -r HEAD | while read -r _mode type sha path; do
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
patch_musubi() {
  "$PEERS/venv-musubi-tuner/bin/python" - "$PEERS/musubi-tuner/src/musubi_tuner" <<'PY'
import pathlib, sys
root = pathlib.Path(sys.argv[1])
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
]
for name, old, new in PATCHES:
    path = root / name
    text = path.read_text()
    if new in text:
        continue
    if text.count(old) != 1:
        sys.exit(f"musubi-tuner patch: {name} no longer has exactly one {old!r}")
    path.write_text(text.replace(old, new))
    print(f"  patched {name}")
PY
}

setup_finetrainers() {
  checkout finetrainers; venv finetrainers
  # requirements.txt less bitsandbytes (CUDA), wandb (logging service) and ruff (lint); decord is its video reader.
  grep -v -E '^(bitsandbytes|wandb|ruff)' "$PEERS/finetrainers/requirements.txt" > "$PEERS/finetrainers-req.txt"
  "$PEERS/venv-finetrainers/bin/pip" install -q -c "$CONSTRAINTS" -r "$PEERS/finetrainers-req.txt"
  "$PEERS/venv-finetrainers/bin/pip" install -q --no-deps -e "$PEERS/finetrainers"
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
    grep -v -E '^(torch|comfy)' "$PEERS/ComfyUI/requirements.txt" > "$PEERS/comfyui-req.txt"
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
