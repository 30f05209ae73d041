"""Lesson 6: your answers. Check them with: python -m pytest tutorials/check.py -k lesson6"""

TRAINABLE_PRETRAIN_128 = None            # exercise 1
TRAINABLE_PRETRAIN_MINIGPT4QWEN = None   # exercise 1
LR_STEP_0 = None                         # exercise 2
LR_STEP_110 = None                       # exercise 2
