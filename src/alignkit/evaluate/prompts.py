"""k-shot prompts: exemplar choice, the text a model reads, and how it is put to a chat model.

A k-shot item is k solved exemplars (prompt, answer) and one query prompt. Its text, as in GPT-3:

    ex_1.prompt + cue + joiner + ex_1.answer + delimiter + … + ex_k … + delimiter + query.prompt + cue

The built-in tasks use cue "\\nAnswer:", joiner " " and delimiter "\\n\\n" at every k (the same frame at
k = 0 too, so only the number of shots changes between k); multiturn framing drops the cue. Flan template
sets use the rendering of `alignkit.data.flan.few_shot` (answer separator "\\n", no cue; see `suites.py`).

How the model sees it (`Framing`):
  chat        the whole k-shot text is one user turn of the chat template; the answer is the assistant turn
  multiturn   each exemplar is a user turn plus an assistant turn, the query the last user turn
  plain       the raw text, continued by the model (base models): the answer starts after the joiner
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from alignkit.data.tokenize import wants_chat_template

DELIMITER = "\n\n"
JOINER = " "
ANSWER_CUE = "Answer:"
FRAMINGS = ("auto", "chat", "multiturn", "plain")


@dataclass
class Shot:
    prompt: str
    answer: str


@dataclass
class KShotItem:
    shots: list[Shot]
    query: str
    joiner: str = JOINER
    delimiter: str = DELIMITER
    cue: str = ""  # ends every prompt in the text framings ("\nAnswer:"); chat turns do without it

    def text(self) -> str:
        blocks = [s.prompt + self.cue + self.joiner + s.answer for s in self.shots] + [self.query + self.cue]
        return self.delimiter.join(blocks)


def exemplar_order(pool_size: int, seed: int) -> list[int]:
    """A seeded permutation of the training pool; the first k are the k-shot exemplars, so the 1-shot
    exemplar is also the first of the 5-shot ones (shot counts differ only in k, not in which examples)."""
    order = list(range(pool_size))
    random.Random(f"exemplars:{seed}").shuffle(order)
    return order


def builtin_item(exemplars: Sequence[dict], row: dict) -> KShotItem:
    """A built-in task row (prompt/completion) with its exemplars, in the built-in frame."""
    return KShotItem([Shot(e["prompt"], e["completion"]) for e in exemplars], row["prompt"], cue="\n" + ANSWER_CUE)


def resolve_framing(tokenizer, framing: str) -> str:
    """auto -> chat when the tokenizer has a chat template, else plain."""
    if framing not in FRAMINGS:
        raise ValueError(f"--framing must be one of {', '.join(FRAMINGS)}, got {framing!r}")
    if framing == "auto":
        return "chat" if wants_chat_template(tokenizer, "auto") else "plain"
    if framing in ("chat", "multiturn") and not tokenizer.chat_template:
        raise ValueError(f"--framing {framing} needs a chat template and this tokenizer has none; use --framing plain")
    return framing


def model_context(tokenizer, item: KShotItem, framing: str, system: str = "") -> tuple[str, str]:
    """(the exact text before the answer, the text the answer starts with inside the model's output).

    The second part is the joiner in plain framing (the answer continues the text: " positive") and empty
    in chat framings (the assistant turn starts with the answer itself); a joiner that is a line break ends
    the context instead."""
    head = [{"role": "system", "content": system}] if system else []
    if framing == "plain":
        text = (system + DELIMITER if system else "") + item.text()
        if item.joiner.strip() == "" and "\n" in item.joiner:
            # a line break never merges with the answer's first token: keep it in the context, so one-token
            # answers stay one token (and share the context's forward pass when ranking options)
            return text + item.joiner, ""
        return text, item.joiner
    if framing == "chat":
        messages = head + [{"role": "user", "content": item.text()}]
    elif framing == "multiturn":
        messages = list(head)
        for shot in item.shots:
            messages += [{"role": "user", "content": shot.prompt}, {"role": "assistant", "content": shot.answer}]
        messages.append({"role": "user", "content": item.query})
    else:
        raise ValueError(f"unknown framing {framing!r}; resolve 'auto' with resolve_framing first")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), ""


def extract_answer(generated: str, framing: str) -> str:
    """The answer part of a generation: up to the next exemplar delimiter (plain framing keeps writing
    exemplars), without a repeated answer cue ("Answer: 7" -> "7")."""
    text = generated.lstrip().split(DELIMITER)[0].strip() if framing == "plain" else generated.strip()
    if text.lower().startswith(ANSWER_CUE.lower()):
        text = text[len(ANSWER_CUE) :].strip()
    return text
