"""Decoder-only prompts: chat template when there is one, answer cue, only the body truncated (issue 14)."""

from __future__ import annotations

from fedmoe.data.examples import RCExample, TCExample, TSExample
from fedmoe.data.tasks import get_task
from fedmoe.train.batching import IGNORE, causal_prompt, collate
from fedmoe.train.tokenizer import ByteTokenizer, char_wordpiece_tokenizer

QUESTION = "Where did the treaty get signed?"
RC = RCExample("q1", "t", "word " * 400 + "Paris.", QUESTION, ("Paris",), (2000,))
TC = TCExample("a1", "Stocks rally", "Markets rose " * 50, 2, "Business")
TS = TSExample("x1", "Sentence one. " * 80, "A summary.")


def _text(ids):
    return ByteTokenizer().decode(ids)


def test_plain_prompt_keeps_question_and_cue_when_context_is_cut():
    tok = ByteTokenizer()
    ids = causal_prompt(get_task("rc"), RC, tok, 160)
    text = _text(ids)
    assert len(ids) == 160  # the window is full: the body took exactly the room left
    assert text.startswith("Answer the question with a short span copied from the passage.\n\nPassage: word word")
    assert text.endswith(f"word \n\nQuestion: {QUESTION}\nAnswer:")
    short = causal_prompt(get_task("rc"), RCExample("q2", "t", "Paris.", QUESTION, ("Paris",), (0,)), tok, 500)
    assert _text(short) == ("Answer the question with a short span copied from the passage.\n\n"
                            f"Passage: Paris.\n\nQuestion: {QUESTION}\nAnswer:")


def test_cues_and_instructions_per_task():
    tok = ByteTokenizer()
    tc_ids = causal_prompt(get_task("tc"), TC, tok, 150)
    tc = _text(tc_ids)
    assert len(tc_ids) == 150
    assert tc.startswith("What is the topic of this news article? Answer with one of: World, Sports, Business, "
                         "Sci/Tech.\n\nArticle: Stocks rally Markets rose")
    assert tc.endswith("\nTopic:") and "Markets rose" in tc
    ts = _text(causal_prompt(get_task("ts"), TS, tok, 90))
    assert ts.startswith("Summarize the article in one sentence.\n\nArticle: Sentence one.") and ts.endswith("\nSummary:")
    tiny = causal_prompt(get_task("rc"), RC, tok, 10)  # not even the question fits: keep the end (the cue)
    assert _text(tiny).endswith("\nAnswer:") and len(tiny) == 10


def test_chat_template_is_used_when_the_tokenizer_has_one():
    tok = char_wordpiece_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </{{ m['role'] }}> {% endfor %}"
                         "{% if add_generation_prompt %}<assistant> {% endif %}")
    ids = causal_prompt(get_task("rc"), RC, tok, 150)
    text = tok.decode(ids)
    assert len(ids) == 150
    assert text.startswith("< user > answer the question")
    assert text.endswith("? < / user > < assistant > answer :")  # the cue opens the assistant turn
    assert "where did the treaty get signed" in text


def test_collate_puts_the_loss_on_the_answer_only():
    tok = ByteTokenizer()
    batch = collate("causal", get_task("tc"), [TC], tok, 160, 16)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    n_prompt = labels.index(next(v for v in labels if v != IGNORE))
    assert _text(ids[:n_prompt]).endswith("\nTopic:")
    assert _text([v for v in labels if v != IGNORE]) == " Business"
    assert len(ids) == 160
