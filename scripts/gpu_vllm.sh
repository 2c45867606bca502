#!/usr/bin/env bash
# Real vLLM 0.23.0 on the GPU device machine (issue 18), carried there as wheels in pieces.
#
# Here (a machine with PyPI):
#   scripts/gpu_vllm.sh prepare        resolve + download the wheel set for CPython 3.12
#                                      manylinux x86-64 minus what the device image already has,
#                                      pack it into tiers and split those into <=52 MiB pieces:
#                                      .gpuwheels/pieces/NN (git-ignored), manifest in
#                                      scripts/gpu_vllm/manifest.json (tracked: it travels).
#   scripts/gpu_vllm.sh plan           print the device calls (command + carry) in order: one
#                                      call per piece, back to back (the machine is given back
#                                      ~30 s after a call; /tmp survives only while it is held).
# There (the device machine; each call carries one piece: carry=[".gpuwheels/pieces/NN"]):
#   scripts/gpu_vllm.sh receive N      check piece N's sha256 and move it to /tmp/gpuwheels
#                                      (files under /tmp outlive a call while the machine is held)
#   scripts/gpu_vllm.sh install        join every tier whose pieces have all arrived, check each
#                                      wheel's sha256, pip install --no-deps into /tmp/site (the
#                                      image's own torch 2.11.0+cu130 and CUDA libraries are used)
#   scripts/gpu_vllm.sh check [WHAT]   scripts/gpu_vllm/check.py: serve the tiny models with the
#                                      Station flags, conformance suite by URL, sleep/wake, NVML;
#                                      logs and JSON under $OUT (copy them into docs/runs/).
#
# Tiers: "core" is what vLLM needs to serve a dense model on Hopper; "extra" holds what only
# other models or GPUs use (CuTe DSL / quack kernels, tilelang, tokenspeed MLA, the CUDA
# compiler wheels, vLLM's FlashAttention-2 library: on SM90 vLLM picks FA3,
# vllm/v1/attention/backends/fa_utils.py get_flash_attn_version). Left out entirely:
# flashinfer-cubin (447 MB): vLLM only asks whether it is installed
# (vllm/utils/flashinfer.py has_flashinfer_cubin) and otherwise lets FlashInfer JIT with nvcc,
# which the device image has.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WHEELS=$REPO/.gpuwheels
MANIFEST=$REPO/scripts/gpu_vllm/manifest.json
PIECE_BYTES=${GPU_VLLM_PIECE_BYTES:-54525952} # 52 MiB: the working tree (~6 MiB) and the tiny models ride along
DEST=${GPU_VLLM_DEST:-/tmp/gpuwheels}
SITE=${GPU_VLLM_SITE:-/tmp/site}
PY=${PYTHON:-python3}
REQS=(vllm==0.23.0 'docker>=7.0' 'platformdirs>=4.0') # the last two: the conformance suite's imports
LEAVE_OUT=(-flashinfer-cubin)
EXTRA=(tokenspeed-mla tokenspeed-triton nvidia-cutlass-dsl nvidia-cutlass-dsl-libs-base
  nvidia-cutlass-dsl-libs-cu13 quack-kernels tilelang z3-solver nvidia-nvvm nvidia-cuda-nvcc
  nvidia-cuda-tileiras nvidia-cuda-cccl nvidia-cuda-crt)
# Members of the vLLM wheel moved to the extra tier (as vllm-moved.zip): FA2 (Hopper runs FA3) and DeepGEMM's
# extension for the other Pythons.
VLLM_MOVE=('vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so'
  'vllm/third_party/deep_gemm/_C.cpython-310-x86_64-linux-gnu.so'
  'vllm/third_party/deep_gemm/_C.cpython-311-x86_64-linux-gnu.so'
  'vllm/third_party/deep_gemm/_C.cpython-313-x86_64-linux-gnu.so'
  'vllm/third_party/deep_gemm/_C.cpython-314-x86_64-linux-gnu.so')

die() {
  echo "gpu_vllm: $*" >&2
  exit 1
}

