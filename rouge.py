"""ROUGE-1/2/L and the Porter stemmer, written from scratch: exactly what Google's rouge-score 0.1.2 gives.

That is the ROUGE the distillation literature reports (MiniLLM and DistiLLM report rougeL with stemming), so our
numbers can be compared with theirs. Stemming is NLTK's Porter stemmer in its default NLTK_EXTENSIONS mode, the one
rouge-score uses.

    >>> rouge("The quick brown dog jumps on the log.", "The quick brown fox jumps over the lazy dog")["rouge1"]
    (0.75, 0.6666666666666666, 0.7058823529411765)

References:
    Lin, "ROUGE: A Package for Automatic Evaluation of Summaries", 2004.
    Porter, "An algorithm for suffix stripping", Program 14(3), 1980; NLTK's nltk/stem/porter.py.
    https://github.com/google-research/google-research/tree/master/rouge (rouge-score).
    Hyyro, "Bit-parallel LCS-length computation revisited", 2004 (the LCS below).
"""
import functools
import math
import re
from collections import Counter

# ---------------------------------------------------------------------------------------------------------------------
# Porter stemmer, NLTK_EXTENSIONS mode (the paper's algorithm plus Martin Porter's and NLTK's later fixes)

# NLTK answers these from a table before running any step.
_IRREGULAR = {"skies": "sky", "sky": "sky", "dying": "die", "lying": "lie", "tying": "tie", "news": "news",
              "innings": "inning", "inning": "inning", "outings": "outing", "outing": "outing", "howe": "howe",
              "cannings": "canning", "canning": "canning", "proceed": "proceed", "exceed": "exceed",
              "succeed": "succeed"}
