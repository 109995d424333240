# Sourced by the bench/run_*.sh runners from the repository root, with the runner's arguments: the set-up the GPU
# host needs and the process count. Reads --device cuda|cpu (cuda by default; cpu is the smoke test without a GPU).
# Sets device, PY, OUT (absolute), nproc and preset; exports PYTHONPATH so that the carried wheels (deepspeed,
# bitsandbytes, ...) and regrow itself (this folder, not installed) import.
device=cuda
for arg in "$@"; do
  case $arg in
    --device=cpu|cpu) device=cpu ;;
    --device) ;;
    --device=cuda|cuda) device=cuda ;;
    *) echo "$(basename "$0"): unknown argument $arg (use --device cpu for the CPU smoke test)" >&2; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1
# NVLink multicast (NVLS) stays off on the lent machines; nothing here touches any other multicast setting.
export NCCL_NVLS_ENABLE=0
PY=${PYTHON:-python3}
OUT=${OUT:-./bench-out}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)

if [[ $device == cuda ]]; then
  # The GPU host has torch and triton but not deepspeed (nor bitsandbytes): install the carried wheels aside.
  # Installed once per machine (a runner called by another runner finds them there).
  if compgen -G ".whl/*.whl" > /dev/null; then
    wheels=$(ls .whl/*.whl | sort | md5sum | cut -c1-12)
    if [[ $(cat /tmp/site/.regrow-wheels 2>/dev/null) != "$wheels" ]]; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && echo "$wheels" > /tmp/site/.regrow-wheels
    fi
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "WARNING: no .whl/*.whl carried: deepspeed (and bitsandbytes) will be missing" >&2
  fi
  nproc=${NGPU:-4}
  visible=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if ((visible < nproc)); then
    echo "WARNING: NGPU=$nproc but $visible GPU(s) visible: using $visible" >&2
    nproc=$visible
  fi
  preset=${PRESET:-350m}
else
  export DS_ACCELERATOR=cpu
  nproc=${NGPU:-2}
  preset=${PRESET:-tiny}
fi
if ((nproc < 1)); then
  echo "$(basename "$0"): no GPU visible, nothing to run (use --device cpu for the smoke test)" >&2
  exit 1
fi
# regrow is this folder; make it importable under its package name without installing it.
PKG_DIR=${PKG_DIR:-/tmp/pkg}
mkdir -p "$PKG_DIR" && ln -sfn "$PWD" "$PKG_DIR/regrow"
export PYTHONPATH=$PKG_DIR${PYTHONPATH:+:$PYTHONPATH}
