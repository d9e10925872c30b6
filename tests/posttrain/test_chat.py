"""ERNIE 4.5's chat format: the template's text (rendered by transformers' chat-template renderer), the ids
decoding back to it, the loss mask on the assistant contents and their eos only, and the format's errors."""

import numpy as np
import pytest

from ernie_jax.data import SentencePieceTokenizer, train_sentencepiece
from ernie_jax.posttrain import chat
from ernie_jax.synthetic import text as synthetic


def _u(c):
    return {"role": "user", "content": c}


def _a(c):
    return {"role": "assistant", "content": c}


SYSTEM = {"role": "system", "content": "You are a terse calculator."}
TRAINING = [
    [_u("12+34="), _a("46")],
    [SYSTEM, _u("12+34="), _a("46"), _u("reverse abc ="), _a("cba"), _u("Ada has 3 apples. Ada gets 4 more. "
                                                                         "Now Ada has"), _a("7 apples.")],
    [_u("sort 312 ="), _a("123"), _u("count a in abca ="), _a("2")],
]
PROMPTS = [[_u("after 9 comes")], [SYSTEM, _u("12+34="), _a("46"), _u("sort 312 =")]]


def oracle(messages, add_generation_prompt):
    """The verbatim template rendered as transformers' `apply_chat_template` renders it."""
    templates = pytest.importorskip("transformers.utils.chat_template_utils")
    rendered, _ = templates.render_jinja_template([messages], chat_template=chat.ERNIE_CHAT_TEMPLATE,
                                                  add_generation_prompt=add_generation_prompt)
    return rendered[0]


@pytest.fixture(scope="module")
def tiny_tok():
    """The embedded tokenizer (vocab 512): it has no pieces for "U", ":" or "\\n", which encode to <unk>."""
    return SentencePieceTokenizer(str(synthetic.ensure_default_data()["tokenizer"]))


@pytest.fixture(scope="module")
def full_tok(tmp_path_factory):
    """A tokenizer that covers every character of the conversations ("\\n" as a piece of its own)."""
    d = tmp_path_factory.mktemp("chat_tok")
    lines = [m["content"] for c in TRAINING + PROMPTS for m in c] + ["User: Assistant:"]
    (d / "corpus.txt").write_text("\n".join(lines * 20) + "\n")
    return SentencePieceTokenizer(train_sentencepiece(str(d / "corpus.txt"), str(d / "spm"), 120,
                                                      user_defined_symbols=("\n",)))


def decode_with_markers(tok, ids):
    """The ids' text, bos / eos written as the template's markers (each run between them decoded alone)."""
    out, run = "", []
    for i in [int(i) for i in ids] + [None]:
        if i in (tok.bos_id, tok.eos_id, None):
            out += tok.decode(run) + {tok.bos_id: "<|begin_of_sentence|>", tok.eos_id: "<|end_of_sentence|>",
                                      None: ""}[i]
            run = []
        else:
            run.append(i)
    return out


def test_template_text():
    assert oracle(TRAINING[1][:3], False) == ("<|begin_of_sentence|>You are a terse calculator.\nUser: 12+34=\n"
                                              "Assistant: 46<|end_of_sentence|>")
    assert oracle(PROMPTS[0], True) == "<|begin_of_sentence|>User: after 9 comes\nAssistant: "
    for messages in TRAINING:
        assert chat.render_text(messages) == oracle(messages, False)
    for messages in PROMPTS:
        assert chat.render_text(messages, add_generation_prompt=True) == oracle(messages, True)


def test_ids_decode_to_the_template_text(full_tok):
    for messages in TRAINING:
        r = chat.render(messages, full_tok)
        assert r.ids.dtype == np.int32 and r.ids.shape == r.loss_mask.shape and full_tok.unk_id not in r.ids
        assert decode_with_markers(full_tok, r.ids) == oracle(messages, False)
    for messages in PROMPTS:  # the template's trailing space is the first generated token's word marker
        text = oracle(messages, True)
        assert text.endswith("Assistant: ")
        assert decode_with_markers(full_tok, chat.prompt(messages, full_tok)) == text[:-1]


@pytest.mark.parametrize("tok_name", ["tiny_tok", "full_tok"])
def test_loss_mask_is_assistant_contents_and_their_eos(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    for messages in TRAINING:
        r = chat.render(messages, tok)
        assert r.ids[0] == tok.bos_id and r.loss_mask[0] == 0
        expected = [i for m in messages if m["role"] == "assistant" for i in [*tok.encode(m["content"]), tok.eos_id]]
        assert r.ids[r.loss_mask == 1].tolist() == expected
        assert set(np.unique(r.loss_mask).tolist()) == {0, 1}
        # the masked positions are exactly [prompt end, end of turn) of each assistant turn, from prefixes
        want = np.zeros(len(r.ids), np.int32)
        for k, m in enumerate(messages):
            if m["role"] == "assistant":
                start, end = len(chat.prompt(messages[:k], tok)), len(chat.render(messages[:k + 1], tok).ids)
                assert np.array_equal(chat.render(messages[:k + 1], tok).ids, r.ids[:end])
                assert r.ids[end - 1] == tok.eos_id
                want[start:end] = 1
        assert np.array_equal(r.loss_mask, want)


def test_loss_mask_spans_decode_to_the_answers(full_tok):
    r = chat.render(TRAINING[1], full_tok)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], r.loss_mask, [0]])))
    spans = [r.ids[s:e] for s, e in zip(edges[::2], edges[1::2])]
    assert [full_tok.decode(s[:-1]) for s in spans] == ["46", "cba", "7 apples."]
    assert all(s[-1] == full_tok.eos_id for s in spans)
    for s in edges[::2]:  # the "Assistant:" prefix stays unmasked, just before each answer
        assert full_tok.decode(r.ids[:s]).endswith("\nAssistant:")