# Suffix -> replacement, tried in order; the first suffix that matches decides, even if its condition then fails.
_STEP2 = [("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"),
          ("bli", "ble"), ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"), ("ization", "ize"),
          ("ation", "ate"), ("ator", "ate"), ("alism", "al"), ("iveness", "ive"), ("fulness", "ful"),
          ("ousness", "ous"), ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble"), ("fulli", "ful"), ("logi", "log")]
_STEP3 = [("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"), ("ful", ""), ("ness", "")]
_STEP4 = [(suffix, "") for suffix in
          "al ance ence er ic able ible ant ement ment ent ion ou ism ate iti ous ive ize".split()]


def _cv(word):
    """The word as a string of 'c' (consonant) and 'v' (vowel); 'y' is a vowel only right after a consonant."""
    out = []
    for i, ch in enumerate(word):
        out.append("v" if ch in "aeiou" or (ch == "y" and i > 0 and out[-1] == "c") else "c")
    return "".join(out)


def _measure(stem):
    return _cv(stem).count("vc")  # m in [C](VC)^m[V]


def _ends_cvc(stem):
    # NLTK also counts a two-letter vowel-consonant stem ("at" in "ated") as *o.
    cv = _cv(stem)
    return (cv.endswith("cvc") and stem[-1] not in "wxy") or cv == "vc"


def _apply_rules(word, rules, condition):
    for suffix, replacement in rules:
        if word.endswith(suffix):
            stem = word[: len(word) - len(suffix)]
            return stem + replacement if condition(stem, suffix) else word
    return word


def _step1a(word):
    if word.endswith("ies") and len(word) == 4:  # NLTK: ties -> tie, not ti
        return word[:-1]
    return _apply_rules(word, [("sses", "ss"), ("ies", "i"), ("ss", "ss"), ("s", "")], lambda stem, suffix: True)


def _step1b(word):
    if word.endswith("ied"):  # NLTK: tied -> tie, cried -> cri
        return word[:-1] if len(word) == 4 else word[:-2]
    if word.endswith("eed"):
        return word[:-1] if _measure(word[:-3]) > 0 else word
    for suffix in ("ed", "ing"):
        stem = word[: len(word) - len(suffix)]
        if word.endswith(suffix) and "v" in _cv(stem):
            break
    else:
        return word
    # Put back an 'e' that -ed / -ing took away, or undouble a consonant (hopp -> hop, but fall and hiss stay).
    if stem.endswith(("at", "bl", "iz")):
        return stem + "e"
    if len(stem) >= 2 and stem[-1] == stem[-2] and _cv(stem)[-1] == "c":
        return stem[:-1] if stem[-1] not in "lsz" else stem
    return stem + "e" if _measure(stem) == 1 and _ends_cvc(stem) else stem


def _step1c(word):
    # NLTK: y -> i after any consonant that is not the whole stem (happy -> happi, cry -> cri, but enjoy, by).
    return word[:-1] + "i" if word.endswith("y") and len(word) > 2 and _cv(word[:-1])[-1] == "c" else word


def _step2(word):
    if word.endswith("alli") and _measure(word[:-4]) > 0:  # NLTK: -alli -> -al, then step 2 again
        return _step2(word[:-2])
    # NLTK measures -logi's stem with the 'l' still on.
    return _apply_rules(word, _STEP2, lambda stem, suffix: _measure(stem + "l" if suffix == "logi" else stem) > 0)


def _step4(word):
    return _apply_rules(word, _STEP4,
                        lambda stem, suffix: _measure(stem) > 1 and (suffix != "ion" or stem[-1] in "st"))


def _step5(word):
    if word.endswith("e"):
        m = _measure(word[:-1])
        if m > 1 or (m == 1 and not _ends_cvc(word[:-1])):
            word = word[:-1]
    if word.endswith("ll") and _measure(word[:-1]) > 1:
        word = word[:-1]
    return word


@functools.lru_cache(maxsize=1 << 20)  # a corpus has few distinct words; each is stemmed once
def porter_stem(word):
    """NLTK's PorterStemmer().stem(word) for a lowercase word."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 2:
        return word
    word = _step2(_step1c(_step1b(_step1a(word))))
    word = _apply_rules(word, _STEP3, lambda stem, suffix: _measure(stem) > 0)
    return _step5(_step4(word))


# ---------------------------------------------------------------------------------------------------------------------
# ROUGE

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def tokenize(text, use_stemmer=False):
    """rouge-score's tokens: lowercased, split at all but [a-z0-9] ("café" -> "caf"), words over 3 letters stemmed."""
    tokens = _NON_ALNUM.sub(" ", text.lower()).split()
    if use_stemmer:
        tokens = [porter_stem(t) if len(t) > 3 else t for t in tokens]
    return tokens  # all match ^[a-z0-9]+$ already, so rouge-score's final filter would drop nothing


def _lcs_length(a, b):
    """Length of the longest common subsequence of two token lists, in O(len(a) * len(b) / wordsize).

    `v` holds one column of the classic DP table (rows: tokens of `a`) as differences: bit i is 0 where the column
    grows by one at row i, so the LCS is the number of zero bits. One addition per token of `b` updates the whole
    column (Hyyro 2004), and Python's big ints make a column any length. Carries above bit len(a) never reach the
    lower bits, hence a single mask at the end."""
    if len(a) < len(b):
        a, b = b, a  # loop over the shorter list
    match = {}
    for i, token in enumerate(a):
        match[token] = match.get(token, 0) | (1 << i)
    mask = (1 << len(a)) - 1
    v = mask
    for token in b:
        u = v & match.get(token, 0)
        v = (v + u) | (v - u)
    return len(a) - (v & mask).bit_count()


def _scores(overlap, n_pred, n_ref):
    # rouge-score's conventions and operation order, so the floats match bit for bit.
    p, r = overlap / max(n_pred, 1), overlap / max(n_ref, 1)
    return p, r, (2 * p * r / (p + r) if p + r > 0 else 0.0)


def rouge(prediction, reference, use_stemmer=False):
    """ROUGE-1, ROUGE-2 and ROUGE-L (precision, recall, F) of one prediction against one reference.

    Identical to rouge_score.rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer).score(reference,
    prediction): precision is over the prediction's tokens, recall over the reference's; an empty side scores 0."""
    pred, ref = tokenize(prediction, use_stemmer), tokenize(reference, use_stemmer)
    unigrams = sum((Counter(pred) & Counter(ref)).values())
    bigrams = sum((Counter(zip(pred, pred[1:])) & Counter(zip(ref, ref[1:]))).values())
    return {
        "rouge1": _scores(unigrams, len(pred), len(ref)),
        "rouge2": _scores(bigrams, len(pred) - 1, len(ref) - 1),  # -1 for an empty side: max(., 1) in _scores
        "rougeL": _scores(_lcs_length(pred, ref) if pred and ref else 0, len(pred), len(ref)),
    }


def corpus_rouge(scores):
    """Corpus ROUGE from per-example rouge() results: the mean F over examples, per ROUGE type.

    MiniLLM and DistiLLM average the same way (their Natural-Instructions scoring script, times 100). rouge-score's
    BootstrapAggregator reports the median of 1,000 bootstrap resample means instead, which is random and can differ
    from the mean in the last digits. math.fsum rounds once, so the result does not depend on the example order."""
    if not scores:
        raise ValueError("corpus_rouge: no scores to average")
    return {key: math.fsum(s[key][2] for s in scores) / len(scores) for key in ("rouge1", "rouge2", "rougeL")}
