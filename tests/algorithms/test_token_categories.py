"""Token categories (c_i,t) and the loop point τ_i for MOPD."""
import pytest
import torch

from posttrain.algorithms.mopd import normalise_token_weights
from posttrain.algorithms.token_categories import (
    TokenCategory,
    category_weights,
    find_loop_start,
    label_token_categories,
    loop_starts,
    token_strings_from_ids,
)

pytestmark = pytest.mark.unit
F, R, A, P, T = (TokenCategory.FORMAT, TokenCategory.REASONING, TokenCategory.ANSWER, TokenCategory.PERCEPTION,
                 TokenCategory.TOOL_ARGS)


def test_think_answer_and_special_tokens():
    tokens = ["<think>", "Let", " me", " add", "</think>", "\n\n", "The", " answer", " is", " 4", "<|im_end|>"]
    assert label_token_categories(tokens) == [F, R, R, R, F, A, A, A, A, A, F]


def test_lone_think_close_means_the_prompt_opened_the_think_span():
    tokens = ["Two", " plus", " two", "</think>", "4"]
    assert label_token_categories(tokens) == [R, R, R, F, A]


def test_unclosed_think_is_all_reasoning_and_no_think_is_all_answer():
    assert label_token_categories(["<think>", "hmm", " so"]) == [F, R, R]
    assert label_token_categories(["just", " an", " answer"]) == [A, A, A]


def test_perception_spans_timestamps_boxes_and_quoted_text():
    tokens = ["<think>", "At", " 12", ".5", "s", " the", " dog", " is", " at", " [", "10", ",", " 20", ",", " 30",
              ",", " 40", "]", "</think>", "From", " 01", ":", "02", ",", " sign", " reads", ' "', "STOP", '"', "."]
    expected = [F, R, P, P, P, R, R, R, R, P, P, P, P, P, P,
                P, P, P, F, A, P, P, P, A, A, A, P, P, P, A]
    assert label_token_categories(tokens) == expected


def test_qwen_box_tokens_are_format_and_their_coordinates_perception():
    tokens = ["The", " cup", "<|box_start|>", "(", "12", ",", "30", ")", ",(", "50", ",", "80", ")", "<|box_end|>"]
    assert label_token_categories(tokens) == [A, A, F, P, P, P, P, P, P, P, P, P, P, F]


def test_plain_numbers_are_not_perception():
    tokens = ["There", " are", " 12", " apples", " and", " 3", " pears"]
    assert label_token_categories(tokens) == [A] * 7


def test_tool_call_arguments_and_scaffolding():
    tokens = ["<tool_call>", '{"name": ', '"search"', ', "arguments": ', '{"q": "cats"}', "}", "</tool_call>", "ok"]
    # the quoted "cats" is a tool argument, not OCR text
    assert label_token_categories(tokens) == [F, F, T, F, T, F, F, A]


def test_special_token_mask_and_empty_decodes():
    tokens = ["Hi", "", " there", "X"]
    assert label_token_categories(tokens, special_token_mask=[False, False, False, True]) == [A, A, A, F]
    assert label_token_categories(["", "<think>", "a"]) == [F, F, R]              # leading empty takes the next
    with pytest.raises(ValueError, match="special_token_mask"):
        label_token_categories(tokens, special_token_mask=[True])


def test_token_strings_from_ids_with_vocab_list_or_decode_callable():
    vocab = ["<think>", "a", "</think>", "b"]
    assert token_strings_from_ids([0, 1, 2, 3], vocab) == vocab
    assert token_strings_from_ids([3, 1], lambda ids: vocab[ids[0]].upper()) == ["B", "A"]


def test_category_weights_then_normalised_to_mean_one():
    categories = [F, R, R, A, P]
    raw = category_weights(categories, {"format": 0.2, TokenCategory.PERCEPTION: 2.0, "reasoning": 1.5})
    assert raw == [0.2, 1.5, 1.5, 1.0, 2.0]                                       # answer left at 1
    c = normalise_token_weights(torch.tensor([raw], dtype=torch.float64), torch.ones(1, 5))
    assert c.mean().item() == pytest.approx(1.0)
    assert c[0, 4].item() / c[0, 0].item() == pytest.approx(10.0)                  # ratios are kept
    with pytest.raises(ValueError, match="valid categories"):
        category_weights(categories, {"perceptoin": 2.0})
    with pytest.raises(ValueError, match="≥ 0"):
        category_weights(categories, {"format": -1.0})


# ---------------------------------------------------------------------------------------------------------
# τ: where the response starts looping
# ---------------------------------------------------------------------------------------------------------

def test_no_loop_returns_length():
    response = list(range(100))
    assert find_loop_start(response) == 100
    assert find_loop_start([]) == 0


def test_loop_start_is_the_first_copy_of_the_repeated_ngram():
    prefix = [11, 12, 13, 14]
    response = prefix + [7, 8, 9] * 12                                             # 36 looping tokens ≥ 32
    assert find_loop_start(response) == 4


def test_loop_start_moves_back_to_where_the_period_really_begins():
    # 9 7 8 9 7 8 …: the period-3 pattern starts at index 3 (9 7 8 | 9 7 8 | …), one before the first 7
    response = [1, 2, 3, 9] + [7, 8, 9] * 12
    assert find_loop_start(response) == 3


def test_short_repeats_are_not_loops_unless_asked():
    digits = [5, 0, 0, 0, 0, 0, 0, 6]                                              # "1000000"-style digit tokens
    assert find_loop_start(digits) == len(digits)
    assert find_loop_start(digits, min_repeats=4, min_loop_tokens=1) == 1
    assert find_loop_start(digits, min_repeats=7, min_loop_tokens=1) == len(digits)   # only 6 copies


def test_single_token_loop_and_ngram_range():
    response = [3, 4] + [42] * 40
    assert find_loop_start(response) == 2
    assert find_loop_start(response, min_ngram=2) == 2                             # "42 42" repeats too
    long_period = [1] + list(range(100, 140)) * 4                                  # period 40 > max_ngram 32
    assert find_loop_start(long_period, max_ngram=32) == len(long_period)
    assert find_loop_start(long_period, max_ngram=40) == 1


def test_loop_starts_batch_and_bad_options():
    assert loop_starts([[1, 2, 3], [5] * 40], min_loop_tokens=32) == [3, 0]
    with pytest.raises(ValueError, match="min_repeats"):
        find_loop_start([1, 2], min_repeats=1)
