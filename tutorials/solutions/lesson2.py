"""Lesson 2, reference answers."""
N_TOKENS_EVA_364 = 1 + (364 // 14) ** 2   # 677
N_TOKENS_TOY_48 = 1 + (48 // 4) ** 2      # 145


def patchify(pixels, patch):
    B, C, H, W = pixels.shape
    x = pixels.reshape(B, C, H // patch, patch, W // patch, patch)   # [B, C, gh, p, gw, p]
    x = x.permute(0, 2, 4, 1, 3, 5)                                  # [B, gh, gw, C, p, p]
    return x.reshape(B, (H // patch) * (W // patch), C * patch * patch)
