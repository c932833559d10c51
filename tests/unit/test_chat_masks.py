"""Assistant masks from templates without `{% generation %}` blocks: the stand-ins' published
templates (Llama-3, Qwen2.5, Mistral, Gemma-2, Phi-3) and raylm's default (GPT-2 has none)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub_standins import FAMILIES
from raylm.data.chat import GENERATION_BLOCK, RenderError, check_template, render
from raylm.data.sources import DataError

CHAT = [f for f in FAMILIES if FAMILIES[f].template]


@pytest.fixture(scope="module")
def tokenizers(hub_standins):
    from raylm.data import load_tokenizer

    return {f: load_tokenizer(repo) for f, repo in hub_standins.items()}


def expected_mask(tok, messages, eot, from_turn=0):
    """By hand: each assistant turn's content (trimmed, as Llama's and Gemma's templates trim it)
    and its end-of-turn token, from the first token after the text of the conversation before it
    with the generation prompt."""
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    enc = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == ids
    mask = np.zeros(len(ids), bool)
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < from_turn:
            continue
        prompt = len(tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        at = next(k for k, (start, _) in enumerate(enc["offset_mapping"]) if start >= prompt)
        want = tok(m["content"].strip(), add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids(eot)]
        assert ids[at:at + len(want)] == want, f"turn {i}: not its content and end-of-turn token"
        mask[at:at + len(want)] = True
    return np.asarray(ids), mask


@pytest.mark.parametrize("family", CHAT)
def test_mask_is_content_plus_end_of_turn(tokenizers, family):
    tok, eot = tokenizers[family], FAMILIES[family].end_of_turn
    assert not GENERATION_BLOCK.search(tok.chat_template)
    messages = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "The sum is 5."},
                {"role": "user", "content": "Now times 2?"}, {"role": "assistant", "content": "That gives 10."}]
    ids, mask = render(tok, messages, "assistant")
    want_ids, want = expected_mask(tok, messages, eot)
    assert ids.tolist() == want_ids.tolist()  # the same ids apply_chat_template gives
    assert mask.tolist() == want.tolist(), tok.convert_ids_to_tokens(ids[mask].tolist())
    # DPO: only the turns after the prompt
    _, answer_only = render(tok, messages, "assistant", from_turn=3)
    assert answer_only.tolist() == expected_mask(tok, messages, eot, from_turn=3)[1].tolist()


def test_default_template_masks_alike_both_ways(tokenizers):
    """GPT-2 has no template: raylm's default (with generation blocks) is attached; deriving its mask
    from prefixes gives the same tokens as its blocks."""
    tok = tokenizers["gpt2"]
    assert GENERATION_BLOCK.search(tok.chat_template)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye"}]
    ids, blocks = render(tok, messages, "assistant")
    from raylm.data.chat import derived_mask

    derived_ids, derived = derived_mask(tok, messages)
    assert derived_ids.tolist() == ids.tolist() and derived.tolist() == blocks.tolist()


def test_gemma_refuses_a_system_turn(tokenizers):
    with pytest.raises(RenderError, match="System role not supported"):
        render(tokenizers["gemma2"], [{"role": "system", "content": "x"}, {"role": "user", "content": "y"},
                                      {"role": "assistant", "content": "z"}], "assistant")


def test_a_template_that_rewrites_earlier_turns_is_refused_by_name(tokenizers):
    tok = tokenizers["qwen2"]
    import copy

    tok = copy.deepcopy(tok)
    # Mistral v0.3's habit: the system prompt moves into the last user turn
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' and loop.last %}[LAST]{% endif %}"
                         "{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}")
    with pytest.raises(DataError, match="my-template: the chat template renders turn"):
        check_template(tok, "my-template")
    for family in CHAT:
        check_template(tokenizers[family], family)  # the published ones all pass


words = st.text(alphabet=st.sampled_from(list("abcdefghij klmnop,.?!0123")), min_size=1, max_size=30).filter(
    lambda s: s.strip() == s)  # Llama's and Gemma's templates trim a turn's content, Qwen's and Phi's do not


@st.composite
def conversations(draw):
    turns = draw(st.integers(1, 4))
    messages = [{"role": "system", "content": draw(words)}] if draw(st.booleans()) else []
    for _ in range(turns):
        messages += [{"role": "user", "content": draw(words)}, {"role": "assistant", "content": draw(words)}]
    return messages


@pytest.mark.parametrize("family", CHAT)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=conversations())
def test_mask_property_over_random_conversations(tokenizers, family, messages):
    fam, tok = FAMILIES[family], tokenizers[family]
    if messages[0]["role"] == "system" and not fam.system:
        with pytest.raises(RenderError):  # the family's own template refuses it: the record is skipped
            render(tok, messages, "assistant")
        return
    ids, mask = render(tok, messages, "assistant")
    want_ids, want = expected_mask(tok, messages, fam.end_of_turn)
    assert ids.tolist() == want_ids.tolist() and mask.tolist() == want.tolist()
    eot = tok.convert_tokens_to_ids(fam.end_of_turn)
    assert (ids[mask] == eot).sum() == sum(m["role"] == "assistant" for m in messages)
