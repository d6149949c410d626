#!/usr/bin/env bash
# The GPU check, in one go on one CUDA machine (about 10 minutes at most): the tests marked
# gpu, `kdcl bench` on three teacher → student pairs (and one with trainer.compile=true), the
# folder path at 224 px (a JPEG folder made from the subset: the loader against torchvision's
# reference, and resnet50 → mobilenet_v2 with stored soft labels), and a time-to-accuracy run (a teacher, then a student of 0.27M parameters trained alone and
# distilled, online and from a teacher cache) on a CIFAR-10 subset. It writes its files under
# $OUT and ends with a one-screen summary against the speed targets.
#
#   benchmarks/gpu_check.sh               on the GPU (trainer.device=cuda)
#   benchmarks/gpu_check.sh --cpu-smoke   every step on the CPU with tiny sizes: checks the script
#
# Prepare once, where a package index and the CIFAR-10 copy are at hand (both folders are
# ignored by git; hand them to the GPU machine with the working tree):
#   benchmarks/gpu_wheels.sh                 hydra-core, omegaconf, antlr4 → benchmarks/wheels/
#   python benchmarks/make_cifar_subset.py   10,000 train / 2,000 test → benchmarks/data/cifar10_subset/
# On a machine that has PyTorch but not kdcl's config stack, the wheels are installed into
# a folder of /tmp (nothing else is touched). --cpu-smoke makes its own tiny subset.
#
# Environment: PYTHON (default python3), OUT (default outputs/gpu_check), CIFAR_SRC (the full
# copy, for --cpu-smoke; default ../shared/data/cifar10), NAIVE_WORKERS (the naive loop's
# DataLoader workers; default 8 on the GPU), KEEP_WORK=1 (keep the runs' folders under /tmp,
# checkpoints and logs; by default they are removed at the end). $OUT gets gpu_check.log
# (everything printed), tests.xml, bench.csv (every pair's arms), tta_stages.csv, summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

mode=gpu
case "${1:-}" in
    "") ;;
    --cpu-smoke) mode=cpu ;;
    *)
        echo "usage: benchmarks/gpu_check.sh [--cpu-smoke]" >&2
        exit 2
        ;;
esac
python=${PYTHON:-python3}
out=${OUT:-outputs/gpu_check}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d /tmp/kdcl_gpu_check.XXXXXX) # the runs' own folders; KEEP_WORK=1 keeps it
[[ ${KEEP_WORK:-0} == 1 ]] || trap 'rm -rf "$work"' EXIT

if [[ $mode == gpu ]]; then
    data=benchmarks/data/cifar10_subset
    device=cuda
    # Each phase's time limit (s), the batch, bench steps / warm-up / repeats, the naive
    # loop's workers, training images (null: all) and time-to-accuracy epochs.
    limit_tests=160 limit_bench=(45 55 75) limit_compiled=55 limit_tta=90 limit_folder=150
    batch=256 steps=50 warmup=5 repeats=3 workers=${NAIVE_WORKERS:-8}
    bench_train=null tta_train=null tta_epochs=12
    folder_per_class=200 folder_size=224 folder_batch=128
else
    data=benchmarks/data/cifar10_tiny
    device=cpu
    limit_tests=600 limit_bench=(300 300 600) limit_compiled=0 limit_tta=600 limit_folder=600
    batch=32 steps=2 warmup=1 repeats=1 workers=${NAIVE_WORKERS:-0}
    bench_train=200 tta_train=300 tta_epochs=1
    folder_per_class=8 folder_size=64 folder_batch=16
fi
dataset=(
    dataset=npz "dataset.root=$repo/$data"
    "dataset.mean=[0.4914,0.4822,0.4465]" "dataset.std=[0.2470,0.2435,0.2616]"
    dataset.crop_padding=4 dataset.flip=true
)

# Run one phase: phase NAME LIMIT COMMAND... Each phase has its own time limit, so that one
# that hangs or fails leaves the others their time; phases.tsv keeps each one's exit status
# and seconds for the summary.
phase() {
    local name=$1 limit=$2
    shift 2
    echo
    echo "==== $name (at most $limit s) ===="
    local start=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >>"$work/phases.tsv"
    if [[ $rc == 124 || $rc == 137 ]]; then
        echo "---- $name: stopped at its $limit s limit"
    fi
}

# The kdcl bench command line of one pair, into the array bench_cmd:
# set_bench LABEL TEACHER STUDENT [OVERRIDES...]
set_bench() {
    local label=$1 teacher=$2 student=$3
    shift 3
    bench_cmd=(
        "$python" -m kdcl bench "${dataset[@]}" "dataset.max_train_samples=$bench_train"
        "teacher=$teacher" "student=$student" "trainer.device=$device" "trainer.batch_size=$batch"
        "bench.steps=$steps" "bench.warmup=$warmup" "bench.repeats=$repeats" bench.views=4
        "bench.naive_workers=$workers" "hydra.run.dir=$work/bench_$label" "$@"
    )
}