prepare() {
  local py=${PREP_PYTHON:-$REPO/.venv/bin/python}
  [ -x "$py" ] || die "no $py: run scripts/bootstrap.sh --dev first (or set PREP_PYTHON)"
  mkdir -p "$WHEELS/dl"
  [ -f "$WHEELS/dl/resolution.json" ] && [ -z "${GPU_VLLM_RESOLVE:-}" ] ||
    "$py" scripts/gpu_vllm/resolve.py "$WHEELS/dl" "${REQS[@]}" "${LEAVE_OUT[@]}"
  rm -rf "$WHEELS/stage" "$WHEELS/pieces"
  mkdir -p "$WHEELS/stage/core" "$WHEELS/stage/extra" "$WHEELS/pieces"
  "$py" - "$WHEELS" "${EXTRA[*]}" "${VLLM_MOVE[*]}" <<'EOF'
import json, shutil, subprocess, sys, zipfile
from pathlib import Path
wheels, extra, move = Path(sys.argv[1]), set(sys.argv[2].split()), sys.argv[3].split()
res = json.loads((wheels / "dl/resolution.json").read_text())
for name, entry in res["wheels"].items():
    tier = "extra" if name in extra else "core"
    src = wheels / "dl" / entry["wheel"]
    dst = wheels / "stage" / tier / entry["wheel"]
    if name != "vllm":
        shutil.copy2(src, dst)
        continue
    # vLLM: copy the wheel, delete the moved members (zip -d keeps the others' compressed
    # bytes), drop their RECORD lines, and put the moved files in the extra tier as they are.
    shutil.copy2(src, dst)
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(
        wheels / "stage/extra/vllm-moved.zip", "w", compression=zipfile.ZIP_DEFLATED
    ) as moved:
        record_name = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        record = z.read(record_name).decode()
        for member in move:
            moved.writestr(member, z.read(member))
    subprocess.run(["zip", "-q", "-d", str(dst), *move, record_name], check=True)
    kept = "".join(line + "\n" for line in record.splitlines() if line.split(",")[0] not in move)
    with zipfile.ZipFile(dst, "a", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr(record_name, kept)
EOF
  local n=0 tier
  : >"$WHEELS/pieces/.list"
  for tier in core extra; do
    # vllm-moved.zip (FA2) first: the extra tier's first pieces are the likeliest to be wanted.
    (cd "$WHEELS/stage/$tier" && find . -type f | sed 's|^\./||' | LC_ALL=C sort |
      awk '/^vllm-moved/ {print; next} {rest = rest $0 "\n"} END {printf "%s", rest}' >../$tier.files &&
      xargs -d '\n' sha256sum <../$tier.files >../$tier.sha256 &&
      tar -cf - -T ../$tier.files) | split -b "$PIECE_BYTES" -d -a 2 - "$WHEELS/stage/$tier.part."
    for part in "$WHEELS/stage/$tier".part.*; do
      n=$((n + 1))
      mv "$part" "$WHEELS/pieces/$(printf %02d $n)"
      echo "$(printf %02d $n) $tier" >>"$WHEELS/pieces/.list"
    done
  done
  "$py" - "$WHEELS" "$MANIFEST" <<'EOF'
import hashlib, json, sys
from pathlib import Path
wheels, manifest = Path(sys.argv[1]), Path(sys.argv[2])
def sha(p):
    h = hashlib.sha256()
    with p.open("rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()
res = json.loads((wheels / "dl/resolution.json").read_text())
pieces = []
for line in (wheels / "pieces/.list").read_text().split("\n"):
    if line:
        n, tier = line.split()
        p = wheels / "pieces" / n
        pieces.append({"n": n, "tier": tier, "bytes": p.stat().st_size, "sha256": sha(p)})
tiers = {}
for tier in ("core", "extra"):
    files = {}
    for line in (wheels / f"stage/{tier}.sha256").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        files[name] = {"sha256": digest, "bytes": (wheels / "stage" / tier / name).stat().st_size}
    tiers[tier] = {"files": files, "bytes": sum(f["bytes"] for f in files.values())}
manifest.write_text(json.dumps({
    "requested": res["requested"], "left_out_device_has": res["left_out"],
    "pieces": pieces, "tiers": tiers}, indent=1, sort_keys=True) + "\n")
for tier, t in tiers.items():
    print(f"{tier}: {len(t['files'])} files, {t['bytes'] / 2**20:.1f} MiB, "
          f"pieces {[p['n'] for p in pieces if p['tier'] == tier]}")
EOF
}

plan() {
  "$PY" - "$MANIFEST" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
core = [p["n"] for p in m["pieces"] if p["tier"] == "core"]
for p in m["pieces"]:
    cmd = f"bash scripts/gpu_vllm.sh receive {p['n']}"
    carry = [f".gpuwheels/pieces/{p['n']}"]
    if p["n"] == core[-1]:
        # The tiny models (tests/realvllm/make_models.py .gpuwheels/models) ride along; without
        # them check.py makes them there.
        carry.append(".gpuwheels/models")
        cmd = ("set -o pipefail; { " + cmd + " && bash scripts/gpu_vllm.sh install; } 2>&1 | "
               "tee $OUT/install.log; export GPU_VLLM_BUDGET_S=$((560 - SECONDS)); "
               "bash scripts/gpu_vllm.sh check all")
    print(f"{p['tier']:5} carry={json.dumps(carry)}  {cmd}")
EOF
}

receive() {
  local n
  n=$(printf %02d "$((10#$1))")
  local src=$REPO/.gpuwheels/pieces/$n
  [ -f "$src" ] || die "piece $n is not in this working tree: carry .gpuwheels/pieces/$n"
  mkdir -p "$DEST"
  local want got
  want=$("$PY" -c "import json,sys; print(next(p['sha256'] for p in json.load(open(sys.argv[1]))['pieces'] if p['n']==sys.argv[2]))" "$MANIFEST" "$n")
  got=$(sha256sum "$src" | cut -d' ' -f1)
  [ "$want" = "$got" ] || die "piece $n: sha256 $got, manifest says $want (carry it again)"
  mv "$src" "$DEST/$n"
  local have=() f
  for f in "$DEST"/[0-9][0-9]; do [ -e "$f" ] && have+=("${f##*/}"); done
  echo "gpu_vllm: piece $n received ($(stat -c %s "$DEST/$n") bytes); in $DEST: ${have[*]}"
}

install() {
  mkdir -p "$DEST"
  local ready
  ready=$("$PY" - "$MANIFEST" "$DEST" <<'EOF'
import json, os, sys
m = json.load(open(sys.argv[1]))
for tier in ("core", "extra"):
    ns = [p["n"] for p in m["pieces"] if p["tier"] == tier]
    have = [n for n in ns if os.path.exists(os.path.join(sys.argv[2], n))]
    if len(have) == len(ns) and not os.path.exists(os.path.join(sys.argv[2], f"{tier}.done")):
        print(tier + ":" + ",".join(ns))
    elif have != ns:
        print(f"gpu_vllm: tier {tier}: have pieces {have} of {ns}", file=sys.stderr)
EOF
  )
  [ -n "$ready" ] || { echo "gpu_vllm: nothing new to install"; return 0; }
  local line tier ns
  for line in $ready; do
    tier=${line%%:*}
    ns=${line#*:}
    rm -rf "${DEST:?}/$tier" && mkdir -p "$DEST/$tier"
    local pieces
    read -r -a pieces <<<"${ns//,/ }"
    (cd "$DEST" && cat "${pieces[@]}") | tar -xf - -C "$DEST/$tier"
    (cd "$DEST/$tier" && "$PY" -c "
import json, sys
files = json.load(open(sys.argv[1]))['tiers'][sys.argv[2]]['files']
print(''.join(f'{v[\"sha256\"]}  {k}\n' for k, v in files.items()), end='')" "$MANIFEST" "$tier" |
      sha256sum --quiet -c -) || die "tier $tier: a file's sha256 differs from the manifest"
    local t0=$SECONDS
    shopt -s nullglob
    local whls=("$DEST/$tier"/*.whl)
    if [ ${#whls[@]} -gt 0 ]; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --root-user-action=ignore --target "$SITE" "${whls[@]}" ||
        die "tier $tier: pip install failed"
    fi
    if [ -f "$DEST/$tier/vllm-moved.zip" ]; then
      "$PY" -m zipfile -e "$DEST/$tier/vllm-moved.zip" "$SITE/"
    fi
    touch "$DEST/$tier.done"
    for n in "${pieces[@]}"; do rm -f "${DEST:?}/$n"; done
    echo "gpu_vllm: tier $tier installed into $SITE in $((SECONDS - t0)) s"
  done
  PYTHONPATH=$SITE "$PY" -c "import vllm, sys; print('gpu_vllm: vllm', vllm.__version__, 'from', vllm.__file__)"
}

check() {
  export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONUNBUFFERED=1
  exec "$PY" scripts/gpu_vllm/check.py "$@"
}

case "${1:-}" in
prepare) prepare ;;
plan) plan ;;
receive)
  [ $# -eq 2 ] || die "usage: gpu_vllm.sh receive N"
  receive "$2"
  ;;
install) install ;;
check)
  shift
  check "$@"
  ;;
*) die "usage: gpu_vllm.sh prepare | plan | receive N | install | check [std|step|all]" ;;
esac
