"""Lesson 6, reference answers."""
TRAINABLE_PRETRAIN_128 = 64 * 128 + 128            # llm_proj weight + bias
TRAINABLE_PRETRAIN_MINIGPT4QWEN = 768 * 4096 + 4096
LR_STEP_0 = 3e-3 * 1 / 20                          # warm-up: lr * (step + 1) / warmup_iters
LR_STEP_110 = 1e-4 + 0.5 * (3e-3 - 1e-4)           # cosine at t = 0.5: halfway between lr and min_lr
