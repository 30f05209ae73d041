"""Lesson 3, reference answers."""
BLIP2_OUTPUT_SHAPE = (5, 32, 768)   # the image size never shows in the output


def cross_attention_layers(config):
    return [i for i in range(config.n_layer) if i % config.cross_every == 0]
