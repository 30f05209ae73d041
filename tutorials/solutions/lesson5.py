"""Lesson 5, reference answers."""
from qwen import IGNORE, loss_sum

STEP_LOSS = (1 + 1 + 1 + 5) / 4      # 2.0
MEAN_OF_MEANS = (1 + 5) / 2          # 3.0


def step_loss(logits_list, labels_list):
    count = sum(int((labels[:, 1:] != IGNORE).sum()) for labels in labels_list)
    return sum(loss_sum(logits, labels) for logits, labels in zip(logits_list, labels_list)) / count
