"""Lesson 7, reference answers."""
BUBBLE_3_5 = 0.286              # (p - 1) / (m + p - 1) = 2 / 7
MAKESPAN_3_5 = 21               # (m + p - 1) x (F + B) = 7 x 3
PEAK_1F1B_3_5 = [3, 2, 1]       # p - r
PEAK_GPIPE_3_5 = [5, 5, 5]      # m


def one_f_one_b(num_stages, stage, m):
    warmup = min(num_stages - stage - 1, m)
    table = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        table += [("F", warmup + i), ("B", i)]
    return table + [("B", i) for i in range(m - warmup, m)]
