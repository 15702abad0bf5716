"""The tables, statistics and plots of reproduce.sh, made from its finished run folders.

    python report.py runs/toy       results.md (one run of each method, and the premise diagnostic) and times.json
                                    (seconds per stage)
    python report.py runs/toy-study-premise --study --seeds 5 --methods sft fkl ...
                                    the study: results.md (mean ± sd over seeds, each method paired with FKL on the
                                    same seeds), results.json (every run's scores), alpha.png, curves.png and
                                    diagnose.png, and results-seed0.md (seed 0's runs as the toy's table)
    python report.py runs/toy-study-premise --gate 0.02
                                    the premise regime's gate: exits 1 unless the raw student's accuracy on held-out
                                    replies in the pre-training style is within 0.02 of the raw teacher's
    python report.py runs/toy-study-knowledge runs/toy-study-premise runs/toy-study-student-knows --when when.md
                                    the regimes side by side: the diagnostic before any student, the students after

Everything is read from the folders reproduce.sh writes: eval/<name>/summary.json for the scores, <name>/metrics.jsonl
for the training curves and step counts, checkpoints' trainer_state.json for MiniLLM's settings, diagnose/ and gate/
for diagnose.py, times.tsv for the seconds. Seed s > 0 lives under seed<s>/. results.md holds no times, so
that two runs of the same commands write the same file; the times go to times.json.
"""
import argparse
import json
import math
import re
import statistics
from pathlib import Path

LABELS = {"teacher-ft": "Teacher (SFT)", "student-raw": "Student (raw)", "sft": "SFT", "fkl": "FKL", "rkl": "RKL",
          "seqkd": "SeqKD", "minillm": "MiniLLM", "deltakd": "Delta-KD", "deltakd-alpha0": "Delta-KD, alpha=0",
          "deltakd-onpolicy": "Delta-KD, on-policy (extension)", "deltakd-online": "Delta-KD, frozen models online"}
KEYS = ("rouge1", "rouge2", "rougeL")
# evaluate.py's scores beside ROUGE: where a reply goes wrong, in the numbers or in the words and format
WRONG = {"rougeL_numbers_masked": "R-L, numbers masked", "rougeL_numbers_only": "R-L of the numbers",
         "boxed_accuracy": "answer right"}


def label(name):
    return LABELS.get(name) or "Delta-KD, alpha=" + name.removeprefix("deltakd-alpha")


def alpha(name):
    """Delta-KD's alpha for a run name, or None. FKL is the alpha = 0 point: the loss is the same, bit for bit."""
    if name in ("fkl", "deltakd"):
        return 0.0 if name == "fkl" else 1.0
    return float(name.removeprefix("deltakd-alpha")) if name.startswith("deltakd-alpha") else None


def seed_dir(out, seed):
    return out if seed == 0 else out / f"seed{seed}"


def summary(out, name, seed=0):
    path = seed_dir(out, seed) / "eval" / name / "summary.json"
    if not path.exists():
        raise SystemExit(f"report.py: {path} is missing: run reproduce.sh to the end first")
    return json.loads(path.read_text())


def scores(out, name, seed=0):
    s = summary(out, name, seed)
    return {**s["rouge_stemmed"], **{k: s[k] for k in WRONG}}


def cell(x):
    return "—" if x is None else f"{x:.4f}"


def metrics(run):
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def steps(run):
    rows = metrics(run)
    return rows[-1]["step"] if rows else 0


def rollouts(run):
    """MiniLLM's sampled replies in all: a phase of num_rollouts opens every ppo_epochs x num_rollouts / batch_size
    optimizer steps. The settings are the run's own, from its last checkpoint."""
    state = sorted(run.glob("checkpoints/step-*/trainer_state.json"), key=lambda p: int(p.parent.name[5:]))[-1]
    a = json.loads(state.read_text())["args"]
    phase = a["ppo_epochs"] * a["num_rollouts"] // a["batch_size"]
    return math.ceil(steps(run) / phase) * a["num_rollouts"], a["num_rollouts"], phase


