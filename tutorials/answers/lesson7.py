"""Lesson 7: your answers. Check them with: python -m pytest tutorials/check.py -k lesson7"""

BUBBLE_3_5 = None       # exercise 1: three decimals
MAKESPAN_3_5 = None     # exercise 1: time units of the 1F1B step (F = 1, B = 2)
PEAK_1F1B_3_5 = None    # exercise 1: a list, one number per rank
PEAK_GPIPE_3_5 = None   # exercise 1: a list, one number per rank


def one_f_one_b(num_stages, stage, m):
    """Exercise 2: the 1F1B order of ("F", i) and ("B", i) ops on one stage."""
    raise NotImplementedError("lesson 7, exercise 2: write one_f_one_b")
