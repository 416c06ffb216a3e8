# Source me:  source scripts/cuda-env.sh [VENV]     (VENV default: $KINO_CUDA_VENV or $HOME/.kino-cuda-venv)
# Sets up the environment for `cargo build --features cuda|cudnn|flash-attn` with the toolchain
# that scripts/install-cuda-toolchain.sh put into VENV. Build for another card with e.g.
#   CUDA_COMPUTE_CAP=89 source scripts/cuda-env.sh    (RTX 40xx / L4 / L40S; 80 A100, 86 RTX 30xx,
#                                                       90 H100/H200, 100 B200, 120 RTX 50xx)
_kino_venv="${1:-${KINO_CUDA_VENV:-$HOME/.kino-cuda-venv}}"
_kino_site="$("$_kino_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)"
if [ -z "$_kino_site" ] || [ ! -x "$_kino_site/nvidia/cu13/bin/nvcc" ]; then
    echo "cuda-env.sh: no CUDA toolchain in '$_kino_venv'; run scripts/install-cuda-toolchain.sh '$_kino_venv' first" >&2
    return 1 2>/dev/null || exit 1
fi
export KINO_CUDA_VENV="$_kino_venv"
export CUDA_ROOT="$_kino_site/nvidia/cu13"
export CUDA_PATH="$CUDA_ROOT"
export CUDA_HOME="$CUDA_ROOT"
export CUDNN_LIB="$_kino_site/nvidia/cudnn/lib"
# `--features flash-attn` needs CUTLASS (vendor/candle-flash-attn/build.rs): a checkout at the pinned
# commit in VENV/cutlass unless CUTLASS_DIR says otherwise.
export CUTLASS_DIR="${CUTLASS_DIR:-$_kino_venv/cutlass}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export PATH="$CUDA_ROOT/bin:$CUDA_ROOT/nvvm/bin:$PATH"
# Link time: unversioned names + the libcuda stub (cudarc links dynamically).
export LIBRARY_PATH="$_kino_venv/cuda-link:$CUDA_ROOT/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
# Run time (on a GPU machine): cuBLAS, cuRAND, NVRTC, cuDNN from the wheels; libcuda.so.1 from
# the driver. The stub directory is deliberately NOT here.
export LD_LIBRARY_PATH="$CUDA_ROOT/lib:$_kino_site/nvidia/cudnn/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# (No CPATH: the wheels' nvcc.profile finds include/ and include/cccl itself, and CPATH would make
# cargo rebuild every C dependency when switching between CPU and CUDA builds.)
unset _kino_venv _kino_site
