#!/usr/bin/env bash
# The Delta-KD paper's pipeline, end to end: a raw teacher and a raw student, the teacher's SFT, the student trained
# six ways with the same step budget (SFT, FKL, RKL, SeqKD, Delta-KD, Delta-KD with alpha=0), ROUGE on held-out data.
#
#   bash reproduce.sh [toy] [--quick]   offline on a CPU: toy tokenizer, data and models, pre-trained here (default)
#   bash reproduce.sh paper             Qwen2.5-7B -> Qwen2.5-1.5B on UltraChat-200k, through torchrun
#       NPROC=8 (processes per node), NNODES=1; on several nodes also NODE_RANK, MASTER_ADDR, MASTER_PORT.
#       DATASET=openmath switches to nvidia/OpenMathReasoning. STEPS, EVAL_EXAMPLES and OUT override the defaults.
#   --dry-run prints the commands without running them; --fresh starts over instead of reusing finished steps.
#
# Every command is printed before it runs: this script is the documentation of the real commands. A step whose
# output exists is skipped, and an interrupted train.py resumes from its newest checkpoint when run again.
set -euo pipefail
cd "$(dirname "$0")"

MODE=toy QUICK=0 FRESH=0 DRY=0
for arg in "$@"; do
  case $arg in
    toy | paper) MODE=$arg ;;
    --quick) QUICK=1 ;;
    --fresh) FRESH=1 ;;
    --dry-run) DRY=1 ;;
    *) echo "usage: bash reproduce.sh [toy|paper] [--quick] [--fresh] [--dry-run]" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python}

# run OUTPUT COMMAND...: print the command, then run it unless OUTPUT exists (the step finished in an earlier run)
run() {
  local output=$1; shift
  if [[ $DRY == 0 && -e $output ]]; then printf '# done:'; printf ' %q' "$@"; echo; return; fi
  printf '+'; printf ' %q' "$@"; echo
  if [[ $DRY == 0 ]]; then "$@"; fi
}

# model_config DIR JSON: a model folder holding only config.json and the tokenizer, for train.py --random-init
model_config() {
  run "$1/config.json" mkdir -p "$1"
  run "$1/tokenizer.json" cp "$DATA_DIR/tokenizer.json" "$DATA_DIR/tokenizer_config.json" "$1/"
  printf '+ cat > %q <<EOF\n%s\nEOF\n' "$1/config.json" "$2"
  if [[ $DRY == 0 ]]; then echo "$2" > "$1/config.json"; fi
}

# ------------------------------------------------------------------------------------------------ sizes and models
if [[ $MODE == toy ]]; then
  if [[ $QUICK == 1 ]]; then
    OUT=${OUT:-runs/toy-quick}
    N_TRAIN=640 N_TEST=40 N_CORPUS=1200 PRETRAIN_STEPS=60 TEACHER_STEPS=40 STEPS=${STEPS:-30} BATCH=16
  else
    OUT=${OUT:-runs/toy}
    N_TRAIN=4000 N_TEST=200 N_CORPUS=8000 PRETRAIN_STEPS=300 TEACHER_STEPS=150 STEPS=${STEPS:-150} BATCH=32
  fi
  EVAL_EXAMPLES=${EVAL_EXAMPLES:-$N_TEST}
  DATA_DIR=$OUT/data
  LAUNCH=("$PYTHON")
  TRAIN_DATA=(--data "$DATA_DIR/train.jsonl") TEST_DATA=(--data "$DATA_DIR/test.jsonl")
  COMMON=(--batch-size "$BATCH" --micro-batch-size "$BATCH" --max-len 256 --log-every 25 --save-every 100)
  PRETRAIN=(--lr 3e-3 --min-lr 3e-4 --warmup-steps 20)
  FINETUNE=(--lr 1e-3 --min-lr 1e-4 --warmup-steps 10)
  GENERATE=(--max-new-tokens 160 --batch-size 64)
  TEACHER_RAW=$OUT/teacher-raw/final STUDENT_RAW=$OUT/student-raw/final
else
  DATASET=${DATASET:-ultrachat}
  OUT=${OUT:-runs/paper-$DATASET}
  STEPS=${STEPS:-1000}  # the student budget: 1000 steps of 128 sequences
  EVAL_EXAMPLES=${EVAL_EXAMPLES:-2000}
  NPROC=${NPROC:-8} NNODES=${NNODES:-1}
  if [[ $NNODES == 1 ]]; then
    LAUNCH=(torchrun --standalone --nproc_per_node "$NPROC")
  else
    LAUNCH=(torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC" --node_rank "${NODE_RANK:?set NODE_RANK}"
            --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}")
  fi
  case $DATASET in
    ultrachat) TRAIN_DATA=(--data HuggingFaceH4/ultrachat_200k --split train_sft)
               TEST_DATA=(--data HuggingFaceH4/ultrachat_200k --split test_sft) ;;
    openmath) ROWS=$((STEPS * 128))  # no test split: train on the first rows of cot, evaluate on the next ones
              TRAIN_DATA=(--data nvidia/OpenMathReasoning --split "cot[:$ROWS]")
              TEST_DATA=(--data nvidia/OpenMathReasoning --split "cot[$ROWS:$((ROWS + EVAL_EXAMPLES))]") ;;
    *) echo "DATASET must be ultrachat or openmath, not $DATASET" >&2; exit 2 ;;
  esac
  TEACHER_STEPS=$STEPS BATCH=128
  COMMON=(--batch-size 128 --micro-batch-size 2 --max-len 2048 --grad-ckpt --log-every 10 --save-every 200)
  FINETUNE=(--lr 1e-5 --min-lr 1e-6 --warmup-steps 50)
  GENERATE=(--max-new-tokens 512 --batch-size 32)
  TEACHER_RAW=Qwen/Qwen2.5-7B STUDENT_RAW=Qwen/Qwen2.5-1.5B
fi
if [[ $FRESH == 1 && $DRY == 0 ]]; then echo "+ rm -rf $OUT"; rm -rf "$OUT"; fi
TEACHER=$OUT/teacher-ft/final
echo "# reproduce.sh $MODE: writing to $OUT"

# ------------------------------------------------------------------------------------------------ 1-2. raw models
if [[ $MODE == toy ]]; then
  run "$DATA_DIR/test.jsonl" "$PYTHON" data.py toy --out "$DATA_DIR" --n-train "$N_TRAIN" --n-test "$N_TEST" \
    --n-corpus "$N_CORPUS"
  # Like Qwen's, both lm_heads have more rows than the tokenizer has ids, and not the same number.
  model_config "$OUT/init/teacher" '{"model_type": "qwen2", "vocab_size": 640, "hidden_size": 128,
  "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
  "rope_theta": 1000000.0, "tie_word_embeddings": false, "max_position_embeddings": 512}'
  model_config "$OUT/init/student" '{"model_type": "qwen2", "vocab_size": 632, "hidden_size": 64,
  "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
  "rope_theta": 1000000.0, "tie_word_embeddings": true, "max_position_embeddings": 512}'
  for who in teacher student; do
    run "$OUT/$who-raw/final" "${LAUNCH[@]}" train.py --model "$OUT/init/$who" --random-init --loss sft \
      --data "$DATA_DIR/corpus.jsonl" --max-steps "$PRETRAIN_STEPS" "${PRETRAIN[@]}" "${COMMON[@]}" \
      --out "$OUT/$who-raw"
  done
fi

# ------------------------------------------------------------------------------------------------ 3. teacher SFT
run "$TEACHER" "${LAUNCH[@]}" train.py --model "$TEACHER_RAW" --loss sft "${TRAIN_DATA[@]}" \
  --max-steps "$TEACHER_STEPS" "${FINETUNE[@]}" "${COMMON[@]}" --out "$OUT/teacher-ft"

# ------------------------------------------------------------------------------------------------ 4. students
# SeqKD trains on the fine-tuned teacher's greedy answers to the training prompts, as many as the budget uses.
run "$OUT/seqkd-data/train.jsonl" "${LAUNCH[@]}" evaluate.py --model "$TEACHER" "${TRAIN_DATA[@]}" \
  --max-examples $((STEPS * BATCH)) "${GENERATE[@]}" --out "$OUT/seqkd-data" --write-data "$OUT/seqkd-data/train.jsonl"
STUDENTS=(sft fkl rkl seqkd deltakd deltakd-alpha0)
for name in "${STUDENTS[@]}"; do
  case $name in  # the paper's methods are one loss function with different settings (see deltakd.py)
    sft) method=(--loss sft "${TRAIN_DATA[@]}") ;;
    fkl | rkl) method=(--loss "$name" --teacher "$TEACHER" "${TRAIN_DATA[@]}") ;;
    seqkd) method=(--loss sft --data "$OUT/seqkd-data/train.jsonl") ;;
    deltakd) method=(--loss deltakd --teacher "$TEACHER" --teacher-raw "$TEACHER_RAW" "${TRAIN_DATA[@]}") ;;
    deltakd-alpha0) method=(--loss deltakd --teacher "$TEACHER" --teacher-raw "$TEACHER_RAW" --alpha 0
                            "${TRAIN_DATA[@]}") ;;
  esac
  run "$OUT/$name/final" "${LAUNCH[@]}" train.py --model "$STUDENT_RAW" "${method[@]}" --max-steps "$STEPS" \
    "${FINETUNE[@]}" "${COMMON[@]}" --out "$OUT/$name"
done

# ------------------------------------------------------------------------------------------------ 5. evaluation
for name in teacher-ft "${STUDENTS[@]}"; do
  run "$OUT/eval/$name/summary.json" "${LAUNCH[@]}" evaluate.py --model "$OUT/$name/final" "${TEST_DATA[@]}" \
    --max-examples "$EVAL_EXAMPLES" "${GENERATE[@]}" --out "$OUT/eval/$name"
done

# ------------------------------------------------------------------------------------------------ 6. the table
printf '+ %q - %q <<EOF  (the results table)\n' "$PYTHON" "$OUT"
if [[ $DRY == 1 ]]; then exit 0; fi
"$PYTHON" - "$OUT" "$STEPS" "$TEACHER_STEPS" <<'EOF'
import json, sys
from pathlib import Path
out, steps, teacher_steps = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
rows = [("Teacher (SFT)", "teacher-ft", teacher_steps), ("SFT", "sft", steps), ("FKL", "fkl", steps),
        ("RKL", "rkl", steps), ("SeqKD", "seqkd", steps), ("Delta-KD", "deltakd", steps),
        ("Delta-KD, alpha=0", "deltakd-alpha0", steps)]
lines = ["| Method | R-1 | R-2 | R-L | steps |", "|---|---|---|---|---|"]
for label, name, n in rows:
    r = json.loads((out / "eval" / name / "summary.json").read_text())["rouge_stemmed"]
    lines.append(f"| {label} | {r['rouge1']:.4f} | {r['rouge2']:.4f} | {r['rougeL']:.4f} | {n} |")
table = "\n".join(lines) + "\n\nROUGE F, stemmed, mean over the held-out examples; one step budget for every student.\n"
(out / "results.md").write_text(table)
print(table + f"wrote {out / 'results.md'}")
EOF
