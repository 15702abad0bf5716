#!/usr/bin/env bash
# The Delta-KD paper's pipeline, end to end: a raw teacher and a raw student, the teacher's SFT, the student trained
# by every method with the same step budget (SFT, FKL, RKL, SeqKD, MiniLLM, Delta-KD; Delta-KD with alpha=0 as a
# check, and Delta-KD on the student's own samples as an extension), ROUGE on held-out data.
#
#   bash reproduce.sh [toy] [--quick]   offline on a CPU: toy tokenizer, data and models, pre-trained here (default)
#   bash reproduce.sh study [--quick]   the toy as an experiment, in the three regimes of toy.py one after another: raw
#                                       models pre-trained until their corpus loss levels off, then every student
#                                       method over SEEDS seeds (default 5; 2 with --quick) and Delta-KD's alpha at
#                                       0.25, 0.5 and 0.75: mean ± sd over the seeds and each method's paired
#                                       difference from FKL, in runs/toy-study-<regime>
#   --regime knowledge|premise|student-knows
#                                       one regime only (toy.py): the raw models pre-train on the task's knowledge
#                                       without its chats (the default toy's), on its chats in another reply style
#                                       (Delta-KD's premise), or on that and facts only the raw student's corpus
#                                       states (student-knows). The last two gate the students: the premise regime's
#                                       raw student must come within 2 points of the raw teacher's accuracy on
#                                       held-out replies in the pre-training style; in student-knows, at the prices
#                                       that held-out replies state in the SFT style, the raw student must be right
#                                       at least 80% of the time and both teachers at most 30%. Else the run stops
#                                       before any student trains.
#       JOBS (default: the CPU count): steps that need only finished ones run side by side, one CPU thread each.
#       OUT names the run folder; with every regime, OUT-knowledge, OUT-premise and OUT-student-knows.
#   bash reproduce.sh paper             Qwen2.5-7B -> Qwen2.5-1.5B on UltraChat-200k, through torchrun
#       NPROC=8 (processes per node), NNODES=1; on several nodes also NODE_RANK, MASTER_ADDR, MASTER_PORT.
#       DATASET=openmath switches to nvidia/OpenMathReasoning. STEPS, EVAL_EXAMPLES and OUT override the defaults.
#   --dry-run prints the commands without running them; --fresh starts over instead of reusing finished steps.
#
# Every command is printed before it runs: this script is the documentation of the real commands. A step whose
# output exists is skipped, and an interrupted train.py resumes from its newest checkpoint when run again. Each step's
# seconds go to $OUT/times.tsv; report.py makes the tables from the run folders, and times.json from the seconds.
# Before any student trains, diagnose.py measures Delta-KD's target on the test replies ($OUT/diagnose). The study
# and the paper then make one cache of pi* per alpha (targets.py: the frozen models' one pass over the training data,
# the paper's decoupled inference), from which their off-policy FKL and Delta-KD students train alone.
set -euo pipefail
cd "$(dirname "$0")"

MODE=toy STUDY=0 QUICK=0 FRESH=0 DRY=0 REGIME= STAGE= ARGS=("$@")
usage="usage: bash reproduce.sh [toy|study|paper] [--regime knowledge|premise|student-knows] [--quick] [--fresh] \
[--dry-run]"
while (($#)); do
  case $1 in
    toy | paper) MODE=$1 ;;
    study) STUDY=1 ;;
    --regime) if (($# < 2)); then echo "$usage" >&2; exit 2; fi; REGIME=$2; shift ;;
    --regime=*) REGIME=${1#*=} ;;
    --quick) QUICK=1 ;;
    --fresh) FRESH=1 ;;
    --dry-run) DRY=1 ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
  shift
done
if [[ $STUDY == 1 && $MODE == paper ]]; then echo "error: the study runs on the toy: bash reproduce.sh study" >&2; exit 2; fi
if [[ -n $REGIME && ( $MODE == paper || ! $REGIME =~ ^(knowledge|premise|student-knows)$ ) ]]; then
  echo "error: --regime is knowledge, premise or student-knows, for the toy; $usage" >&2; exit 2
fi
PYTHON=${PYTHON:-python}
if [[ $STUDY == 1 && -z $REGIME ]]; then  # every regime, each its own run of this script in its own folder
  quick= folders=()
  if [[ $QUICK == 1 ]]; then quick=-quick; fi
  base=${OUT:-runs/toy$quick-study}
  for regime in knowledge premise student-knows; do
    OUT=$base-$regime bash "$0" "${ARGS[@]}" --regime "$regime"
    folders+=("$base-$regime")
  done
  # the three regimes side by side: what the diagnostic said before any student, what the students did
  printf '+'; printf ' %q' "$PYTHON" report.py "${folders[@]}" --when "$base-when.md"; echo
  if [[ $DRY == 0 ]]; then "$PYTHON" report.py "${folders[@]}" --when "$base-when.md"; fi
  exit
fi
REGIME=${REGIME:-knowledge}

now() { local t=${EPOCHREALTIME/[.,]/}; echo $((10#$t / 1000)); }  # milliseconds, from bash alone

# run OUTPUT COMMAND...: print the command, then run it unless OUTPUT exists (the step finished in an earlier run).
# Its seconds go to $OUT/times.tsv, under the current stage. In a lane, its own output goes to $OUT/logs/.
run() {
  local output=$1; shift
  if [[ $DRY == 0 && -e $output ]]; then printf '# done:'; printf ' %q' "$@"; echo; return; fi
  printf '+'; printf ' %q' "$@"; echo
  if [[ $DRY == 1 ]]; then return; fi
  local step start log
  step=$(dirname "${output#"$OUT"/}")  # teacher-raw, eval/sft, seed1/fkl, ...
  start=$(now)
  if [[ -n ${LANE:-} ]]; then
    log=$OUT/logs/${step//\//_}.log
    mkdir -p "$OUT/logs"
    "$@" > "$log" 2>&1 || { echo "error: this step failed; the end of $log:" >&2; tail -n 20 "$log" >&2; exit 1; }
  else
    "$@"
  fi
  if [[ ! -e $output ]]; then  # it exited 0 but did not finish (a SIGTERM): the same command resumes it
    echo "error: $output is missing after the step: rerun to resume it" >&2; exit 1
  fi
  local ms=$(($(now) - start))
  printf '%s\t%s\t%d.%03d\n' "$STAGE" "$step" $((ms / 1000)) $((ms % 1000)) >> "$OUT/times.tsv"
  if [[ -n ${LANE:-} ]]; then printf '# finished in %d s: %s\n' $((ms / 1000)) "$step"; fi
}

# stage NAME: the steps from here to the next `stage` (or `stage end`) form one stage, whose wall-clock seconds go to
# times.tsv as its "(wall)" line when any of its steps ran in this invocation; a rerun that reuses them all keeps the
# seconds they took when they ran
stage() {
  local steps=0
  if [[ -f $OUT/times.tsv ]]; then steps=$(wc -l < "$OUT/times.tsv"); fi
  if [[ $DRY == 0 && -n ${STAGE:-} && $steps != "$STAGE_STEPS" ]]; then
    local ms=$(($(now) - STAGE_START))
    printf '%s\t(wall)\t%d.%03d\n' "$STAGE" $((ms / 1000)) $((ms % 1000)) >> "$OUT/times.tsv"
    steps=$((steps + 1))
  fi
  STAGE=$1 STAGE_START=$(now) STAGE_STEPS=$steps
}

# lane FUNCTION ARGS...: run steps that need only finished ones. With JOBS > 1 they run in the background, at most
# JOBS lanes at a time (each its own process group, stopped if this script stops), and `lanes_done` waits for all of
# them and stops at the first that failed. With JOBS=1, and for --dry-run, the steps run here, in order.
lane() {
  if [[ $JOBS == 1 || $DRY == 1 ]]; then "$@"; return; fi
  while (( $(jobs -rp | wc -l) >= JOBS )); do reap; done
  (LANE=1; "$@") &
}
reap() {  # wait for one lane; 1 when there is none left
  local pid status=0
  wait -n -p pid || status=$?
  if [[ -z ${pid:-} ]]; then return 1; fi
  if (( status )); then echo "error: a step failed (exit status $status): stopping" >&2; exit "$status"; fi
}
lanes_done() { while reap; do :; done; }
set -m
trap 'for pid in $(jobs -p); do kill -- -"$pid" 2>/dev/null || true; done' EXIT

# model_config DIR JSON: a model folder holding only config.json and the tokenizer, for train.py --random-init
model_config() {
  printf '+ mkdir -p %q\n' "$1"
  if [[ $DRY == 0 ]]; then mkdir -p "$1"; fi
  run "$1/tokenizer.json" cp "$DATA_DIR/tokenizer.json" "$DATA_DIR/tokenizer_config.json" "$1/"
  printf '+ cat > %q <<EOF\n%s\nEOF\n' "$1/config.json" "$2"
  if [[ $DRY == 0 ]]; then echo "$2" > "$1/config.json"; fi
}

# ------------------------------------------------------------------------------------------------ sizes and models
if [[ $MODE == toy ]]; then
  # The toy's sizes were fixed from the time budget (the default toy in under 8 minutes on 2 CPU cores, the study in
  # under an hour) and the raw models' pre-training curves, before any method's score was looked at. Nothing here is
  # tuned toward a method.
  # - Delta-KD builds its target on the raw student's distribution, so the raw models must have learned their corpus.
  #   Pre-training reads it at most once, so every logged loss is a held-out loss; report.py prints the curves.
  #   600 teacher steps is what the default toy's 8 minutes afford: by then both models have the corpus's format and
  #   copy a problem's numbers into its solution, but they are still learning its arithmetic (the gain in later steps
  #   is almost all on the digits of results), so the default toy runs the pipeline rather than testing the premise.
  #   The study is the experiment, and the hour it may take affords 4 times more: 2400 teacher steps (13 minutes on
  #   one core), in its own folder. The teacher's corpus loss falls from 0.54 to 0.33 and levels off (its last quarter
  #   of steps gains 5%).
  # - The student pre-trains 3 times as many steps as the teacher, on 3 times as many documents (the teacher's are the
  #   first third of the student's), in its own lane: its steps cost a third of the teacher's, so this fits in the
  #   time the teacher takes anyway. The rule came from the student's curve alone: with the teacher's 2400 steps its
  #   loss was 0.40 and still falling (11% over the last quarter); with 7200 it is 0.34 and level (2%).
  # - The premise regime's corpus holds only the task's chats in style A (97 tokens a document, with the system prompt),
  #   which both raw models learn sooner. In a first study run at 1200 and 3600 steps, the student's loss levelled at
  #   0.13 by step 1400 and the teacher's by step 900, and the gate saw the raw student right at 100.0% of the positions
  #   of the held-out style-A replies and the raw teacher at 99.6%. The study uses 800 and 2400 steps, which the hour
  #   affords beside the knowledge regime; the gate checks them again before any student trains.
  # - The teacher is 6.5 times the student (0.87M and 0.13M weights in matrices).
  # - The teacher's SFT and every student get the same budget, 120 steps of 12 chats: 1440 of the 4000 training chats,
  #   under one epoch like the paper's 1000 steps of 128 over UltraChat's 200k. It is what the 8 minutes leave.
  # - Replies are at most 70 tokens long (82 in style B): --max-new-tokens 96 lets every reference fit (the ROUGE
  #   ceiling is 1) while a model that never stops costs 96 decode steps, not more.
  # - MiniLLM keeps its public script's settings and the paper run's ratio of rollouts to batch (256 to 128): a rollout
  #   phase samples 2 x BATCH replies and runs 4 PPO epochs over them, 8 optimizer steps, so it takes the same step
  #   budget as everyone else and samples STEPS x BATCH / 4 replies in all.
  # - One CPU thread per process and JOBS processes side by side: on these small models a second thread gains less
  #   than a second process, and on a busy machine two threads per process run several times slower than one.
  if [[ $QUICK == 1 ]]; then
    # A size the test suite runs: every step of the pipeline, nothing meaningful measured. The teacher trains ten
    # epochs over 64 chats at a higher rate, so that it ends its replies: SeqKD keeps only finished answers.
    N_TRAIN=64 N_TEST=8 PRETRAIN_STEPS=20 PRETRAIN_BATCH=16 TEACHER_STEPS=40 STEPS=${STEPS:-4} BATCH=16 NEW_TOKENS=64
    SEEDS=${SEEDS:-2} LOG_EVERY=1 LR=3e-3 GATE=${GATE:-1} FACT_GATE=${FACT_GATE:-0,1}  # the gates run, wide open: 20
    # steps learn nothing; the study's alphas between 0 and 1 are one step, run at one of them
    SWEEP=(0.5)
  else
    if [[ $STUDY == 1 && $REGIME == knowledge ]]; then PRETRAIN_STEPS=${PRETRAIN_STEPS:-2400}; fi
    if [[ $STUDY == 1 && $REGIME != knowledge ]]; then PRETRAIN_STEPS=${PRETRAIN_STEPS:-800}; fi
    N_TRAIN=4000 N_TEST=200 PRETRAIN_STEPS=${PRETRAIN_STEPS:-600} PRETRAIN_BATCH=32 STEPS=${STEPS:-120}
    TEACHER_STEPS=${STEPS:-120} BATCH=12 NEW_TOKENS=96 SEEDS=${SEEDS:-5} LOG_EVERY=10 LR=1e-3 GATE=${GATE:-0.02}
    FACT_GATE=${FACT_GATE:-0.8,0.3} SWEEP=(0.25 0.5 0.75)  # the study's alphas between FKL's 0 and the paper's 1
  fi
  folder=toy
  if [[ $QUICK == 1 ]]; then folder+=-quick; fi
  if [[ $STUDY == 1 ]]; then folder+=-study-$REGIME; elif [[ $REGIME != knowledge ]]; then folder+=-$REGIME; fi
  OUT=${OUT:-runs/$folder}
  STUDENT_PRETRAIN_STEPS=$((3 * PRETRAIN_STEPS))
  N_CORPUS=$((STUDENT_PRETRAIN_STEPS * PRETRAIN_BATCH))  # the student reads it once, the teacher its first third
  JOBS=${JOBS:-$(nproc)}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  EVAL_EXAMPLES=${EVAL_EXAMPLES:-$N_TEST}
  DATA_DIR=$OUT/data
  LAUNCH=("$PYTHON")
  TRAIN_DATA=(--data "$DATA_DIR/train.jsonl") TEST_DATA=(--data "$DATA_DIR/test.jsonl")
  # one micro-batch per step: splitting it cuts padding but costs more than it saves on these small models
  MAX_LEN=256 CACHED=$STUDY  # the study's off-policy FKL and Delta-KD students read one cache of pi* per alpha
  COMMON=(--batch-size "$BATCH" --micro-batch-size "$BATCH" --max-len "$MAX_LEN" --log-every "$LOG_EVERY" --save-every 200)
  PRETRAIN=(--batch-size "$PRETRAIN_BATCH" --micro-batch-size "$PRETRAIN_BATCH" --lr 3e-3 --min-lr 3e-4 --warmup-steps 20
            --max-len 256 --log-every "$LOG_EVERY" --save-every 200)
  FINETUNE=(--lr "$LR" --min-lr 1e-4 --warmup-steps 10)
  EVALUATE=(--max-new-tokens "$NEW_TOKENS" --batch-size 256)
  DIAGNOSE=(--micro-batch-size 64)
  SEQKD_DATA=("${TRAIN_DATA[@]}") SEQKD_TRAIN=(--data "$OUT/seqkd-data/train.jsonl")
  MINILLM=(--mix 0.2 --reward-scale 0.5 --ppo-epochs 4 --num-rollouts $((2 * BATCH)) --max-new-tokens "$NEW_TOKENS")
  ON_POLICY=(--on-policy 0.5 --max-new-tokens "$NEW_TOKENS")
  TEACHER_RAW=$OUT/teacher-raw/final STUDENT_RAW=$OUT/student-raw/final
  # the teacher's own corpus and SFT data: in student-knows, without the facts that only the raw student knows
  TEACHER_CORPUS=$DATA_DIR/corpus.jsonl TEACHER_DATA=("${TRAIN_DATA[@]}") MARK=()
  if [[ $REGIME == student-knows ]]; then
    TEACHER_CORPUS=$DATA_DIR/corpus-teacher.jsonl TEACHER_DATA=(--data "$DATA_DIR/sft.jsonl")
    MARK=(--mark 'costs (\d+) dollars')  # the diagnostic's "marked" class: the prices that a reply states
  fi
else
  DATASET=${DATASET:-ultrachat}
  OUT=${OUT:-runs/paper-$DATASET}
  STEPS=${STEPS:-1000}  # the student budget: 1000 steps of 128 sequences
  EVAL_EXAMPLES=${EVAL_EXAMPLES:-2000}
  NPROC=${NPROC:-8} NNODES=${NNODES:-1} JOBS=1
  if [[ $NNODES == 1 ]]; then
    LAUNCH=(torchrun --standalone --nproc_per_node "$NPROC")
  else
    LAUNCH=(torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC" --node_rank "${NODE_RANK:?set NODE_RANK}"
            --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}")
  fi
  # Whole conversations only: a row whose chat does not fit in --max-len is dropped rather than cut (a cut reply loses
  # its end and its <|im_end|>), and evaluation keeps the same rows and lets every kept reference fit, so the ROUGE
  # ceiling is 1. SeqKD: the teacher answers the training prompts under the same rule, and the student trains on the
  # answers that fit with their prompt.
  case $DATASET in
    ultrachat) MAX_LEN=2048 MICRO=2
               TRAIN_DATA=(--data HuggingFaceH4/ultrachat_200k --split train_sft --drop-long)
               TEST_DATA=(--data HuggingFaceH4/ultrachat_200k --split test_sft --max-len "$MAX_LEN")
               SEQKD_DATA=(--data HuggingFaceH4/ultrachat_200k --split train_sft --max-len "$MAX_LEN")
               SEQKD_TRAIN=(--data "$OUT/seqkd-data/train.jsonl" --drop-long) ;;
    openmath) MAX_LEN=4096 MICRO=1  # 4096 tokens per micro-batch, as 2 x 2048
              # No test split: a hash of the problem text holds 5% of the problems out (data.HOLDOUT). Training, and
              # the teacher's SeqKD answers, read only the other 95% (--holdout train); the test reads the held-out
              # problems, each once (--holdout test). --max-rows counts the rows kept.
              TRAIN_DATA=(--data nvidia/OpenMathReasoning --split cot --holdout train --max-rows $((STEPS * 128))
                          --drop-long)
              TEST_DATA=(--data nvidia/OpenMathReasoning --split cot --holdout test --max-len "$MAX_LEN")
              SEQKD_DATA=(--data nvidia/OpenMathReasoning --split cot --holdout train --max-len "$MAX_LEN")
              SEQKD_TRAIN=(--data "$OUT/seqkd-data/train.jsonl" --drop-long) ;;
    *) echo "DATASET must be ultrachat or openmath, not $DATASET" >&2; exit 2 ;;
  esac
  TEACHER_STEPS=$STEPS BATCH=128 SEEDS=1 CACHED=1
  COMMON=(--batch-size 128 --micro-batch-size "$MICRO" --max-len "$MAX_LEN" --grad-ckpt --log-every 10
          --save-every 200)
  FINETUNE=(--lr 1e-5 --min-lr 1e-6 --warmup-steps 50)
  EVALUATE=(--max-new-tokens "$MAX_LEN" --batch-size 32)
  DIAGNOSE=(--micro-batch-size "$MICRO")  # logits of the three models at MICRO x MAX_LEN positions: 3.7 GB in bf16
  # MiniLLM's own rollout settings, from its public Qwen2.5 7B -> 1.5B script; the optimizer and budget are ours
  MINILLM=(--mix 0.2 --reward-scale 0.5 --ppo-epochs 4 --num-rollouts 256 --max-new-tokens 256)
  ON_POLICY=(--on-policy 0.5 --max-new-tokens 256)
  TEACHER_RAW=Qwen/Qwen2.5-7B STUDENT_RAW=Qwen/Qwen2.5-1.5B TEACHER_DATA=("${TRAIN_DATA[@]}") MARK=()
fi
if [[ $FRESH == 1 && $DRY == 0 ]]; then echo "+ rm -rf $OUT"; rm -rf "$OUT"; fi
if [[ $DRY == 0 ]]; then mkdir -p "$OUT"; fi
TEACHER=$OUT/teacher-ft/final
# targets.py keeps pi*'s TOP_K most likely ids per position, and one bucket for the rest's mass (deltakd.py (7)-(8))
TOP_K=${TOP_K:-64}
echo "# reproduce.sh $MODE$([[ $MODE == toy ]] && echo ", $REGIME regime")$([[ $STUDY == 1 ]] && echo ", study of" \
  "$SEEDS seeds"): writing to $OUT"

# ------------------------------------------------------------------------------------------------ the steps
# pretrain WHO STEPS: a toy raw model, from random weights on the plain-text corpus
pretrain() {
  local corpus=$DATA_DIR/corpus.jsonl
  if [[ $1 == teacher ]]; then corpus=$TEACHER_CORPUS; fi
  run "$OUT/$1-raw/final" "${LAUNCH[@]}" train.py --model "$OUT/init/$1" --random-init --loss sft \
    --data "$corpus" --max-steps "$2" "${PRETRAIN[@]}" --out "$OUT/$1-raw"
}

teacher_sft() {
  run "$TEACHER" "${LAUNCH[@]}" train.py --model "$TEACHER_RAW" --loss sft "${TEACHER_DATA[@]}" \
    --max-steps "$TEACHER_STEPS" "${FINETUNE[@]}" "${COMMON[@]}" --out "$OUT/teacher-ft"
}

# SeqKD trains on the fine-tuned teacher's greedy answers to the training prompts, as many as the budget uses. Greedy
# answers do not depend on a seed: made once, they serve every seed of the study.
seqkd_answers() {
  run "$OUT/seqkd-data/train.jsonl" "${LAUNCH[@]}" evaluate.py --model "$TEACHER" "${SEQKD_DATA[@]}" \
    --max-examples $((STEPS * BATCH)) "${EVALUATE[@]}" --out "$OUT/seqkd-data" \
    --write-data "$OUT/seqkd-data/train.jsonl"
}

# targets ALPHA: the cache of pi* at ALPHA (T = 1) over the training data, as the students read it: one teacher-forced
# pass of the frozen models, made once and read by every seed (the paper's decoupled inference). alpha 0 is FKL's
# target, the fine-tuned teacher's distribution, and needs no raw model.
targets() {
  local raw=()
  if [[ $1 != 0 ]]; then raw=(--model "$STUDENT_RAW" --teacher-raw "$TEACHER_RAW"); fi
  run "$OUT/targets/alpha$1/complete.json" "${LAUNCH[@]}" targets.py --teacher "$TEACHER" "${raw[@]}" --alpha "$1" \
    --top-k "$TOP_K" "${TRAIN_DATA[@]}" --max-len "$MAX_LEN" "${DIAGNOSE[@]}" --out "$OUT/targets/alpha$1"
}

# evaluation MODEL OUT: ROUGE of the model's greedy replies to the test prompts
evaluation() {
  run "$2/summary.json" "${LAUNCH[@]}" evaluate.py --model "$1" "${TEST_DATA[@]}" --max-examples "$EVAL_EXAMPLES" \
    "${EVALUATE[@]}" --out "$2"
}

# diagnosis STUDENT TEACHER OUT DATA...: Delta-KD's target from STUDENT (the raw student, or a trained one in its
# place), TEACHER and the raw teacher, teacher-forced on the replies of DATA (diagnose.py)
diagnosis() {
  local student=$1 teacher=$2 out=$3; shift 3
  run "$out/diagnose.json" "${LAUNCH[@]}" diagnose.py --model "$student" --teacher "$teacher" \
    --teacher-raw "$TEACHER_RAW" "$@" --max-examples "$EVAL_EXAMPLES" "${DIAGNOSE[@]}" "${MARK[@]}" --out "$out"
}

# report ARGS...: report.py on the run folders: the tables, plots and checks
report() {
  printf '+'; printf ' %q' "$PYTHON" report.py "$@"; echo
  if [[ $DRY == 0 ]]; then "$PYTHON" report.py "$@"; fi
}

# where the runs of SEED live: seed 0 (the toy's and the paper's) at the top, the study's other seeds below it
seed_dir() { if [[ $1 == 0 ]]; then echo "$OUT"; else echo "$OUT/seed$1"; fi; }

# student NAME SEED: train it, then evaluate it. The seed orders the data and, for MiniLLM and on-policy runs, draws
# the samples.
student() {
  local name=$1 seed=$2 method dir
  dir=$(seed_dir "$seed")
  case $name in  # the paper's methods are one loss function with different settings (see deltakd.py)
    sft) method=(--loss sft "${TRAIN_DATA[@]}") ;;
    fkl | deltakd | deltakd-alpha*)  # off-policy: pi* from its cache, or from the frozen models online
      local loss=deltakd alpha=1
      case $name in fkl) loss=fkl alpha=0 ;; deltakd-alpha*) alpha=${name#deltakd-alpha} ;; esac
      if [[ $CACHED == 1 ]]; then
        method=(--loss "$loss" --targets "$OUT/targets/alpha$alpha" "${TRAIN_DATA[@]}")
      elif [[ $loss == fkl ]]; then
        method=(--loss fkl --teacher "$TEACHER" "${TRAIN_DATA[@]}")
      else
        method=(--loss deltakd --teacher "$TEACHER" --teacher-raw "$TEACHER_RAW" "${TRAIN_DATA[@]}")
        if [[ $name == deltakd-alpha* ]]; then method+=(--alpha "$alpha"); fi
      fi ;;
    rkl) method=(--loss rkl --teacher "$TEACHER" "${TRAIN_DATA[@]}") ;;
    seqkd) method=(--loss sft "${SEQKD_TRAIN[@]}") ;;
    minillm) method=(--loss minillm --teacher "$TEACHER" "${MINILLM[@]}" "${TRAIN_DATA[@]}") ;;
    deltakd-online) method=(--loss deltakd --teacher "$TEACHER" --teacher-raw "$TEACHER_RAW" "${TRAIN_DATA[@]}") ;;
    deltakd-onpolicy) method=(--loss deltakd --teacher "$TEACHER" --teacher-raw "$TEACHER_RAW" "${ON_POLICY[@]}"
                              "${TRAIN_DATA[@]}") ;;
  esac
  run "$dir/$name/final" "${LAUNCH[@]}" train.py --model "$STUDENT_RAW" "${method[@]}" --max-steps "$STEPS" \
    "${FINETUNE[@]}" "${COMMON[@]}" --seed "$seed" --out "$dir/$name"
  evaluation "$dir/$name/final" "$dir/eval/$name"
}

# ------------------------------------------------------------------------------------------------ 1-2. raw models
if [[ $MODE == toy ]]; then
  stage data
  run "$DATA_DIR/test.jsonl" "$PYTHON" toy.py --out "$DATA_DIR" --regime "$REGIME" --n-train "$N_TRAIN" \
    --n-test "$N_TEST" --n-corpus "$N_CORPUS"
  # Like Qwen's, both lm_heads have more rows than the tokenizer has ids, and not the same number: more than any toy
  # tokenizer can have (toy.py --vocab-size, 768), whatever the data it learns from.
  model_config "$OUT/init/teacher" '{"model_type": "qwen2", "vocab_size": 784, "hidden_size": 128,
  "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
  "rope_theta": 1000000.0, "tie_word_embeddings": false, "max_position_embeddings": 512}'
  model_config "$OUT/init/student" '{"model_type": "qwen2", "vocab_size": 776, "hidden_size": 64,
  "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
  "rope_theta": 1000000.0, "tie_word_embeddings": true, "max_position_embeddings": 512}'
  stage pre-training
  lane pretrain teacher "$PRETRAIN_STEPS"
  # what needs only the raw student runs while the (larger) teacher pre-trains; in the other regimes no student
  # trains before the gate
  student_side() {
    pretrain student "$STUDENT_PRETRAIN_STEPS"
    evaluation "$STUDENT_RAW" "$OUT/eval/student-raw"  # every student's starting point, before any fine-tuning
    local seed
    for ((seed = 0; seed < SEEDS * STUDY || seed == 0; seed++)); do
      if [[ $REGIME == knowledge ]]; then student sft "$seed"; fi  # the study's too
    done
  }
  lane student_side
  lanes_done
