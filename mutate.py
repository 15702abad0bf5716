"""Mutation audit: does the test suite catch the bugs a reader of this project fears?

    python mutate.py                  every mutant, then the table (11 minutes on a quiet 2-core CPU)
    python mutate.py --only NAME ...  some of them
    python mutate.py --list           each mutant's edit and the tests it runs, without running anything

Each mutant is one small, realistic bug: a file, an exact piece of its text, what replaces it, and a pytest -k
expression naming the tests that should catch it. For each, the repository's files (git ls-files) are copied to a
fresh temporary folder, the one edit is made there, and those tests run in the copy, stopping at the first failure.
The table gives, for each mutant, the test that failed, or NOT CAUGHT. First the same tests run on the unmodified
copy (skip with --no-baseline): a mutant counts as caught only against tests that pass without it.

A mutant marked `equivalent` changes nothing that any run can show; it stays in the list, with the reason, so that a
reader sees it was considered, and it is expected to survive. Every original text must occur exactly once in its file:
when the code moves on, the audit stops before running anything, naming the mutant to update.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent


@dataclass
class Mutant:
    name: str
    file: str
    original: str
    replacement: str
    tests: str  # a pytest -k expression
    equivalent: str = ""  # why no run can tell it from the original, for a mutant that is expected to survive


MUTANTS = [
    # --- deltakd.py: the loss
    Mutant("shift-sign", "deltakd.py", "z = z + alpha * shift", "z = z - alpha * shift",
           "test_loss_reference_is or test_loss_target_is"),
    Mutant("sft-at-kd-temperature", "deltakd.py",
           "log_q1 = log_q if T == 1.0 else _log_probs(s, 1.0)", "log_q1 = log_q",
           "test_loss_equals_the_reference"),
    Mutant("kd-without-T-squared", "deltakd.py", "kd = T * T * kd_sum / denom", "kd = kd_sum / denom",
           "test_loss_equals_the_reference"),
    Mutant("fkl-gradient-without-T", "deltakd.py", "g += (1 - lam) * T * (q - p)", "g += (1 - lam) * (q - p)",
           "test_loss_equals_the_reference"),
    Mutant("rkl-gradient-without-baseline", "deltakd.py", "T * q * (log_ratio - kl)", "T * q * log_ratio",
           "test_loss_equals_the_reference"),
    Mutant("num-tokens-ignored", "deltakd.py", "n if num_tokens is None else num_tokens", "n",
           "test_loss_num_tokens"),
    Mutant("vocab-size-ignored", "deltakd.py", "if vocab_size is None else vocab_size", "",
           "test_loss_mismatched_vocab or every_loss_under_torchrun[fkl]"),
    Mutant("log-zero-not-clamped", "deltakd.py", "/ temperature, dim=-1).clamp_(min=_LOG_ZERO)",
           "/ temperature, dim=-1)",
           "test_loss_extreme"),
    Mutant("fused-padding-rows-counted", "deltakd.py", "real = (torch.arange(chunk, device=s.device) < m).to(dtype)",
           "real = torch.ones(chunk, device=s.device, dtype=dtype)", "test_loss_fused_chunks"),
    Mutant("positions-unflattened-without-strides", "deltakd.py", "out.append(flat // stride % size)",
           "out.append(flat % size)", "test_loss_given_positions"),
    # --- deltakd.py: the loss on a cached target (the top k and a tail bucket)
    Mutant("tail-bucket-not-renormalised", "deltakd.py", "tail = log_q + (log_tail[:, None] - log_Q)",
           "tail = log_q + log_tail[:, None]", "test_loss_on_a_cached_target"),
    Mutant("tail-mass-includes-the-kept-ids", "deltakd.py", 'rest = log_target.scatter(-1, ids, float("-inf"))',
           "rest = log_target", "test_loss_topk_target or test_loss_tail_bucket"),
    Mutant("cached-target-ignored", "deltakd.py",
           "log_p = _bucket_target(log_q, *target)  # (7) log pi~", "log_p = log_q  # (7) log pi~",
           "test_loss_on_a_cached_target"),
    Mutant("backward-ignores-the-incoming-gradient", "deltakd.py", "grad.data.mul_(grad_loss)", "grad.data.mul_(1)",
           "test_loss_backward_scales or test_loss_scaled_backward"),
    # --- model.py: Qwen2
    Mutant("rmsnorm-cast-after-weight", "model.py", "return self.weight * h.to(x.dtype)",
           "return (self.weight * h).to(x.dtype)", "test_model_logits_and_grads"),
    Mutant("rope-rotation-sign", "model.py", "torch.cat((-x2, x1), dim=-1)", "torch.cat((x2, -x1), dim=-1)",
           "test_model_logits_and_grads"),
    Mutant("padding-counts-as-positions", "model.py", "return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)",
           "return torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)",
           "test_model_logits_and_grads or test_model_padding or test_model_decoding"),
    Mutant("cache-keeps-keys-as-values", "model.py", "kv_cache[1][:, :, :T] = k, v", "kv_cache[1][:, :, :T] = k, k",
           "test_model_decoding or test_generate_greedy"),
    Mutant("decoding-positions-stuck", "model.py", "state.pos.add_(1)", "state.pos.add_(0)",
           "rollout_stores"),  # MiniLLM's own tests see broken KV-cache decoding, not only the model's
    Mutant("fsdp-shard-rows-floored", "model.py", "rows = -(-p.shape[0] // p.device_mesh.size())",
           "rows = p.shape[0] // p.device_mesh.size()", "test_model_load_weights_into_fsdp2"),
    Mutant("gqa-heads-repeated-in-the-wrong-order", "model.py",
           "t[:, :, None].expand(B, Hkv, n_rep, S, D).reshape(B, Hkv * n_rep, S, D)",
           "t[:, None].expand(B, n_rep, Hkv, S, D).reshape(B, Hkv * n_rep, S, D)",
           "test_model_masked_attention or test_model_padding"),
    Mutant("gumbel-noise-ignores-the-step", "generate.py", "^ (seeds >> 32)) ^ (steps & 0xFFFFFFFF))",
           "^ (seeds >> 32)))", "test_generate_sampling"),
    Mutant("nucleus-cuts-the-token-that-crosses-top-p", "generate.py", "p.cumsum(-1) - p >= top_p",
           "p.cumsum(-1) >= top_p", "test_generate_sampling"),
    Mutant("twin-prompt-copies-the-cache-but-not-its-position", "generate.py", "state.pos[slot] = state.pos[twin]",
           "state.pos[slot] = 0",
           "test_generate_continuous_batching or test_generate_sampled_replies or sample_replies"),
    Mutant("utilization-counts-only-busy-slots", "generate.py", "self.slot_steps += k * self.slots",
           "self.slot_steps += k * len(rows)", "test_generate_decoder_counts_utilization"),
    # --- data.py: chat template, labels, batches
    Mutant("straddling-token-unsupervised", "data.py", "j < len(spans) and end > spans[j][0]",
           "j < len(spans) and start >= spans[j][0]", "test_data_known_qwen_ids or test_data_render"),
    Mutant("weight-0-replies-supervised", "data.py", 'if m["role"] == "assistant" and m.get("weight", 1):',
           'if m["role"] == "assistant":', "test_data_weight_zero"),
    Mutant("same-shuffle-every-epoch", "data.py", "default_rng([self.seed, epoch])", "default_rng([self.seed, 0])",
           "test_data_batches"),
    Mutant("empty-filler-row", "data.py", "lengths = [1 if r is None else", "lengths = [0 if r is None else",
           "test_data_batches_padding"),
    Mutant("padding-past-the-longest", "data.py", "return min(-(-n // 8) * 8, self.longest)",
           "return -(-n // 8) * 8", "test_data_batches_padding"),
    Mutant("row-range-one-too-many", "data.py", "rows = rows[first:stop] if", "rows = rows[first:stop + 1] if",
           "test_data_parquet_json_and_folders or test_data_fit_keeps"),
    Mutant("batches-resume-at-epoch-start", "data.py", 'self.epoch, self.step = state["epoch"], state["step"]',
           'self.epoch, self.step = state["epoch"], 0', "test_data_batches_resume"),
    Mutant("positions-one-token-early", "data.py", 'np.flatnonzero(np.asarray(r["labels"][1:]) != IGNORE)',
           'np.flatnonzero(np.asarray(r["labels"][:-1]) != IGNORE)', "every_loss_under_torchrun[sft]"),
    # --- train.py: which model feeds which slot, normalisation, resume, schedule
    Mutant("teacher-raw-from-student-folder", "train.py", 'frozen["t_raw"] = build(dirs["t_raw"]',
           'frozen["t_raw"] = build(dirs["s_raw"]', "every_loss_under_torchrun[deltakd]"),
    Mutant("raw-teacher-and-raw-student-swapped", "train.py", 'logits.pop("t_raw", None), logits.pop("s_raw", None)',
           'logits.pop("s_raw", None), logits.pop("t_raw", None)', "every_loss_under_torchrun[deltakd]"),
    Mutant("student-raw-from-raw-teacher-folder", "train.py", 'frozen["s_raw"] = build(dirs["s_raw"]',
           'frozen["s_raw"] = build(dirs["t_raw"]', "every_loss_under_torchrun[deltakd]"),
    Mutant("student-raw-is-the-live-student", "train.py",
           'frozen["s_raw"] = build(dirs["s_raw"], mesh, compute_dtype, compute_dtype, False, compile=backend)',
           'frozen["s_raw"] = student', "every_loss_under_torchrun[deltakd]"),
    Mutant("fkl-teacher-from-raw-teacher-folder", "train.py", 'frozen["t_ft"] = build(dirs["t_ft"]',
           'frozen["t_ft"] = build(dirs["t_raw"]', "every_loss_under_torchrun[fkl]"),
    Mutant("no-world-size-normalisation", "train.py", "global_count(micro_batches, device) / world",
           "global_count(micro_batches, device)", "every_loss_under_torchrun[sft]"),
    Mutant("resume-skips-the-data-position", "train.py", 'batches.load_state_dict(state["data"])', 'state["data"]',
           "test_train_minillm_same_update_for_any_world_size_and_exact_resume"),
    Mutant("warmup-starts-at-lr-0", "train.py", "args.lr * (step + 1) / args.warmup_steps",
           "args.lr * step / args.warmup_steps", "test_train_resume_gives"),
    Mutant("one-checkpoint-too-few-kept", "train.py", "checkpoints(out)[:-args.keep_checkpoints]",
           "checkpoints(out)[:1 - args.keep_checkpoints]", "test_train_resume_gives"),
    Mutant("on-policy-sft-on-samples", "train.py", '{**loss_settings(args), "lam": 0.0}', "loss_settings(args)",
           "on_policy_methods_under_torchrun[deltakd-on-policy]"),
    # --- minillm.py: the PPO clip, rewards, advantages, importance weights, the step's terms
    Mutant("ppo-clip-removed", "minillm.py", "-adv * rho.clamp(1 - clip, 1 + clip)", "-adv * rho",
           "policy_loss_clips or step_gradient"),
    Mutant("whitening-dropped-in-rollout", "minillm.py", "adv = advantages(rewards)",
           "adv = advantages(rewards, whiten=False)", "rollout_stores"),
    Mutant("reward-sign", "minillm.py", "args.reward_scale * (p - q)", "args.reward_scale * (q - p)",
           "rollout_stores"),
    Mutant("reward-scale-ignored", "minillm.py", "args.reward_scale * (p - q)", "(p - q)", "rollout_stores"),
    Mutant("importance-weight-inverted", "minillm.py", "np.exp(q - m)", "np.exp(m - q)", "rollout_stores"),
    Mutant("old-log-prob-of-the-mixture", "minillm.py", '"log_q_old": np.r_[zeros, q]', '"log_q_old": np.r_[zeros, m]',
           "rollout_stores or step_gradient"),
    Mutant("length-norm-counts-the-token", "minillm.py", "np.maximum(np.arange(len(r))[::-1], 1)",
           "np.arange(len(r), 0, -1)", "advantages_follow or rollout_stores"),
    Mutant("single-step-term-dropped", "minillm.py", "(pg + single).backward()", "pg.backward()", "step_gradient"),
    Mutant("ptx-term-unweighted", "minillm.py", "(args.lam * sft).backward()", "sft.backward()", "step_gradient"),
    Mutant("on-policy-labels-take-the-prompt-end", "minillm.py", '"labels": np.array([IGNORE] * n + ids[n:])',
           '"labels": np.array([IGNORE] * (n - 1) + ids[n - 1:])',
           "on_policy_methods_under_torchrun[deltakd-on-policy]"),
    Mutant("token-log-prob-gradient-sign", "minillm.py", "d[torch.arange(len(d), device=d.device), y[rows]] += 1.0",
           "d[torch.arange(len(d), device=d.device), y[rows]] -= 1.0", "test_minillm_policy_loss_is_chunked"),
    # --- rouge.py and evaluate.py: ROUGE, the ceiling, the CLI
    Mutant("precision-recall-swapped", "rouge.py", "p, r = overlap / max(n_pred, 1), overlap / max(n_ref, 1)",
           "p, r = overlap / max(n_ref, 1), overlap / max(n_pred, 1)", "test_rouge_worked"),
    Mutant("stem-three-letter-words", "rouge.py", "porter_stem(t) if len(t) > 3 else t",
           "porter_stem(t) if len(t) > 2 else t", "test_rouge_tokenize"),
    Mutant("lcs-bit-update", "rouge.py", "v = (v + u) | (v - u)", "v = (v + u) & (v - u)",
           "test_rouge_matches_rouge_score_on_generated"),
    Mutant("irregular-stem-missing", "rouge.py", '"skies": "sky", ', "", "test_porter_stem_known"),
    Mutant("corpus-mean-of-recall", "rouge.py", "math.fsum(s[key][2] for s in scores)",
           "math.fsum(s[key][1] for s in scores)", "test_corpus_rouge or eval_cli_writes_consistent"),
    Mutant("ceiling-unstemmed", "evaluate.py", "rouge(c, r, use_stemmer=True)", "rouge(c, r)",
           "rouge_ceiling"),
    Mutant("ceiling-cut-a-token-short", "evaluate.py", "e.ids[:max_new_tokens]", "e.ids[:max_new_tokens - 1]",
           "rouge_ceiling"),
    Mutant("crash-cut-line-kept", "evaluate.py", 'os.truncate(path, path.read_bytes().rfind(b"\\n") + 1)', "pass",
           "test_eval_cli_resumes_after_a_crash"),
    Mutant("replies-of-other-settings-reused", "evaluate.py",
           "key = next((k for k, v in settings.items() if saved.get(k) != v), None)", "key = None",
           "test_eval_cli_refuses_another"),
    Mutant("boxed-answer-ignores-nested-braces", "evaluate.py", 'depth += {"{": 1, "}": -1}.get(text[end], 0)',
           'depth += {"}": -1}.get(text[end], 0)', "test_eval_scores_beside_rouge"),
    Mutant("numbers-masked-in-the-reply-only", "evaluate.py", '_NUMBER.sub("0", reference)', "reference",
           "test_eval_scores_beside_rouge"),
    # --- diagnose.py: Delta-KD's target before any student trains
    Mutant("diagnose-raw-models-swapped", "diagnose.py", 'delta_kd_target(rows["t_ft"], rows["t_raw"], rows["s_raw"]',
           'delta_kd_target(rows["t_ft"], rows["s_raw"], rows["t_raw"]',
           "test_diagnose_matches_float64 or test_diagnose_identities"),
    Mutant("diagnose-unmoved-inverted", "diagnose.py", "unmoved = shift < UNMOVED_KL", "unmoved = shift > UNMOVED_KL",
           "test_diagnose_matches_float64"),
    Mutant("diagnose-student-only-errors-ignore-the-raw-teacher", "diagnose.py",
           "student_only = t_ok & t_raw_ok & ~s_raw_ok", "student_only = t_ok & ~s_raw_ok",
           "test_diagnose_matches_float64"),
    Mutant("diagnose-one-process-share-only", "diagnose.py", "    dist.all_reduce(sums)\n", "\n",
           "test_diagnose_identities_and_two_processes"),
    Mutant("diagnose-fixes-where-the-teacher-is-right", "diagnose.py", "ok & ~t_ok, ~ok & t_ok",
           "ok & t_ok, ~ok & t_ok", "test_diagnose_matches_float64"),
    Mutant("diagnose-tail-one-rank-early", "diagnose.py", "log_tail = rest[:, k] / math.log(10)",
           "log_tail = rest[:, k - 1] / math.log(10)", "test_diagnose_matches_float64"),
    Mutant("diagnose-mark-ignored", "diagnose.py", "                classes[i] = len(CLASSES)\n",
           "                pass\n",
           "test_diagnose_token_classes"),
    # --- targets.py and train.py --targets: decoupled inference
    Mutant("cache-rows-of-another-example", "targets.py", "shard, first, n = self.where[self.keys[e]]",
           "shard, first, n = self.where[self.keys[0]]", "test_targets_training_from_an_exact_cache"),
    Mutant("cache-rows-in-micro-batch-order", "targets.py", "mine = torch.from_numpy(np.flatnonzero(rows_of == row))",
           "mine = torch.from_numpy(np.flatnonzero(rows_of == 0))", "test_targets_cache_holds"),
    Mutant("cache-alpha-not-checked", "train.py", "if mine is not None and mine != cache.settings[flag]:",
           "if False:", "test_targets_refusals"),
    Mutant("cache-missing-examples-not-checked", "targets.py", "        if missing:\n", "        if False:\n",
           "test_targets_refusals"),
    Mutant("rerun-with-other-settings-not-refused", "targets.py", "    if key:\n        sys.exit(", "    if False:\n"
           "        sys.exit(", "test_targets_refusals"),
    Mutant("sigterm-ignored-by-train", "train.py", '"sigterm": float(bool(sigterm))', '"sigterm": 0.0',
           "test_targets_stopped_by_sigterm"),
    Mutant("sigterm-stops-without-saving", "train.py", "if step == total_steps or stopped or (step >= next_save",
           "if step == total_steps or (step >= next_save", "test_targets_stopped_by_sigterm"),
    # --- toy.py: the student-knows regime keeps the raw teacher from the student-only facts
    Mutant("teacher-corpus-knows-every-price", "toy.py", '[g for g, (_, k) in kinds.items() if k == "shared"]',
           "list(prices)", "test_toy_student_knows"),
    Mutant("uncovered-goods-in-the-training-chats", "toy.py", '{"none": 0.6, "shared": 0.2, "covered": 0.2}',
           '{"none": 0.6, "shared": 0.2, "uncovered": 0.2}', "test_toy_student_knows"),
]


def copy_repo(dest):
    """The repository's tracked and untracked-but-not-ignored files, as a fresh clone would have them plus edits."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)


