# Setup shared by the scripts in scripts/gpu/ (sourced, not run), on the GPU machine, from the
# repository root:
#   . scripts/gpu/env.sh TARBALL
# - unpacks TARBALL (binaries built on the build machine, see kernels_check.sh) into a fresh
#   $B (BIN_DIR, default /tmp/kbin), so no binary of an earlier call on the same warm machine is
#   run by mistake;
# - creates $OUT (default gpu-out) and sets LD_LIBRARY_PATH to the device's CUDA 13 libraries;
# - makes the model tests find their fixtures. They read them through the source path compiled
#   into them (CARGO_MANIFEST_DIR of the worktree that built them, e.g. /tmp/wk7), which does
#   not exist here: DS_WORKTREE (that worktree's path; read from the `reference_logits` binary
#   when unset) is linked to $PWD, this copy of the repository;
# - runs the model tests on the card (DELTASERVE_TEST_DEVICE, default cuda:0; the tests' own
#   default is the CPU, so without it they pass on the GPU machine's CPU);
# - prints the card, its driver and clocks.
OUT=${OUT:-gpu-out}
B=${BIN_DIR:-/tmp/kbin}
export OUT B
mkdir -p "$OUT"
rm -rf "$B" && mkdir -p "$B"
tar xJf "${1:?usage: . scripts/gpu/env.sh TARBALL}" -C "$B" || { echo "env.sh: cannot unpack $1" >&2; return 1 2>/dev/null || exit 1; }
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1
export DELTASERVE_TEST_DEVICE=${DELTASERVE_TEST_DEVICE:-cuda:0}
if [ -z "${DS_WORKTREE:-}" ] && [ -f "$B/reference_logits" ]; then
  # The manifest dir is stored as a plain string in the binary; dependencies live under ~/.cargo.
  DS_WORKTREE=$(grep -aoE '/[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*/crates/deltaserve-model' "$B/reference_logits" \
    | grep -v '/\.cargo/' | head -1)
  DS_WORKTREE=${DS_WORKTREE%/crates/deltaserve-model}
fi
if [ -n "${DS_WORKTREE:-}" ] && [ "$(realpath -m "$DS_WORKTREE")" != "$(realpath "$PWD")" ]; then
  if [ -e "$DS_WORKTREE" ] && [ ! -L "$DS_WORKTREE" ]; then
    echo "env.sh: $DS_WORKTREE exists and is not a link; the model tests read their fixtures there" >&2
  else
    mkdir -p "$(dirname "$DS_WORKTREE")" && ln -sfn "$PWD" "$DS_WORKTREE"
    echo "fixtures: $DS_WORKTREE -> $PWD"
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv
