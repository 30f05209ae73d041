"""Checks for the exercises of the course. Run from the repository root:

    python -m pytest tutorials/check.py -k lesson07      # one lesson
    python -m pytest tutorials/check.py                  # all of them

Your answers live in tutorials/answers/lessonN.py. A teacher checks the reference answers with
NANOMPP_ANSWERS=tutorials/solutions python -m pytest tutorials/check.py

(PYTEST_DONT_REWRITE: a failed check shows its own hint, not pytest's dump of the tensors.)
"""
import importlib.util
import math
import os
import random

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ANSWERS = os.environ.get("NANOMPP_ANSWERS", os.path.join(HERE, "answers"))


def answers(n):
    path = os.path.join(ANSWERS, f"lesson{n}.py")
    spec = importlib.util.spec_from_file_location(f"answers_lesson{n}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.where = os.path.relpath(path)
    return module


def value(module, name):
    v = getattr(module, name, None)
    if v is None:
        pytest.fail(f"set {name} in {module.where}", pytrace=False)
    return v


def call(module, name, *args):
    try:
        return getattr(module, name)(*args)
    except NotImplementedError as e:
        message = f"{e} (in {module.where})"
    pytest.fail(message, pytrace=False)


def toy_tokenizer():
    from tokenizer import Tokenizer
    return Tokenizer.toy(["red", "circle", "what", "colour", "is", "the", "shape"])

# ----------------------------------------------------------------------------- lesson 1


def test_lesson01_predict_lengths():
    from data import encode_conversation
    from model import IGNORE
    a = answers(1)
    turns = [("user", "<Img><ImageHere></Img> what shape is it?"), ("assistant", "circle")]
    ids, labels = encode_conversation(toy_tokenizer(), turns, 32)
    n_ids, kept = value(a, "N_IDS"), value(a, "N_LABELS_KEPT")
    assert n_ids == len(ids), (f"N_IDS = {n_ids} is not right. Count the three turns: the system turn, "
                               f"the user turn with its 32 image tokens, and the assistant turn")
    assert kept == sum(lab != IGNORE for lab in labels), (
        f"N_LABELS_KEPT = {kept} is not right: which tokens of each turn does Qwen's recipe keep?")


def test_lesson01_supervised_text():
    from data import encode_conversation
    a = answers(1)
    tok = toy_tokenizer()
    for turns in ([("user", "<Img><ImageHere></Img> what colour is the shape?"), ("assistant", "red")],
                  [("user", "what is it?"), ("assistant", "a circle"), ("user", "colour?"), ("assistant", "red")]):
        ids, labels = encode_conversation(tok, turns, 4)
        want = tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
        got = call(a, "supervised_text", tok, ids, labels)
        assert got == want, f"supervised_text gave {got!r}, expected {want!r}"

# ----------------------------------------------------------------------------- lesson 2


def test_lesson02_predict_tokens():
    a = answers(2)
    assert value(a, "N_TOKENS_EVA_364") == 677, "N_TOKENS_EVA_364: a 364 px image in 14 px patches, plus CLS"
    assert value(a, "N_TOKENS_TOY_48") == 145, "N_TOKENS_TOY_48: how many 4 px patches fit in 48 x 48, plus CLS?"


def test_lesson02_patchify():
    from vit import PatchEmbed
    a = answers(2)
    torch.manual_seed(0)
    for size, patch in ((32, 4), (28, 14), (12, 3)):
        embed = PatchEmbed(patch, 16)
        x = torch.randn(2, 3, size, size)
        got = call(a, "patchify", x, patch)
        n = (size // patch) ** 2
        shape = (2, n, 3 * patch * patch)
        assert tuple(got.shape) == shape, f"patchify shape {tuple(got.shape)}, expected {shape}"
        w, b = embed.proj.weight, embed.proj.bias
        with torch.no_grad():
            assert torch.allclose(got @ w.flatten(1).T + b, embed(x), atol=1e-5), (
                "patchify's patches are in the wrong order, or flattened in the wrong order: patches go "
                "row by row, each as [channel, row, column], the layout of the conv weight [out, 3, p, p]")

# ----------------------------------------------------------------------------- lesson 3


def test_lesson03_predict_shape():
    got = tuple(value(answers(3), "BLIP2_OUTPUT_SHAPE"))
    assert got == (5, 32, 768), f"BLIP2_OUTPUT_SHAPE = {got}: one row per image, how many queries, of which width?"


def test_lesson03_cross_attention_layers():
    from qformer import QFormer, QFormerConfig
    a = answers(3)
    for n_layer, every in ((12, 2), (12, 3), (5, 1), (7, 4), (2, 5)):
        cfg = QFormerConfig(hidden=8, n_layer=n_layer, n_head=2, ffn=8, num_query=2, encoder_width=8, cross_every=every)
        with torch.device("meta"):
            want = [i for i, layer in enumerate(QFormer(cfg).layers) if layer.cross_attn is not None]
        got = call(a, "cross_attention_layers", cfg)
        assert list(got) == want, f"n_layer={n_layer}, cross_every={every}: got {got}, QFormer builds {want}"

# ----------------------------------------------------------------------------- lesson 4


def test_lesson04_my_splice():
    from model import splice_images
    a = answers(4)
    g = torch.Generator().manual_seed(0)
    for rows, q in ((1, 4), (3, 2), (2, 5)):
        ids = torch.randint(1, 9, (rows, 30), generator=g)
        n = 0
        for r in range(rows):
            for k in range(r + 1):  # row r holds r + 1 images
                ids[r, 2 + k * (q + 1):2 + k * (q + 1) + q] = 0
                n += 1
        embeds = torch.randn(rows, 30, 6, generator=g)
        before = embeds.clone()
        features = torch.randn(n, q, 6, generator=g)
        got = call(a, "my_splice", embeds, ids, features, 0)
        assert torch.equal(embeds, before), "my_splice changed embeds in place: clone it first"
        assert torch.equal(got, splice_images(embeds, ids, features, 0)), (
            f"{rows} rows, {n} images of {q} queries: my_splice differs from splice_images. Images go in "
            "reading order: row by row, left to right")


def test_lesson04_predict_video():
    a = answers(4)
    kept = list(value(a, "KEPT_FRAMES"))
    assert kept == [0, 2, 4, 6], (f"KEPT_FRAMES = {kept}: load_video keeps "
                                  "range(0, total, max(1, total // max_frames))[:max_frames]")
    assert value(a, "VIDEO_IMAGE_TOKENS") == 128, "VIDEO_IMAGE_TOKENS: each kept frame is one image of num_query tokens"

# ----------------------------------------------------------------------------- lesson 5


def test_lesson05_predict_losses():
    a = answers(5)
    assert math.isclose(value(a, "STEP_LOSS"), 2.0), "STEP_LOSS: the sum of all four token losses over the step's count"
    assert math.isclose(value(a, "MEAN_OF_MEANS"), 3.0), "MEAN_OF_MEANS: the average of the two microbatch means"


def test_lesson05_step_loss():
    from qwen import loss_sum
    a = answers(5)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 9, 11, generator=g)
    labels = torch.randint(0, 11, (6, 9), generator=g)
    labels[torch.rand(6, 9, generator=g) < 0.5] = -100
    labels[:, 0] = 7  # a supervised first label, which nothing predicts
    want = loss_sum(logits, labels) / (labels[:, 1:] != -100).sum()
    for cut in ([2, 4], [1, 2, 3], [5, 1]):
        got = call(a, "step_loss", list(logits.split(cut)), list(labels.split(cut)))
        assert torch.isclose(torch.as_tensor(got, dtype=torch.float32), want, rtol=1e-5), (
            f"microbatches of {cut} rows: step_loss {float(got):.6f}, one batch gives {want.item():.6f}. "
            "Divide the summed loss by the step's count, and count labels[:, 1:] only")

# ----------------------------------------------------------------------------- lesson 6


def test_lesson06_predict_trainable():
    import torch.nn as nn
    a = answers(6)
    for name, d_in, d_out in (("TRAINABLE_PRETRAIN_128", 64, 128), ("TRAINABLE_PRETRAIN_MINIGPT4QWEN", 768, 4096)):
        with torch.device("meta"):
            want = sum(p.numel() for p in nn.Linear(d_in, d_out).parameters())
        assert value(a, name) == want, (f"{name}: under 'pretrain' only llm_proj = Linear({d_in}, {d_out}) "
                                        "learns; mind the bias")


def test_lesson06_predict_lr():
    import train
    a = answers(6)
    cfg = train.parse_args(["--lr=3e-3", "--warmup_iters=20", "--max_iters=200"])
    for name, step in (("LR_STEP_0", 0), ("LR_STEP_110", 110)):
        got, want = value(a, name), train.lr_at(cfg, step)
        assert math.isclose(got, want, rel_tol=1e-6), (f"{name} = {got}: not the learning rate of step {step} "
                                                       "(read train.lr_at)")

# ----------------------------------------------------------------------------- lesson 7


def test_lesson07_by_hand():
    from pipeline import peak_in_flight, schedule_table, simulate
    a = answers(7)
    spans, bubble = simulate([schedule_table("1f1b", 3, r, 5) for r in range(3)])
    assert abs(value(a, "BUBBLE_3_5") - bubble) < 5e-4, "BUBBLE_3_5: (p - 1) / (m + p - 1), to three decimals"
    assert value(a, "MAKESPAN_3_5") == max(s[-1][1] for s in spans), (
        "MAKESPAN_3_5: count the cells of the timeline you drew (python pipeline.py --stages 3 --microbatches 5)")
    for name, schedule in (("PEAK_1F1B_3_5", "1f1b"), ("PEAK_GPIPE_3_5", "gpipe")):
        want = [peak_in_flight(schedule_table(schedule, 3, r, 5)) for r in range(3)]
        assert list(value(a, name)) == want, f"{name}: how many forwards has rank r run before its first backward?"


def test_lesson07_one_f_one_b():
    from pipeline import schedule_table
    a = answers(7)
    for p in range(1, 7):
        for r in range(p):
            for m in range(1, 13):
                got, want = call(a, "one_f_one_b", p, r, m), schedule_table("1f1b", p, r, m)
                assert [tuple(op) for op in got] == want, f"p={p}, stage={r}, m={m}: got {got}, expected {want}"

# ----------------------------------------------------------------------------- lesson 8


def _groups(world, p):
    """The groups make_groups builds, without processes (its loops, over the same rank layout)."""
    dp = world // p
    return ([[d * p + s for s in range(p)] for d in range(dp)], [[d * p + s for d in range(dp)] for s in range(p)])


def test_lesson08_layout():
    import inspect
    import pipeline
    layout = "ranks[d * num_stages + s]"  # _groups copies make_groups' rank layout
    assert layout in inspect.getsource(pipeline.make_groups), "make_groups changed: update this check"
    a = answers(8)
    for world in range(1, 17):
        for p in (q for q in range(1, world + 1) if world % q == 0):
            pp, dp = _groups(world, p)
            for rank in range(world):
                mine = next(g for g in pp if rank in g)
                stage, replica = call(a, "stage_and_replica", rank, p)
                assert (stage, replica) == (mine.index(rank), next(g for g in dp if rank in g).index(rank)), (
                    f"world {world}, {p} stages: rank {rank} is stage {mine.index(rank)} of replica "
                    f"{next(g for g in dp if rank in g).index(rank)}, you said stage {stage} of replica {replica}")
                got = list(call(a, "pipeline_ranks", rank, world, p))
                assert got == mine, f"world {world}, {p} stages: rank {rank}'s pipeline is {mine}, you said {got}"


def test_lesson08_predict_dp_peers():
    got = sorted(value(answers(8), "DP_PEERS_OF_5"))
    want = next(g for g in _groups(8, 4)[1] if 5 in g)
    assert got == want, f"DP_PEERS_OF_5 = {got}: the copies of rank 5's stage, one per replica"

# ----------------------------------------------------------------------------- lesson 9


def test_lesson09_top_p():
    from qwen import filter_logits
    a = answers(9)
    g = torch.Generator().manual_seed(0)
    for p in (0.1, 0.5, 0.9, 0.99, 1.0):
        logits = torch.randn(4, 50, generator=g) * 3
        got, want = call(a, "top_p_filter", logits.clone(), p), filter_logits(logits, top_p=p)
        assert torch.equal(torch.isinf(got), torch.isinf(want)), (
            f"top_p={p}: you keep {int(torch.isfinite(got).sum())} tokens, filter_logits keeps "
            f"{int(torch.isfinite(want).sum())}. Keep a token if the more likely tokens alone do not reach p")
        assert torch.equal(got[torch.isfinite(got)], logits[torch.isfinite(want)]), "kept logits must be unchanged"


def test_lesson09_greedy_no_cache():
    from qwen import Qwen, QwenConfig
    a = answers(9)
    torch.manual_seed(0)
    llm = Qwen(QwenConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64)).eval()
    with torch.no_grad():
        for p in llm.parameters():  # larger weights than the init, so the tokens vary
            p.normal_(0, 0.5)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    got = call(a, "greedy_no_cache", llm, ids, 10)
    want = llm.generate(ids, max_new_tokens=10)
    assert [list(map(int, r)) for r in got] == want, (f"greedy_no_cache gave {got}, "
                                                      f"generate (with the KV cache) gives {want}")

# ----------------------------------------------------------------------------- lesson 10


def test_lesson10_predict_qwen7b():
    from qwen import Qwen, QwenConfig
    with torch.device("meta"):
        n = sum(p.numel() for p in Qwen(QwenConfig.preset("qwen7b_chat")).parameters()) / 1e9
    got = value(answers(10), "QWEN7B_BILLIONS")
    assert abs(got - n) < 0.006, (f"QWEN7B_BILLIONS = {got}: not quite. Count per layer q/k/v/o, their "
                                  f"biases, the three MLP matrices and two norms; then the two embeddings")


def test_lesson10_qwen1_names():
    import convert
    a = answers(10)
    keys = ["transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight"] + [
        f"transformer.h.{n}.{k}" for n in (0, 7, 31) for k in (
            "ln_1.weight", "attn.c_proj.weight", "ln_2.weight", "mlp.w1.weight", "mlp.w2.weight", "mlp.c_proj.weight")]
    random.Random(0).shuffle(keys)
    for key in keys:
        got = call(a, "qwen1_to_ours", key)
        mine, = convert.remap({key: torch.zeros(1)}, convert.QWEN1_RULES)
        assert got == mine, f"{key} -> {got!r}, but it is {mine!r} (which of w1 / w2 is the gated branch?)"
