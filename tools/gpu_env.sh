# Source on the lent GPU machine (no internet) from the repo root: `. tools/gpu_env.sh`.
# Installs the wheels carried in .whl/ (gsplat==1.5.3 ...) into /tmp/site and makes gsplat's CUDA extension
# available: reused from /tmp/gsplat_ext (a warm machine) or .gpucache/gsplat_cuda.so.xz (carried from an earlier
# build), else JIT-compiled once (~80 s) and saved to $OUT/gsplat_cuda.so.xz for the next machine.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0
if [ ! -f /tmp/gsplat_ext/gsplat_cuda.so ] && [ -f .gpucache/gsplat_cuda.so.xz ]; then
  mkdir -p /tmp/gsplat_ext
  python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.gpucache/gsplat_cuda.so.xz'), open('/tmp/gsplat_ext/gsplat_cuda.so','wb'))"
fi
if [ -f /tmp/gsplat_ext/gsplat_cuda.so ]; then
  # gsplat imports `gsplat.csrc` (a prebuilt module) before it falls back to JIT compilation.
  printf 'import sys\nsys.path.insert(0, "/tmp/gsplat_ext")\nfrom gsplat_cuda import *  # noqa\n' > /tmp/site/gsplat/csrc.py
fi
python3 - <<'PY' || return 1
import glob, lzma, os, shutil, time
t = time.time()
import torch
from gsplat.cuda._backend import _C
assert _C is not None, "gsplat CUDA extension unavailable"
print(f"gsplat ready in {time.time() - t:.1f}s on {torch.cuda.get_device_name()}", flush=True)
if not os.path.exists("/tmp/gsplat_ext/gsplat_cuda.so"):
    so = glob.glob(os.path.expanduser("~/.cache/torch_extensions/*/gsplat_cuda/gsplat_cuda.so"))[0]
    os.makedirs("/tmp/gsplat_ext", exist_ok=True)
    shutil.copy(so, "/tmp/gsplat_ext/gsplat_cuda.so")
    if os.environ.get("OUT"):
        with open(so, "rb") as f, lzma.open(os.path.join(os.environ["OUT"], "gsplat_cuda.so.xz"), "wb", preset=6) as g:
            shutil.copyfileobj(f, g)
PY
