"""Lesson 1, reference answers."""
from model import IGNORE

N_IDS = 85            # system turn 23 + user turn 45 (32 image tokens) + assistant header 3 + 'circle' + end 2
N_LABELS_KEPT = 10    # 3 x <|im_start|>, 3 x <|im_end|>\n (6), and 'circle'


def supervised_text(tok, ids, labels):
    return tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
