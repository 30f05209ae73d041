"""Lesson 9: your answers. Check them with: python -m pytest tutorials/check.py -k lesson9"""


def top_p_filter(logits, p):
    """Exercise 1: logits [B, V] with the tokens outside the top-p set at -inf."""
    raise NotImplementedError("lesson 9, exercise 1: write top_p_filter")


def greedy_no_cache(llm, input_ids, n):
    """Exercise 2: n greedy tokens per row (a list of lists), recomputing everything each step."""
    raise NotImplementedError("lesson 9, exercise 2: write greedy_no_cache")
