"""Lesson 4, reference answers."""
KEPT_FRAMES = [0, 2, 4, 6]     # interval max(1, 10 // 4) = 2, at most 4 frames
VIDEO_IMAGE_TOKENS = 4 * 32


def my_splice(embeds, input_ids, features, image_token_id):
    out = embeds.clone()
    rows = features.reshape(-1, features.shape[-1])
    k = 0
    for b in range(input_ids.shape[0]):
        for t in range(input_ids.shape[1]):
            if input_ids[b, t] == image_token_id:
                out[b, t] = rows[k]
                k += 1
    return out
