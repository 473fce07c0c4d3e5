import pytest

from alignkit.data.tokenize import Formatting, pack, prompt_text, tokenize_all, tokenize_example

PAIR = {"messages": [{"role": "user", "content": "Reverse 'cat'."}, {"role": "assistant", "content": "tac"}]}


def weighted_text(tokenizer, ids, weights, value=1.0):
    return tokenizer.decode([t for t, w in zip(ids, weights) if w == value])


def test_chat_template_trains_only_the_answer_and_its_end_token(tokenizer):
    ids, weights = tokenize_example(PAIR, tokenizer, Formatting(prompt_loss_weight=0.0))
    assert weighted_text(tokenizer, ids, weights) == "tac<|im_end|>\n"
    assert tokenizer.eos_token_id in [t for t, w in zip(ids, weights) if w == 1.0]  # pad == eos, still trained
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert weights[0] == 0.0
    # the prompt part is exactly what inference feeds the model
    prompt = prompt_text(tokenizer, PAIR["messages"][:1], Formatting())
    n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert ids[:n] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert all(w == 0.0 for w in weights[:n]) and all(w == 1.0 for w in weights[n:])


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_prompt_loss_weight_applies_to_every_prompt_token(tokenizer, weight):
    ids, weights = tokenize_example(PAIR, tokenizer, Formatting(prompt_loss_weight=weight))
    prompt = prompt_text(tokenizer, PAIR["messages"][:1], Formatting())
    n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert weights[1:n] == [weight] * (n - 1)
    assert weights[n:] == [1.0] * (len(ids) - n)


def test_separator_format_is_prompt_separator_completion_eos(tokenizer):
    fmt = Formatting(use_chat_template="no", separator=" => ")
    ids, weights = tokenize_example(PAIR, tokenizer, fmt)
    assert tokenizer.decode(ids) == "Reverse 'cat'. => tac<|im_end|>"
    assert weighted_text(tokenizer, ids, weights) == "tac<|im_end|>"
    assert ids[-1] == tokenizer.eos_token_id


def test_multi_turn_trains_every_assistant_turn(tokenizer):
    chat = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye!"},
    ]}
    ids, weights = tokenize_example(chat, tokenizer, Formatting())
    assert weighted_text(tokenizer, ids, weights) == "Hello!<|im_end|>\nGoodbye!<|im_end|>\n"
    assert "Be brief." in tokenizer.decode(ids) and "Bye" not in weighted_text(tokenizer, ids, weights)


def test_plain_text_trains_every_token_but_the_first(tokenizer):
    ids, weights = tokenize_example({"text": "the cat sat"}, tokenizer, Formatting())
    assert ids[-1] == tokenizer.eos_token_id
    assert weights == [0.0] + [1.0] * (len(ids) - 1)


def test_truncation_modes_are_counted(tokenizer):
    long = {"messages": [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok"}]}
    examples = [PAIR, long, long]
    dropped = tokenize_all(examples, tokenizer, Formatting(), max_length=40, truncation="drop")
    assert len(dropped.input_ids) == 1 and sum(dropped.dropped.values()) == 2 and dropped.truncated == 0
    left = tokenize_all(examples, tokenizer, Formatting(), max_length=40, truncation="left")
    assert left.truncated == 2 and all(len(i) <= 40 for i in left.input_ids)
    assert tokenizer.decode(left.input_ids[1]).endswith("ok<|im_end|>\n")
    right = tokenize_all(examples, tokenizer, Formatting(), max_length=40, truncation="right")
    # the right cut removes the whole answer: such examples are dropped, and counted
    assert right.truncated == 2 and sum(right.dropped.values()) == 2 and len(right.input_ids) == 1
    with pytest.raises(ValueError, match="truncation"):
        tokenize_all(examples, tokenizer, Formatting(), max_length=40, truncation="middle")


def test_best_fit_decreasing_packing():
    lengths = [7, 5, 4, 3, 3, 2, 1]
    bins = pack(lengths, capacity=8)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 8 for b in bins)
    assert len(bins) == 4  # 25 tokens need at least 4 bins of 8