def pretraining(run):
    """The raw model's corpus loss: a few points of its curve, its last value, and what the last quarter of the steps
    gained (the mean loss of the last tenth of the steps against that of the tenth before the last quarter: single
    logged values swing by a few percent with the mix of documents). Pre-training reads the corpus once, so every
    logged loss is on text the model had not seen."""
    rows = metrics(run)
    if not rows:
        return None
    total = rows[-1]["step"]
    def window(lo, hi):
        return statistics.fmean(r["loss"] for r in rows if lo * total < r["step"] <= hi * total)
    before, last = window(0.65, 0.75), window(0.9, 1.0)
    points = rows[::max(1, len(rows) // 6)][:-1] + [rows[-1]]
    curve = ", ".join(f"{r['step']}: {r['loss']:.3f}" for r in points)
    return (f"{rows[-1]['loss']:.4f} after {total} steps; the last quarter of the steps lowered it by "
            f"{100 * (before - last) / before:.1f}% ({before:.3f} -> {last:.3f}, means over a tenth of the steps; "
            f"loss by step: {curve})")


# ------------------------------------------------------------------------------------------------ the toy's table

def toy_table(out):
    names = [n for n in LABELS if n not in ("teacher-ft", "student-raw") and (out / "eval" / n).exists()]
    return table_of_runs(out) + fact_table(out, names, [0]) + "\n" + "\n".join(toy_notes(out)) + "\n" + diagnosis(out)


def table_of_runs(out):
    # the study's seed 0 adds Delta-KD with its frozen models online, the check of the cache; the toy has no cache
    names = [n for n in LABELS if n != "deltakd-online" or (out / "eval" / n).exists()]
    lines = ["| Method | R-1 | R-2 | R-L | " + " | ".join(WRONG.values()) + " | steps |", "|---" * 8 + "|"]
    for name in names:
        r = scores(out, name)
        lines.append(f"| {label(name)} | " + " | ".join(cell(r[k]) for k in (*KEYS, *WRONG))
                     + f" | {steps(out / name) if name != 'student-raw' else 0} |")
    return "\n".join(lines) + "\n"


def toy_notes(out):
    teacher = summary(out, "teacher-ft")
    n_rollouts, per_phase, phase = rollouts(out / "minillm")
    notes = [f"ROUGE F, stemmed, mean over the {teacher['examples']} held-out examples; one step budget for every "
             f"student. The ROUGE ceiling (each reference cut at --max-new-tokens {teacher['max_new_tokens']}) is R-L "
             f"{teacher['ceiling_stemmed']['rougeL']:.4f}.",
             f"{WRONG['rougeL_numbers_masked']}: R-L with every number replaced by one symbol, so the words and the "
             f"format alone; {WRONG['rougeL_numbers_only']}: R-L of the replies' numbers alone, in order, over the "
             f"{teacher['number_references']} references that hold some; {WRONG['boxed_accuracy']}: the share of "
             f"replies whose final \\boxed{{}} answer is the reference's ({teacher['boxed_references']} have one).",
             "Student (raw): the student before any fine-tuning, the distribution Delta-KD builds its target on.",
             f"MiniLLM: {n_rollouts} sampled replies in all, {per_phase} per rollout phase of {phase} optimizer steps.",
             "Delta-KD, on-policy: an extension, not in the paper: on a seeded half of the steps the KD term is "
             "computed on the student's own samples (GKD), alpha 1."]
    for who in ("teacher", "student"):
        if (loss := pretraining(out / f"{who}-raw")) is not None:
            notes.append(f"Raw {who}'s pre-training (corpus) loss: {loss}.")
    return notes


def gate_numbers(out):
    """The premise regime's gate, as measured: (raw student's accuracy, raw teacher's, the sentence that says so)."""
    d = json.loads((out / "gate" / "diagnose.json").read_text())
    student, teacher = d["accuracy"]["s_raw"], d["accuracy"]["t_raw"]
    return student, teacher, (f"The gate, before any student trained: on the {d['positions']} reply positions of the "
                              f"{d['examples']} held-out test problems written in the pre-training style (A), the raw "
                              f"student is right (argmax = gold) {100 * student:.1f}% of the time and the raw teacher "
                              f"{100 * teacher:.1f}%.")


def fact_gate_numbers(out):
    """The student-knows regime's gate, as measured: ({model: accuracy at the fact positions of the held-out replies
    in the SFT style}, the sentence and table that say so, in that style and in the pre-training style)."""
    styles = {"the SFT style (B)": out / "gate-facts", "the pre-training style (A)": out / "gate-facts-style-a"}
    found = {style: json.loads((folder / "diagnose.json").read_text()) for style, folder in styles.items()
             if (folder / "diagnose.json").exists()}
    marked = {style: d["classes"]["marked"] for style, d in found.items()}
    first = next(iter(marked.values()))
    lines = [f"The gate, before any student trained: teacher-forced on the {first['positions']} positions where the "
             f"replies of the held-out problems about student-only goods state a price (diagnose.py --mark), the share "
             "where each model's argmax is the right price (chance is about 1 in 9):", "",
             "| style | raw student | raw teacher | fine-tuned teacher |", "|---|---|---|---|"]
    for style, c in marked.items():
        lines.append(f"| {style} | " + " | ".join(f"{100 * c['accuracy'][m]:.1f}%" for m in ("s_raw", "t_raw", "t_ft"))
                     + " |")
    return first["accuracy"], "\n".join(lines) + "\n"


def fact_scores(out, name, seed=0):
    """{kind: {rougeL, answer, facts}} of a student-knows run's replies, by the kind of their test problem: the mean
    stemmed R-L, the share of right final answers, and the share of the problem's prices that the reply states
    right, in order ("At the market, a lamp costs 7 dollars."), None where the kind has none."""
    rows = {r["id"]: r for r in map(json.loads, (out / "data" / "test.jsonl").read_text().splitlines())}
    path = seed_dir(out, seed) / "eval" / name / "predictions.jsonl"
    kinds = {}
    for record in map(json.loads, path.read_text().splitlines()):
        row = rows[record["id"]]
        stated = re.findall(r"costs (\d+) dollars", record["prediction"])  # the i-th price stated, the i-th good's
        right = [i < len(stated) and int(stated[i]) == p for i, p in enumerate(row["facts"].values())]
        k = kinds.setdefault(row["kind"], {"rougeL": [], "answer": [], "facts": []})
        k["rougeL"].append(record["scores"]["rougeL_stemmed"])
        k["answer"].append(float(bool(record["scores"]["boxed_correct"])))
        k["facts"] += right
    return {kind: {key: statistics.fmean(v) if v else None for key, v in k.items()} for kind, k in kinds.items()}


def fact_table(out, names, seeds):
    """The student-knows regime's scores by kind of test problem, mean ± sd over the seeds, and the paired difference
    from FKL of the share of student-only prices stated right."""
    if not (out / "data" / "market.json").exists():
        return ""
    kinds = ("covered", "uncovered", "shared", "none")
    runs = {name: [fact_scores(out, name, s) for s in seeds] for name in names}
    lines = ["", "By the kind of test problem (student-knows): the share of the goods' prices that a reply states "
             "right, of right final answers, and R-L; covered goods appear in the training chats, uncovered ones in "
             "none, shared ones are known to every model, none: the premise regime's problems. Mean ± sd over "
             f"{len(seeds)} seed(s); − FKL: paired by seed.", "",
             "| Method | prices right: covered | − FKL | uncovered | − FKL | answer right: covered | uncovered | "
             "shared | none | R-L: covered | uncovered | shared | none |", "|---" * 13 + "|"]
    for name, per_seed in runs.items():
        def stat(kind, key, minus_fkl=False):
            if any(kind not in r or r[kind][key] is None for r in per_seed):
                return "—"  # no test problem of this kind among the evaluated ones
            values = [r[kind][key] for r in per_seed]
            if minus_fkl:
                if "fkl" not in runs or name == "fkl":
                    return ""
                values = [v - f[kind][key] for v, f in zip(values, runs["fkl"])]
            return fmt(*mean_sd(values), sign="+" if minus_fkl else "")
        lines.append(f"| {label(name)} | {stat('covered', 'facts')} | {stat('covered', 'facts', True)} | "
                     f"{stat('uncovered', 'facts')} | {stat('uncovered', 'facts', True)} | "
                     + " | ".join(stat(k, "answer") for k in kinds) + " | "
                     + " | ".join(stat(k, "rougeL") for k in kinds) + " |")
    return "\n".join(lines) + "\n"


def diagnosis(out):
    """The gates' numbers and the premise diagnostic's tables (diagnose.py), where the run made them."""
    text = ""
    if (out / "gate" / "diagnose.json").exists():
        text += "\n" + gate_numbers(out)[2] + "\n"
    if (out / "gate-facts" / "diagnose.json").exists():
        text += "\n" + fact_gate_numbers(out)[1]
    if (out / "diagnose" / "diagnose.md").exists():
        text += ("\nDelta-KD's target before any student trained (diagnose.py, teacher-forced on the test "
                 "replies):\n\n" + (out / "diagnose" / "diagnose.md").read_text())
    return text


def students_by_class(out):
    """Where seed 0's FKL and Delta-KD students err, teacher-forced on the test replies, by the gold token's class,
    beside the raw student and pi* at alpha = 1 (reproduce.sh's diagnostic with a trained student as --model)."""
    paths = {name: out / "students-by-class" / name / "diagnose.json" for name in ("fkl", "deltakd")}
    if not (out / "diagnose" / "diagnose.json").exists() or not all(p.exists() for p in paths.values()):
        return ""
    target = json.loads((out / "diagnose" / "diagnose.json").read_text())
    students = {name: json.loads(p.read_text()) for name, p in paths.items()}
    def pct(x):
        return f"{100 * x:.1f}%"
    lines = ["\nWhere the students err (seed 0, teacher-forced on the test replies; accuracy = argmax is the gold "
             "token), by the class of the gold token:\n",
             "| class | positions | fine-tuned teacher | raw student | pi* at alpha = 1 | FKL student "
             "| Delta-KD student |", "|---|---|---|---|---|---|---|"]
    rows = [("all", target, students, 1.0)] + [
        (c, v, {n: s["classes"][c] for n, s in students.items()}, v["share"]) for c, v in target["classes"].items()]
    for name, t, s, share in rows:
        lines.append(f"| {name} | {pct(share)} | {pct(t['accuracy']['t_ft'])} | {pct(t['accuracy']['s_raw'])} | "
                     f"{pct(t['alphas'][-1]['accuracy'])} | {pct(s['fkl']['accuracy']['s_raw'])} | "
                     f"{pct(s['deltakd']['accuracy']['s_raw'])} |")
    return "\n".join(lines) + "\n"


def times(out):
    """From times.tsv (stage, step, seconds; the latest line of each wins): each stage's wall-clock seconds, and each
    step's own seconds. With JOBS lanes side by side, a stage takes less than the sum of its steps."""
    path, stages, steps = out / "times.tsv", {}, {}
    for line in path.read_text().splitlines() if path.exists() else []:
        stage, step, seconds = line.split("\t")
        if step == "(wall)":
            stages[stage] = float(seconds)
        elif not step.startswith("init"):  # the model folders' mkdir and cp
            steps.setdefault(stage, {})[step] = float(seconds)
    return {"stages": stages, "total": round(sum(stages.values()), 1), "steps": steps}


def print_times(t):
    print("wall-clock seconds per stage, as each last ran (a rerun that reuses a stage keeps its time), and in "
          "brackets each step's own seconds:")
    for stage, seconds in t["stages"].items():
        steps = t["steps"].get(stage, {})
        if len(steps) > 12:  # many runs: per method, its training and its evaluation, each a mean over its runs
            per = {}
            for step, s in steps.items():
                parts = step.split("/")
                per.setdefault(parts[-1], {}).setdefault("eval" if "eval" in parts else "train", []).append(s)
            detail = ", ".join(("" if "train" in v else "eval/") + f"{name} "
                               + "+".join(f"{statistics.fmean(v[k]):.0f}" for k in ("train", "eval") if k in v)
                               for name, v in per.items())
            detail = f"{len(steps)} steps; per run, training+evaluation: {detail}"
        else:
            detail = ", ".join(f"{k} {v:.0f}" for k, v in steps.items())
        print(f"  {stage:13} {seconds:7.1f}   ({detail})")
    print(f"  {'total':13} {t['total']:7.1f}")


# ------------------------------------------------------------------------------------------------ the study

def mean_sd(values):
    m = statistics.fmean(values)
    return m, statistics.stdev(values) if len(values) > 1 else float("nan")


def fmt(m, sd, sign=""):
    return f"{m:{sign}.4f}" + ("" if math.isnan(sd) else f" ± {sd:.4f}")


def study(out, seeds, methods):
    runs = {name: {s: scores(out, name, s) for s in seeds} for name in methods}
    shared = {name: scores(out, name) for name in ("teacher-ft", "student-raw")}
    table = ["| Method | R-1 | R-2 | R-L | R-L − FKL | wins vs FKL | " + " | ".join(WRONG.values()) + " | steps |",
             "|---" * 10 + "|"]
    for name, r in shared.items():
        n = 0 if name == "student-raw" else steps(out / name)
        table.append(f"| {label(name)} | " + " | ".join(cell(r[k]) for k in KEYS) + " | | | "
                     + " | ".join(cell(r[k]) for k in WRONG) + f" | {n} |")
    result = {}
    for name in methods:
        result[name] = {k: mean_sd([runs[name][s][k] for s in seeds]) for k in (*KEYS, *WRONG)
                        if runs[name][seeds[0]][k] is not None}
        diff, wins = "", ""
        if "fkl" in runs and name != "fkl":  # paired: the same seed is the same data order
            d = [runs[name][s]["rougeL"] - runs["fkl"][s]["rougeL"] for s in seeds]
            result[name]["rougeL_minus_fkl"] = mean_sd(d)
            result[name]["wins_vs_fkl"] = sum(x > 0 for x in d)
            diff, wins = fmt(*mean_sd(d), sign="+"), f"{sum(x > 0 for x in d)}/{len(seeds)}"
        table.append(f"| {label(name)} | " + " | ".join(fmt(*result[name][k]) for k in KEYS) + f" | {diff} | {wins} | "
                     + " | ".join(fmt(*result[name][k]) if k in result[name] else "—" for k in WRONG)
                     + f" | {steps(out / name)} |")
    S = len(seeds)
    teacher = summary(out, "teacher-ft")
    notes = [f"ROUGE F, stemmed, on the same {teacher['examples']} held-out examples for every "
             f"run: mean ± standard deviation over {S} seeds ({', '.join(map(str, seeds))}). The seed sets the "
             "student's data order and, for MiniLLM and on-policy, its samples; the raw and fine-tuned models and "
             "the SeqKD answers are made once and shared, so their rows have one value. The ROUGE ceiling (each "
             "reference cut at --max-new-tokens) is R-L "
             f"{teacher['ceiling_stemmed']['rougeL']:.4f}.",
             "R-L − FKL: the mean over seeds of each method's R-L minus FKL's with the same seed, ± its standard "
             f"deviation; wins: the seeds where it beats FKL. {S}/{S} wins has a two-sided sign-test p of "
             f"{2 / 2 ** S:.3g}. The spread is over training runs only: every run meets the same test examples.",
             "FKL is Delta-KD's alpha = 0 point: the loss is the same function, and "]
    fkl, alpha0 = runs.get("fkl", {}).get(seeds[0]), None
    if (out / "eval" / "deltakd-alpha0" / "summary.json").exists():
        alpha0 = scores(out, "deltakd-alpha0")
    notes[-1] += ("at seed 0 Delta-KD with alpha=0 scored exactly what FKL scored." if fkl and fkl == alpha0 else
                  "its alpha = 0 run at seed 0 is missing or DIFFERS from FKL: see results-seed0.md.")
    notes += cache_note(out, runs, seeds)
    notes += toy_notes(out)[1:]  # the scores beside ROUGE, the raw student, MiniLLM, on-policy, the pre-training
    text = ("\n".join(table) + "\n" + fact_table(out, methods, seeds) + "\n" + "\n\n".join(notes) + "\n"
            + diagnosis(out) + students_by_class(out))
    (out / "results.md").write_text(text)
    (out / "results-seed0.md").write_text(toy_table(out))
    (out / "results.json").write_text(json.dumps(
        {"seeds": seeds, "shared": shared, "runs": {n: {str(s): r for s, r in v.items()} for n, v in runs.items()},
         "summary": result, "steps": steps(out / "fkl")}, indent=1) + "\n")
    print(text + f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'results-seed0.md'}")
    plots(out, seeds, methods, runs)


def cache_note(out, runs, seeds):
    """What the cache of pi* did: the off-policy FKL and Delta-KD students read it (targets.py), and Delta-KD at
    alpha 1 online is paired with Delta-KD from the cache, seed by seed."""
    cache = out / "targets" / "alpha1" / "targets.json"
    if not cache.exists() or "deltakd-online" not in runs or "deltakd" not in runs:
        return []
    k, vocab = (json.loads(cache.read_text())[key] for key in ("top_k", "vocab_size"))
    d = [runs["deltakd"][s]["rougeL"] - runs["deltakd-online"][s]["rougeL"] for s in seeds]
    return [f"FKL and Delta-KD (every alpha) trained from caches of pi* made once per alpha (targets.py: the top {k} "
            f"of {vocab} ids and one bucket for the rest). Delta-KD from its cache minus Delta-KD with the frozen "
            f"models online, paired by seed: R-L {fmt(*mean_sd(d), sign='+')} (largest |difference| "
            f"{max(map(abs, d)):.4f})."]


# ------------------------------------------------------------------------------------------------ when Delta-KD helps

def when(outs):
    """The regimes side by side: what the diagnostic said before any student trained, what the students did, and
    whether the diagnostic's ranking of the alphas (pi*'s accuracy) was the students' (mean R-L; FKL is alpha 0)."""
    def order(score):  # alphas, best first
        return " > ".join(f"{a:g}" for a in sorted(score, key=score.get, reverse=True))

    def tau(x, y):  # Kendall's tau between two scorings of the same alphas
        pairs = [(a, b) for i, a in enumerate(x) for b in list(x)[i + 1:]]
        return sum(math.copysign(1, (x[a] - x[b]) * (y[a] - y[b])) for a, b in pairs) / len(pairs)
    before = ["| regime | unmoved | raw-student-only errors | t_ft right | fixes / breaks (fixes − breaks), alpha = "
              "0.25; 0.5; 0.75; 1 | ranked first |", "|---|---|---|---|---|---|"]
    after = ["| regime | R-L − FKL (wins), alpha = 0.25; 0.5; 0.75; 1 | students' order | diagnostic's order | tau |",
             "|---|---|---|---|---|"]
    for out in outs:
        d = json.loads((out / "diagnose" / "diagnose.json").read_text())
        r = json.loads((out / "results.json").read_text())["summary"]
        names = {a["alpha"]: "fkl" if a["alpha"] == 0 else "deltakd" if a["alpha"] == 1 else
                 f"deltakd-alpha{a['alpha']:g}" for a in d["alphas"]}
        pi = {a["alpha"]: a["accuracy"] for a in d["alphas"] if names[a["alpha"]] in r}
        rl = {a: r[names[a]]["rougeL"][0] for a in pi}
        regime = out.name.removeprefix("toy-study-")
        before.append(f"| {regime} | {d['unmoved_share']:.1%} | {d['raw_student_only_errors']:.1%} | "
                      f"{d['accuracy']['t_ft']:.1%} | " + "; ".join(
                          f"{a['fixes']:.1%} / {a['breaks']:.1%} ({100 * (a['fixes'] - a['breaks']):+.1f})"
                          for a in d["alphas"] if a["alpha"] > 0) + f" | {order(pi).split(' > ')[0]} |")
        after.append(f"| {regime} | " + "; ".join(
            f"{fmt(*r[names[a]]['rougeL_minus_fkl'], sign='+')} ({r[names[a]]['wins_vs_fkl']})" for a in sorted(pi)
            if a > 0)
            + f" | {order(rl)} | {order(pi)} | {tau(pi, rl):+.1f} |")
    text = ("Before any student trained (diagnose.py on the test replies, teacher-forced): unmoved, the share of "
            "positions where SFT left the teacher unmoved; raw-student-only errors, where both teachers are right "
            "and the raw student wrong; fixes, where t_ft is wrong and pi* right; breaks, the reverse.\n\n"
            + "\n".join(before) + "\n\nWhat the students did (mean ± sd over the seeds, paired with FKL by seed), "
            "and the alphas ranked by the students' mean R-L and by pi*'s accuracy (tau: Kendall's, 1 the same "
            "order):\n\n"
            + "\n".join(after) + "\n")
    return text


def plots(out, seeds, methods, runs):
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plots: matplotlib is not installed (pip install matplotlib, then run the same command again)")
        return
    # R-L against alpha, each seed a dot, the mean ± sd a bar; FKL and SFT as levels
    sweep = sorted((alpha(n), n) for n in methods if alpha(n) is not None)
    fig, ax = plt.subplots(figsize=(6, 4))
    for a, name in sweep:
        values = [runs[name][s]["rougeL"] for s in seeds]
        ax.plot([a] * len(values), values, ".", color="0.6")
        ax.errorbar(a, *mean_sd(values)[:1], yerr=mean_sd(values)[1] if len(values) > 1 else None, fmt="o",
                    color="C0", capsize=4)
    for name, style in (("fkl", "--"), ("sft", ":")):
        if name in runs:
            ax.axhline(statistics.fmean(runs[name][s]["rougeL"] for s in seeds), ls=style, color="0.3",
                       label=label(name))
    ax.set(xlabel="alpha (0 is FKL)", ylabel="R-L (stemmed)", title=f"Delta-KD's alpha, {len(seeds)} seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "alpha.png", dpi=120)
    # the training loss and its KD term, mean over seeds at each logged step
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, name in enumerate(methods):
        curves = [metrics(seed_dir(out, s) / name) for s in seeds]
        x = [r["step"] for r in curves[0]]
        for ax, key in zip(axes, ("loss", "kd")):
            if key == "kd" and name in ("sft", "seqkd"):  # trained on data alone: no KD term
                continue
            y = [statistics.fmean(c[j][key] for c in curves) for j in range(len(x))]
            ax.plot(x, y, label=label(name), color=f"C{i % 10}", ls="-" if i < 10 else "--")
    axes[0].set(xlabel="step", ylabel="training loss", title="training loss (each method's own, not comparable)")
    axes[1].set(xlabel="step", ylabel="KD term", title="KD term (MiniLLM: its single-step reverse KL)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    print(f"wrote {out / 'alpha.png'} and {out / 'curves.png'}")
    diagnosis_plot(out, plt)


def diagnosis_plot(out, plt):
    """pi*'s accuracy against alpha, on every position and on the raw-student-only errors, with the fine-tuned
    teacher's and the raw student's accuracy as levels: what a student that matched the target would get right."""
    path = out / "diagnose" / "diagnose.json"
    if not path.exists():
        return
    d = json.loads(path.read_text())
    x = [a["alpha"] for a in d["alphas"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [a["accuracy"] for a in d["alphas"]], "o-", color="C0", label="pi*, all positions")
    ax.plot(x, [a["accuracy_on_raw_student_only_errors"] for a in d["alphas"]], "s-", color="C3",
            label=f"pi*, raw-student-only errors ({100 * d['raw_student_only_errors']:.1f}% of positions)")
    ax.axhline(d["accuracy"]["t_ft"], ls="--", color="0.3", label="fine-tuned teacher, all positions")
    ax.axhline(d["accuracy"]["s_raw"], ls=":", color="0.3", label="raw student, all positions")
    ax.set(xlabel="alpha (0 is FKL's target, the fine-tuned teacher)", ylabel="accuracy (argmax = gold token)",
           ylim=(-0.02, 1.02), title=f"Delta-KD's target, {d['positions']} test positions ({out.name})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "diagnose.png", dpi=120)
    print(f"wrote {out / 'diagnose.png'}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, nargs="+", help="reproduce.sh's run folder (OUT); with --when, a study's "
                   "folder per regime")
    p.add_argument("--when", type=Path, metavar="FILE", help="the regimes' studies side by side, written to FILE")
    p.add_argument("--study", action="store_true", help="the study's tables, over --seeds and --methods")
    p.add_argument("--seeds", type=int, default=1, help="the study's seeds: 0 .. SEEDS-1")
    p.add_argument("--methods", nargs="+", default=[], help="the study's students, by run name")
    p.add_argument("--gate", type=float, metavar="POINTS",
                   help="only the premise regime's gate: exit 1 unless the raw student's accuracy on OUT/gate is at "
                        "least the raw teacher's minus POINTS (0.02: two points)")
    p.add_argument("--gate-facts", type=lambda x: [float(v) for v in x.split(",")], metavar="LEAST,MOST",
                   help="only the student-knows regime's gate: exit 1 unless, at the prices that OUT/gate-facts "
                        "marks, the raw student is right at least LEAST of the time and both teachers at most MOST")
    args = p.parse_args()
    if args.when:
        text = when(args.out)
        args.when.write_text(text)
        return print(text + f"wrote {args.when}")
    if len(args.out) > 1:
        p.error("several run folders only with --when")
    args.out = args.out[0]
    if args.gate_facts is not None:
        (least, most), (accuracy, numbers) = args.gate_facts, fact_gate_numbers(args.out)
        if accuracy["s_raw"] < least or max(accuracy["t_raw"], accuracy["t_ft"]) > most:
            raise SystemExit(f"{numbers}The gate FAILED: the raw student must be right at least {100 * least:g}% of "
                             f"the time and both teachers at most {100 * most:g}%: no student trains.")
        return print(f"{numbers}The gate passed: the raw student at least {100 * least:g}%, both teachers at most "
                     f"{100 * most:g}%.")
    if args.gate is not None:
        student, teacher, numbers = gate_numbers(args.out)
        if student < teacher - args.gate:
            raise SystemExit(f"{numbers} The gate FAILED: the student is more than {100 * args.gate:g} points behind. "
                             "Pre-train longer (PRETRAIN_STEPS) in a fresh OUT, before any student trains.")
        return print(f"{numbers} The gate passed: within {100 * args.gate:g} points.")
    if args.study:
        study(args.out, list(range(args.seeds)), args.methods)
    else:
        text = toy_table(args.out)
        (args.out / "results.md").write_text(text)
        print(text + f"wrote {args.out / 'results.md'}")
    t = times(args.out)
    (args.out / "times.json").write_text(json.dumps(t, indent=1) + "\n")
    print_times(t)


if __name__ == "__main__":
    main()