fi

# ------------------------------------------------------------------------------------------------ the premise's gate
# Delta-KD's premise is a raw student that knows the content as well as the raw teacher. Both teachers are the raw
# teacher here, so pi* is a raw model's distribution and the diagnostic compares the two raw models' accuracy on
# held-out replies in the pre-training style. report.py --gate stops the run if the student is more than GATE (0.02,
# two points) behind: pre-train longer (PRETRAIN_STEPS) in a fresh OUT, before any student trains.
if [[ $MODE == toy && $REGIME == premise ]]; then
  stage gate
  diagnosis "$STUDENT_RAW" "$TEACHER_RAW" "$OUT/gate" --data "$DATA_DIR/test-style-a.jsonl"
  report "$OUT" --gate "$GATE"
fi

# ------------------------------------------------------------------------------------------------ 3-5. students
# In dependency order; the lanes of a block need only what the blocks before it made. The longest lanes go first.
STUDENTS=(sft fkl rkl seqkd minillm deltakd deltakd-alpha0 deltakd-onpolicy)
if [[ $MODE == paper ]]; then
  stage "raw student"
  evaluation "$STUDENT_RAW" "$OUT/eval/student-raw"
  student sft 0
fi
stage "teacher SFT"
teacher_sft
# The student-knows regime's premise is a raw student that knows facts that neither teacher does. Its gate is the
# diagnostic on the held-out replies that state student-only prices, in the SFT style and in the pre-training style:
# report.py --gate-facts stops the run unless, at the prices, the raw student is right often enough and both teachers
# seldom enough (FACT_GATE, least and most).
if [[ $MODE == toy && $REGIME == student-knows ]]; then
  stage gate
  diagnosis "$STUDENT_RAW" "$TEACHER" "$OUT/gate-facts" --data "$DATA_DIR/test-facts.jsonl"
  diagnosis "$STUDENT_RAW" "$TEACHER" "$OUT/gate-facts-style-a" --data "$DATA_DIR/test-facts-style-a.jsonl"
  report "$OUT" --gate-facts "$FACT_GATE"
