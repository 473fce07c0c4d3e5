"""Tests for alignkit.data.tasks: determinism, split hygiene, answer correctness."""

import re
import sys
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

try:
    import alignkit.data.tasks  # noqa: F401
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from alignkit.data.tasks import (  # noqa: E402
    TASK_NAMES,
    exact_match,
    make_mixture,
    make_task,
    normalize_answer,
)

WORDS = resources.files("alignkit.data").joinpath("words.txt").read_text(encoding="utf-8").split()
WORD_SET = set(WORDS)
WORD_TASKS = ("reversal", "spelling", "anagram", "counting", "word_length", "random_insertion")


def available(name, split):
    """Split size, read from the error make_task raises when asked for too much."""
    with pytest.raises(ValueError) as err:
        make_task(name, split, 10**9)
    return int(re.search(r"has only (\d+)", str(err.value)).group(1))


def quoted(prompt):
    return re.findall(r"'([^']*)'", prompt)


def solve(row):
    """Recompute the answer from the prompt alone, independently of the generator.

    Returns (answer, item_key); the key identifies the underlying item so that
    splits can be compared regardless of how the item was presented.
    """
    p, task = row["prompt"], row["task"]
    if task == "arithmetic":
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", p).groups()
        a, b = int(a), int(b)
        return str(a + b if op == "+" else a - b), (op, frozenset((a, b)) if op == "+" else (a, b))
    if task == "reversal":
        (w,) = quoted(p)
        return "".join(reversed(list(w))), w
    if task == "spelling":
        (w,) = quoted(p)
        return "-".join(list(w)), w
    if task == "anagram":
        (scrambled,) = quoted(p)
        matches = [w for w in WORDS if sorted(w) == sorted(scrambled)]
        assert len(matches) == 1, (scrambled, matches)  # uniquely recoverable
        assert scrambled != matches[0]
        return matches[0], matches[0]
    if task == "sorting":
        nums = [int(x) for x in p.split(":")[1].rstrip(".").split(",")]
        assert nums != sorted(nums)
        return ", ".join(str(x) for x in sorted(nums)), frozenset(nums)
    if task == "counting":
        letter, w = quoted(p)
        return str(sum(1 for c in w if c == letter)), w
    if task == "word_length":
        (w,) = quoted(p)
        return str(len(w)), w
    if task == "comparison":
        a, b = map(int, re.fullmatch(r"Which number is larger, (\d+) or (\d+)\?", p).groups())
        assert a != b
        return str(a if a > b else b), frozenset((a, b))
    if task == "random_insertion":
        (noisy,) = quoted(p)
        w = re.sub(r"[^a-z]", "", noisy)
        assert noisy != w
        return w, w
    raise AssertionError(f"no solver for {task}")


@pytest.fixture(scope="module")
def full_splits():
    """Every row of every task and split: the largest n each split allows."""
    return {(name, split): make_task(name, split, available(name, split), seed=0)
            for name in TASK_NAMES for split in ("train", "test")}


def test_word_list():
    assert 400 <= len(WORDS) <= 600
    assert len(WORD_SET) == len(WORDS)
    assert all(re.fullmatch(r"[a-z]{4,9}", w) for w in WORDS)


def test_task_names():
    required = {"arithmetic", "reversal", "spelling", "anagram", "sorting", "counting"}
    assert required <= set(TASK_NAMES)
    assert len(TASK_NAMES) >= 7


@pytest.mark.parametrize("name", TASK_NAMES)
def test_determinism(name):
    a = make_task(name, "train", 50, seed=3)
    assert a == make_task(name, "train", 50, seed=3)
    assert a != make_task(name, "train", 50, seed=4)
    assert make_task(name, "train", 20, seed=3) == a[:20]  # prefix does not depend on n
    assert all(set(r) == {"prompt", "completion", "task"} and r["task"] == name for r in a)


def test_answers_correct_and_rows_distinct(full_splits):
    for (name, split), rows in full_splits.items():
        assert len({r["prompt"] for r in rows}) == len(rows), (name, split)
        for r in rows:
            answer, _ = solve(r)
            assert r["completion"] == answer, r
            assert exact_match(r["completion"], r["completion"])