def test_prompt_is_the_prefix_the_engine_continues(tiny_tok):
    conv = TRAINING[0]
    p, r = chat.prompt(conv[:1], tiny_tok), chat.render(conv, tiny_tok)
    assert np.array_equal(r.ids[:len(p)], p) and not r.loss_mask[:len(p)].any() and r.loss_mask[len(p):].all()
    assert r.ids[len(p):].tolist() == [*tiny_tok.encode("46"), tiny_tok.eos_id]
    assert chat.prompt(conv[:1], tiny_tok).tolist() == p.tolist()


@pytest.mark.parametrize("messages, gen, match", [
    ([], False, "a conversation is a non-empty list of messages"),
    ([_u("1+1="), "2"], False, r"turn 1: a message is a dict with 'role' and 'content'"),
    ([_u("1+1="), {"role": "assistant"}], False, "turn 1: a message is a dict"),
    ([_u("1+1="), {"role": "tool", "content": "2"}], False, r"turn 1 \(tool\): unknown role"),
    ([_u("1+1="), _u("2+2="), _a("4")], False, r"turn 1 \(user\): roles must alternate"),
    ([_a("2")], False, r"turn 0 \(assistant\): roles must alternate"),
    ([SYSTEM, _a("2")], False, r"turn 1 \(assistant\): roles must alternate"),
    ([_u("1+1="), _a("2"), _a("3")], False, r"turn 2 \(assistant\): roles must alternate"),
    ([_u("1+1="), SYSTEM, _a("2")], False, r"turn 1 \(system\): a system message may only be the first"),
    ([SYSTEM, SYSTEM, _u("1+1="), _a("2")], False, r"turn 1 \(system\): a system message may only be the first"),
    ([_u("1+1="), _a("")], False, r"turn 1 \(assistant\): empty assistant content"),
    ([_u("1+1="), _a(" \n ")], False, r"turn 1 \(assistant\): empty assistant content"),
    ([_u("1+1="), _a(2)], False, r"turn 1 \(assistant\): content must be a str, got int"),
    ([_u(None), _a("2")], False, r"turn 0 \(user\): content must be a str, got NoneType"),
    ([_u("1+1=")], False, r"turn 0 \(user\): a training conversation must end with an assistant turn"),
    ([SYSTEM], False, r"turn 0 \(system\): a training conversation must end with an assistant turn"),
    ([_u("1+1="), _a("2")], True, r"turn 1 \(assistant\): a prompt \(add_generation_prompt\) must end with a user"),
])
def test_format_errors(messages, gen, match, tiny_tok):
    with pytest.raises(chat.ChatFormatError, match="^chat: " + match):
        chat.render(messages, tiny_tok, add_generation_prompt=gen)
    with pytest.raises(ValueError, match="^chat example 7: " + match):
        chat.render(messages, tiny_tok, add_generation_prompt=gen, index=7)
    with pytest.raises(chat.ChatFormatError, match=match):
        chat.render_text(messages, add_generation_prompt=gen)


def test_check_pair():
    good = {"chosen": [SYSTEM, _u("1+1="), _a("2")], "rejected": [SYSTEM, _u("1+1="), _a("3")]}
    chat.check_pair(good)
    bad = [
        ({"chosen": good["chosen"]}, "a dict with 'chosen' and 'rejected'"),
        ({"chosen": [_u("1+1="), _a("2")], "rejected": [_u("1+2="), _a("3")]},
         "chosen and rejected have different prompts"),
        ({"chosen": good["chosen"], "rejected": [_u("1+1="), _a("3")]}, "chosen and rejected have different prompts"),
        ({"chosen": good["chosen"], "rejected": [SYSTEM, _u("1+1="), _a(" ")]},
         r"rejected: turn 2 \(assistant\): empty assistant content"),
        ({"chosen": [SYSTEM, _u("1+1=")], "rejected": good["rejected"]},
         r"chosen: turn 1 \(user\): a training conversation must end with an assistant turn"),
        ({"chosen": good["chosen"], "rejected": [SYSTEM, _u("1+1="), _a("2 ")]},
         "chosen and rejected give the same answer"),
    ]
    for pair, match in bad:
        with pytest.raises(chat.ChatFormatError, match="^preference pair 3: " + match):
            chat.check_pair(pair, index=3)