# Make sure of the data and the packages, and print the versions.
prepare() {
    if [[ $mode == cpu && ! -f $data/train.npz ]]; then
        "$python" benchmarks/make_cifar_subset.py --src "${CIFAR_SRC:-../shared/data/cifar10}" \
            --out "$data" --train 600 --test 200 || return 1
    fi
    if [[ ! -f $data/train.npz || ! -f $data/test.npz ]]; then
        echo "error: $data/train.npz and test.npz not found"
        echo "  fix: run python benchmarks/make_cifar_subset.py where the CIFAR-10 copy is, and carry $data"
        return 1
    fi
    if ! "$python" -c "import hydra, omegaconf" 2>/dev/null; then
        if ! compgen -G "benchmarks/wheels/*.whl" >/dev/null; then
            echo "error: hydra-core and omegaconf are not installed and benchmarks/wheels/ holds no wheels"
            echo "  fix: run benchmarks/gpu_wheels.sh where a package index is reachable, and carry benchmarks/wheels"
            return 1
        fi
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$work/site" benchmarks/wheels/*.whl || return 1
        export PYTHONPATH="$work/site"
    fi
    export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    "$python" - <<'EOF'
import platform, subprocess
import hydra, numpy, omegaconf, pandas, torch
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"kdcl {commit or '(no git)'}  python {platform.python_version()}  torch {torch.__version__} "
      f"(CUDA {torch.version.cuda})  GPU {gpu}")
print(f"hydra-core {hydra.__version__}  omegaconf {omegaconf.__version__}  numpy {numpy.__version__}  "
      f"pandas {pandas.__version__}")
EOF
}

check() {
    prepare || return 1
    phase tests "$limit_tests" "$python" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_path.py \
        --junitxml="$out/tests.xml"
    set_bench cnn cnn cnn_small
    phase "bench cnn → cnn_small" "${limit_bench[0]}" "${bench_cmd[@]}"
    set_bench resnet32x4 resnet32x4 resnet8x4
    phase "bench resnet32x4 → resnet8x4" "${limit_bench[1]}" "${bench_cmd[@]}"
    set_bench resnet50 resnet50 mobilenet_v2
    phase "bench resnet50 → mobilenet_v2" "${limit_bench[2]}" "${bench_cmd[@]}"
    if ((limit_compiled > 0)); then # it compiles in the untimed warm-up; one repeat keeps recompiles few
        set_bench cnn_compiled cnn cnn_small trainer.compile=true bench.repeats=1
        phase "bench cnn → cnn_small, compiled" "$limit_compiled" "${bench_cmd[@]}"
    fi
    folder=(
        dataset=imagefolder "dataset.root=$work/jpeg" "dataset.image_size=$folder_size"
        "dataset.mean=[0.485,0.456,0.406]" "dataset.std=[0.229,0.224,0.225]" dataset.max_test_samples=20
    )
    phase "folder path at $folder_size px" "$limit_folder" bash -c '
        "$0" benchmarks/make_jpeg_folder.py --data "$1" --out "$2/jpeg" --train-per-class "$3" --test-per-class 2 &&
        "$0" benchmarks/folder_loader.py --root "$2/jpeg" --size "$4" --batch "$5" --workers "$6" --batches 10 \
            --rounds 2 --profile 64 && shift 6 && "$@"' \
        "$python" "$data" "$work" "$folder_per_class" "$folder_size" "$folder_batch" "$((workers > 0 ? workers : 2))" \
        "$python" -m kdcl bench "${folder[@]}" teacher=resnet50 student=mobilenet_v2 "trainer.device=$device" \
        "trainer.batch_size=$folder_batch" "bench.steps=$steps" "bench.warmup=$warmup" bench.repeats=1 bench.views=1 \
        "bench.naive_workers=$workers" distill.teacher_cache_store=disk distill.teacher_cache_topk=10 \
        "hydra.run.dir=$work/bench_folder"
    phase "time to accuracy" "$limit_tta" "$python" -m kdcl train "${dataset[@]}" \
        "dataset.max_train_samples=$tta_train" teacher=resnet32x4 student=resnet20 curriculum=none distill=kd \
        "trainer.device=$device" "trainer.epochs=$tta_epochs" "trainer.batch_size=$batch" optimizer.lr=0.1 \
        scheduler.warmup_epochs=1 cache=false "arms={kd_cached:{distill:{teacher_cache:'views:4'}}}" \
        "hydra.run.dir=$work/tta"
    echo
    "$python" benchmarks/gpu_summary.py --work "$work" --out "$out" --device "$device"
}

check 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