def test_splits_disjoint(full_splits):
    for name in TASK_NAMES:
        train = {solve(r)[1] for r in full_splits[name, "train"]}
        test = {solve(r)[1] for r in full_splits[name, "test"]}
        assert train and test and not (train & test), name
        assert 0.12 < len(test) / (len(train) + len(test)) < 0.28, name
    # word tasks share one word-level split: a test word is unseen by every word task
    train_words = {solve(r)[1] for t in WORD_TASKS for r in full_splits[t, "train"]}
    test_words = {solve(r)[1] for t in WORD_TASKS for r in full_splits[t, "test"]}
    assert not (train_words & test_words)
    assert train_words | test_words == WORD_SET


def test_splits_disjoint_across_seeds():
    for name in TASK_NAMES:
        test = {solve(r)[1] for seed in range(3) for r in make_task(name, "test", 100, seed)}
        train = {solve(r)[1] for seed in range(3) for r in make_task(name, "train", 100, seed)}
        assert not (train & test), name


def test_answers_not_degenerate(full_splits):
    # a model answering one constant string must not score well on any task
    for (name, split), rows in full_splits.items():
        top = Counter(r["completion"] for r in rows).most_common(1)[0][1]
        assert top / len(rows) < 0.6, (name, split)
    counts = Counter(r["completion"] for r in full_splits["counting", "train"])
    assert {"0", "1", "2"} <= set(counts)


def test_anagram_excludes_ambiguous_words(full_splits):
    used = {r["completion"] for s in ("train", "test") for r in full_splits["anagram", s]}
    letters = Counter("".join(sorted(w)) for w in WORDS)
    ambiguous = {w for w in WORDS if letters["".join(sorted(w))] > 1}
    assert ambiguous, "word list should contain some anagram pairs to exercise the filter"
    assert not (used & ambiguous)
    assert used == WORD_SET - ambiguous


def test_mixture():
    names = ["arithmetic", "reversal", "sorting"]
    rows = make_mixture(names, "test", 10, seed=1)
    assert len(rows) == 30
    assert Counter(r["task"] for r in rows) == {n: 10 for n in names}
    assert rows == make_mixture(names, "test", 10, seed=1)
    assert rows != make_mixture(names, "test", 10, seed=2)
    assert [r["task"] for r in rows] != sorted(r["task"] for r in rows)  # actually shuffled
    grouped = [r for n in names for r in make_task(n, "test", 10, seed=1)]
    assert sorted(map(str, rows)) == sorted(map(str, grouped))
    with pytest.raises(ValueError, match="duplicate"):
        make_mixture(["reversal", "reversal"], "train", 5)


def test_errors():
    with pytest.raises(ValueError, match="unknown task 'nope'.*arithmetic.*reversal"):
        make_task("nope", "train", 5)
    with pytest.raises(ValueError, match="unknown split 'valid'.*train.*test"):
        make_task("reversal", "valid", 5)
    n = available("reversal", "test")
    assert len(make_task("reversal", "test", n)) == n
    with pytest.raises(ValueError, match=f"has only {n} distinct test items"):
        make_task("reversal", "test", n + 1)
    with pytest.raises(ValueError):
        make_task("reversal", "test", -1)
    assert make_task("reversal", "test", 0) == []


@pytest.mark.parametrize("prediction, reference", [
    ("81", "81"),
    ("  81.  ", "81"),
    ("Garden", "garden"),
    ('"garden"', "garden"),
    ("'garden.'", "garden"),
    ('"Garden".', "garden"),
    ("\u201cgarden\u201d", "garden"),
    ("3,  7,\n12", "3, 7, 12"),
    ("G-A-R-D-E-N", "g-a-r-d-e-n"),
    ("81\nBecause 23 + 58 = 81.", "81"),
    ("\n\nnedrag\nThat is the word reversed.", "nedrag"),
])
def test_exact_match_true(prediction, reference):
    assert exact_match(prediction, reference)


@pytest.mark.parametrize("prediction, reference", [
    ("80", "81"),
    ("The answer is 81.", "81"),
    ("garden", "nedrag"),
    ("3, 7, 12", "3,7,12"),
    ("g a r d e n", "g-a-r-d-e-n"),
    ("", "81"),
    ("811", "81"),
    ("Sure!\n81", "81"),
])
def test_exact_match_false(prediction, reference):
    assert not exact_match(prediction, reference)


def test_normalize_answer():
    assert normalize_answer("  Hello   World.  ") == "hello world"
    assert normalize_answer("'x'") == "x"
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer("") == ""
