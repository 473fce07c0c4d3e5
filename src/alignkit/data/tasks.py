"""Built-in supervised tasks with exact answers.

These are the few-shot abilities the lecture notes call emergent in language
models (GPT-3's arithmetic and word-manipulation tasks, plus a few relatives).
They are synthetic, cheap and checkable by exact match, which makes them the
shipped example data for supervised fine-tuning and for the first evaluation.

Each task is a fixed pool of underlying *items* (a word, an (a, op, b) triple,
a set of numbers). The split of an item is decided by a SHA-256 hash of a
canonical key, so no test item ever appears in train, whatever the seed or n.
The seed only decides which items are drawn, in what order, and per-row details
such as how a word is scrambled.

Completions are the bare answer, no trailing period. Formats worth knowing:
  spelling   letters joined by hyphens      "g-a-r-d-e-n"
  sorting    numbers joined by ", "         "3, 7, 12"
  numbers    plain decimal                  "81"
Answers never depend on letter case, because normalize_answer lowercases.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
import string
from collections import Counter
from importlib import resources

SPLITS = ("train", "test")
TEST_PERCENT = 20  # share of each task's item space held out for test

# -----------------------------------------------------------------------------
# splitting and vocabulary


def _split_of(key: str) -> str:
    # sha256, not hash(): str hashes are salted per process, splits must not be
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "test" if h % 100 < TEST_PERCENT else "train"


@functools.lru_cache(maxsize=None)
def _words() -> tuple[str, ...]:
    """The shipped vocabulary: common lowercase English words, 4-9 letters."""
    text = resources.files("alignkit.data").joinpath("words.txt").read_text(encoding="utf-8")
    return tuple(w for w in (line.strip() for line in text.splitlines()) if w)


def _letters_key(word: str) -> str:
    return "".join(sorted(word))


# -----------------------------------------------------------------------------
# item spaces: each returns [(split_key, item), ...] in a fixed order
#
# All word tasks key on the word alone, so a held-out word is held out of every
# word task: a model never sees it reversed in train and spelled in test.


def _word_items() -> list:
    return [(f"word:{w}", w) for w in _words()]


def _anagram_items() -> list:
    # drop words that share their letters with another list word (below/elbow),
    # so the unscrambled answer is unique; a repeated-letter word could not be
    # scrambled into something different at all
    counts = Counter(_letters_key(w) for w in _words())
    return [(f"word:{w}", w) for w in _words() if counts[_letters_key(w)] == 1 and len(set(w)) > 1]


def _arithmetic_items() -> list:
    items = []
    for a in range(100):
        for b in range(100):
            # a + b and b + a share a key, so the commuted fact can't leak across splits
            items.append((f"add:{min(a, b)},{max(a, b)}", (a, "+", b)))
            if a >= b:  # keep differences non-negative: a simpler target for small models
                items.append((f"sub:{a},{b}", (a, "-", b)))
    return items


def _comparison_items() -> list:
    # both orders of a pair share a key for the same reason as addition
    return [(f"cmp:{min(a, b)},{max(a, b)}", (a, b)) for a in range(100) for b in range(100) if a != b]


def _sorting_items() -> list:
    # the key is the set of numbers: the same numbers shown in another order have
    # the same answer, so they must land in the same split; the seed picks the order
    return [
        (f"sort:{','.join(map(str, nums))}", nums)
        for k in (3, 4, 5)
        for nums in itertools.combinations(range(1, 21), k)
    ]


# -----------------------------------------------------------------------------
# renderers: (item, rng) -> (prompt, completion); one fixed wording per task


def _arithmetic(item, rng):
    a, op, b = item
    return f"What is {a} {op} {b}?", str(a + b if op == "+" else a - b)


def _reversal(word, rng):
    return f"Reverse the letters of the word '{word}'.", word[::-1]


def _spelling(word, rng):
    return f"Spell the word '{word}' letter by letter, with a hyphen between the letters.", "-".join(word)


def _anagram(word, rng):
    letters = list(word)
    while "".join(letters) == word:  # ends: anagram items have >= 2 distinct letters
        rng.shuffle(letters)
    return f"Unscramble the letters '{''.join(letters)}' to form an English word.", word


def _sorting(nums, rng):
    shown = list(nums)
    while shown == sorted(shown):  # an already sorted list would be a copy task
        rng.shuffle(shown)
    return (
        f"Sort these numbers from smallest to largest: {', '.join(map(str, shown))}.",
        ", ".join(map(str, sorted(nums))),
    )


def _counting(word, rng):
    # asking about every letter of every word would make "1" the answer 90% of
    # the time; pick the count first (0, i.e. an absent letter, included), then
    # a letter with that count, so no constant answer scores well
    by_count: dict[int, list[str]] = {}
    for c in string.ascii_lowercase:
        by_count.setdefault(word.count(c), []).append(c)
    letter = rng.choice(by_count[rng.choice(sorted(by_count))])
    return f"How many times does the letter '{letter}' appear in the word '{word}'?", str(word.count(letter))


def _word_length(word, rng):
    return f"How many letters are in the word '{word}'?", str(len(word))


def _comparison(item, rng):
    a, b = item
    return f"Which number is larger, {a} or {b}?", str(max(a, b))


# punctuation only: no letters, digits, spaces or quotes, so deleting every
# symbol recovers the word and the quoted prompt stays unambiguous
_NOISE = ".,;:!?-"


def _random_insertion(word, rng):
    gaps = rng.sample(range(1, len(word)), rng.randint(1, len(word) - 1))
    noisy = "".join((rng.choice(_NOISE) if i in gaps else "") + ch for i, ch in enumerate(word))
    return f"Remove the punctuation marks from '{noisy}' to get an English word.", word


_TASKS = {
    "arithmetic": (_arithmetic_items, _arithmetic),
    "reversal": (_word_items, _reversal),
    "spelling": (_word_items, _spelling),
    "anagram": (_anagram_items, _anagram),
    "sorting": (_sorting_items, _sorting),
    "counting": (_word_items, _counting),
    "word_length": (_word_items, _word_length),
    "comparison": (_comparison_items, _comparison),
    "random_insertion": (_word_items, _random_insertion),
}

TASK_NAMES: tuple[str, ...] = tuple(_TASKS)


@functools.lru_cache(maxsize=None)
def _pools(name: str) -> dict[str, tuple]:
    items_fn, _ = _TASKS[name]
    pools: dict[str, list] = {s: [] for s in SPLITS}
    for key, item in items_fn():
        pools[_split_of(key)].append(item)
    return {s: tuple(p) for s, p in pools.items()}


# -----------------------------------------------------------------------------
# public API


def make_task(name: str, split: str, n: int, seed: int = 0) -> list[dict]:
    """Generate n distinct rows of one task.

    Returns [{"prompt": str, "completion": str, "task": name}, ...]. The same
    (name, split, n, seed) always gives the same rows, and the first k rows do
    not depend on n. Raises ValueError for an unknown name or split, or when n
    exceeds the number of distinct items in that split (rows are never repeated).
    """
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; valid names: {', '.join(TASK_NAMES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pool = _pools(name)[split]
    if n > len(pool):
        raise ValueError(f"task {name!r} has only {len(pool)} distinct {split} items, asked for n={n}")
    # random.Random hashes a str seed with sha512, so this is stable across
    # processes; the task name in it keeps word tasks from drawing the same words
    rng = random.Random(f"{name}:{split}:{seed}")
    order = list(range(len(pool)))
    rng.shuffle(order)
    _, render = _TASKS[name]
    rows = []
    for i in order[:n]:  # rendered in draw order, so row k sees the same rng state for any n
        prompt, completion = render(pool[i], rng)
        rows.append({"prompt": prompt, "completion": completion, "task": name})
    return rows


def make_mixture(names: list[str] | tuple[str, ...], split: str, n_per_task: int, seed: int = 0) -> list[dict]:
    """n_per_task rows of each named task, concatenated and shuffled deterministically by seed."""
    if isinstance(names, str):
        raise TypeError(f"names must be a list or tuple of task names, got the string {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate task names in {list(names)}; each task would repeat its rows")
    rows = [row for name in names for row in make_task(name, split, n_per_task, seed)]
    random.Random(f"mixture:{split}:{seed}").shuffle(rows)
    return rows


def _wrong_answer(row: dict, others: list[dict]) -> str:
    if row["task"] == "comparison":  # the tempting mistake: the other number
        first, second = (n.strip(" ?.") for n in row["prompt"].split(",")[1].replace(" or ", ",").split(",")[-2:])
        return first if row["completion"] == second else second
    return next(o["completion"] for o in others if o["completion"] != row["completion"])


def make_preferences(name: str, split: str, n: int, seed: int = 0) -> list[dict]:
    """n preference pairs from a task: {"prompt", "chosen": right answer, "rejected": a wrong one, "task"}.

    For `comparison` the rejected answer is the smaller number (right format, wrong choice), elsewhere
    the answer of another item of the same task. Built-in data for reward models and DPO.
    """
    rows = make_task(name, split, n, seed)
    pairs = []
    for index, row in enumerate(rows):
        others = rows[index + 1 :] + rows[:index]
        pairs.append({"prompt": row["prompt"], "chosen": row["completion"], "rejected": _wrong_answer(row, others), "task": name})
    return pairs


_QUOTES = [('"', '"'), ("'", "'"), ("`", "`"), ("\u201c", "\u201d"), ("\u2018", "\u2019")]


def normalize_answer(text: str) -> str:
    """Lowercase, collapse whitespace, strip surrounding quotes and a trailing period.

    Quotes and the period are peeled repeatedly, so '"Garden".' and "'garden.'"
    both become "garden".
    """
    text = " ".join(text.split()).lower()
    prev = None
    while text != prev:
        prev = text
        text = text.strip()
        if text.endswith("."):
            text = text[:-1]
        for left, right in _QUOTES:
            if len(text) >= 2 and text.startswith(left) and text.endswith(right):
                text = text[1:-1]
    return text


def exact_match(prediction: str, reference: str) -> bool:
    """True if prediction equals reference after normalize_answer.

    Also true when only the prediction's first non-empty line matches: models
    often answer and then keep talking on the next line.
    """
    ref = normalize_answer(reference)
    if normalize_answer(prediction) == ref:
        return True
    lines = prediction.strip().splitlines()
    return bool(lines) and normalize_answer(lines[0]) == ref