fi
stage diagnostic
diagnosis "$STUDENT_RAW" "$TEACHER" "$OUT/diagnose" "${TEST_DATA[@]}"
if [[ $CACHED == 1 ]]; then  # every alpha's cache before any student: the frozen models run once per alpha
  stage targets
  ALPHAS=(1 0)
  if [[ $STUDY == 1 ]]; then ALPHAS=(1 "${SWEEP[@]}" 0); fi
  for alpha in "${ALPHAS[@]}"; do lane targets "$alpha"; done
  lanes_done
fi
stage students
seqkd_then_student() { seqkd_answers; student seqkd 0; }
lane seqkd_then_student
for name in deltakd-onpolicy minillm deltakd fkl rkl deltakd-alpha0; do lane student "$name" 0; done
if [[ $REGIME != knowledge ]]; then lane student sft 0; fi  # after the gate
lane evaluation "$TEACHER" "$OUT/eval/teacher-ft"
lanes_done
stage end

# ------------------------------------------------------------------------------------------------ 6. the tables
if [[ $STUDY == 0 ]]; then report "$OUT"; fi

# ------------------------------------------------------------------------------------------------ 7. the study
# Every student method again with seeds 1 .. SEEDS-1 (seed 0 is the run above), and Delta-KD's alpha between FKL's
# 0 and the paper's 1. The shared steps above (data, raw and fine-tuned models, SeqKD answers) are not redone, nor,
# in the knowledge regime, the SFT students, which ran beside the teacher's pre-training (the other regimes train
# them here, after its gate). FKL is the alpha = 0 point: at seed 0 both ran, and results-seed0.md shows them equal
# to the last digit. The off-policy FKL and Delta-KD students read pi* from the caches made above (top TOP_K ids and a
# tail bucket); deltakd-online is Delta-KD at alpha 1 with the frozen models online, the check that the cache changes
# nothing that the students' scores can see (report.py pairs the two, seed by seed).
if [[ $STUDY == 1 ]]; then
  stage study
  METHODS=(sft fkl rkl seqkd minillm deltakd-onpolicy "${SWEEP[@]/#/deltakd-alpha}" deltakd deltakd-online)
  for ((seed = 0; seed < SEEDS; seed++)); do
    for name in "${METHODS[@]}"; do
      if [[ ($name == sft && $REGIME == knowledge) || ($seed == 0 && " ${STUDENTS[*]} " == *" $name "*) ]]; then
        continue  # done above
      fi
      lane student "$name" "$seed"
    done
  done
  # where FKL's and Delta-KD's students err, by token class: the diagnostic, teacher-forced on the test replies, with
  # seed 0's trained student in the raw student's place (its columns are then that student's)
  for name in fkl deltakd; do
    lane diagnosis "$OUT/$name/final" "$TEACHER" "$OUT/students-by-class/$name" "${TEST_DATA[@]}"
  done
  lanes_done
  stage end
  report "$OUT" --study --seeds "$SEEDS" --methods "${METHODS[@]}"
fi
echo "# reproduce.sh $MODE: $SECONDS s in this run (report.py: the seconds of every step, reused or not)"