def run_tests(folder, tests, timeout):
    """(verdict, seconds): the first test that failed, None when all passed."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "test_deltakd.py", "-k", tests]
    try:
        run = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "COLUMNS": "250"})  # room for the reason in the summary line
    except subprocess.TimeoutExpired:
        return f"timeout after {timeout} s (a hang the suite would show)", time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    if run.returncode == 5:
        sys.exit(f"mutate.py: -k {tests!r} selects no test: a test was renamed; update the mutants")
    if run.returncode == 0:
        return None, seconds
    failed = re.search(r"^(?:FAILED|ERROR) test_deltakd\.py::(\S+)(?: - (.*))?", run.stdout, re.M)
    if run.returncode != 1 or not failed:  # pytest itself failed: not a test catching the mutant
        sys.exit(f"mutate.py: pytest exited with {run.returncode} in {folder}:\n"
                 f"{run.stdout[-3000:]}{run.stderr[-3000:]}")
    why = (failed.group(2) or "").replace("|", "/")
    return failed.group(1) + (f" ({why[:60]}{'...' * (len(why) > 60)})" if why else ""), seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    p.add_argument("--list", action="store_true", help="print each mutant's edit and tests, run nothing")
    p.add_argument("--no-baseline", action="store_true", help="skip the run of the tests on the unmodified copy")
    p.add_argument("--timeout", type=int, default=1200, help="seconds one mutant's tests may take")
    args = p.parse_args()

    # --- every mutant applies, before anything runs
    unknown = set(args.only or []) - {m.name for m in MUTANTS}
    if unknown:
        sys.exit(f"mutate.py: --only: no mutant named {', '.join(sorted(unknown))}")
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    for m in mutants:
        found = (REPO / m.file).read_text().count(m.original)
        if found != 1:
            sys.exit(f"mutate.py: mutant {m.name}: its original text occurs {found} times in {m.file}, not once: "
                     f"the code has moved; update the mutant ({m.original!r})")
    if args.list:
        for m in mutants:
            print(f"{m.name} ({m.file}; -k {m.tests!r}){' [equivalent: ' + m.equivalent + ']' if m.equivalent else ''}"
                  f"\n  - {m.original}\n  + {m.replacement}")
        return

    # --- the tests pass without any mutant; then each mutant in its own fresh copy of the files as they were now
    t_start = time.perf_counter()
    snapshot = Path(tempfile.mkdtemp(prefix="mutate-snapshot-"))
    copy_repo(snapshot)
    if not args.no_baseline:
        with tempfile.TemporaryDirectory(prefix="mutate-baseline-") as tmp:
            shutil.copytree(snapshot, tmp, dirs_exist_ok=True)
            failed, seconds = run_tests(tmp, " or ".join(f"({m.tests})" for m in mutants), args.timeout * 3)
        if failed:
            sys.exit(f"mutate.py: {failed} fails without any mutant: fix the suite first")
        print(f"baseline: the selected tests pass unmodified ({seconds:.0f} s)", flush=True)
    rows = []
    for m in mutants:
        with tempfile.TemporaryDirectory(prefix=f"mutate-{m.name}-") as tmp:
            shutil.copytree(snapshot, tmp, dirs_exist_ok=True)
            path = Path(tmp) / m.file
            path.write_text(path.read_text().replace(m.original, m.replacement))
            caught, seconds = run_tests(tmp, m.tests, args.timeout)
        verdict = caught or ("survives, equivalent: " + m.equivalent if m.equivalent else "NOT CAUGHT")
        if caught and m.equivalent:
            verdict += "; marked equivalent, yet caught: recheck its reason"
        rows.append((m.name, m.file, verdict, seconds))
        print(f"{m.name:40} {m.file:12} {seconds:5.0f} s  {verdict}", flush=True)

    shutil.rmtree(snapshot)

    # --- the table
    print("\n| mutant | file | caught by | s |\n|---|---|---|---|")
    for name, file, verdict, seconds in rows:
        print(f"| {name} | {file} | {verdict} | {seconds:.0f} |")
    survivors = [r for r in rows if r[2] == "NOT CAUGHT"]
    print(f"\n{len(rows) - len(survivors)} of {len(rows)} caught or explained, "
          f"{len(survivors)} NOT CAUGHT; {time.perf_counter() - t_start:.0f} s in all")
    sys.exit(1 if survivors else 0)


if __name__ == "__main__":
    main()
