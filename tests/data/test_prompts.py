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


def test_extractive_ts_target_is_the_best_sentence_the_model_sees():
    """The oracle (ROUGE-1 + ROUGE-2 F) is taken over the sentences whose start fits in ``max_seq_len``; the best
    sentence of the whole document (here the third) is no target when the model cannot see it."""
    doc = "The cat sat down. Rain fell all day. The cat sat on the mat."
    ex = TSExample("x2", doc, "The cat sat on the mat.")
    tok = ByteTokenizer()
    # bytes: [CLS] + 17 + [SEP] = 19 → 2nd sentence starts at 19; the 3rd would start at 38
    cut = collate("encoder", get_task("ts"), [ex], tok, 30, 16)
    assert cut["sentence_positions"][0].tolist() == [1, 19]
    assert cut["sentences"][0] == ["The cat sat down.", "Rain fell all day."]
    assert cut["labels"].tolist() == [0]  # shares "the cat", "cat sat"; the 2nd shares nothing
    whole = collate("encoder", get_task("ts"), [ex], tok, 128, 16)
    assert whole["sentence_positions"][0].tolist() == [1, 19, 38]
    assert whole["labels"].tolist() == [2]


def test_extractive_ts_target_breaks_a_no_bigram_tie_by_shared_words():
    """No sentence shares a bigram with the summary (a third of XSum's documents in their first
    96 tokens): the target is the one sharing words (ROUGE-1), not sentence 0 by the tie."""
    ex = TSExample("x3", "The cat sat down. Heavy rain fell.", "Rain clouds gathered.")
    batch = collate("encoder", get_task("ts"), [ex], ByteTokenizer(), 128, 16)
    assert batch["labels"].tolist() == [1]
