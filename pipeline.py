"""
pipeline.py: pipeline parallelism by hand, GPipe and 1F1B, times data parallelism, over torch.distributed.

GPipe (Huang et al., 2019) runs all forwards, then all backwards; 1F1B (PipeDream-flush, Narayanan et
al., 2021) alternates them after a short warm-up so that a stage stores at most p - r microbatches
instead of m. Both are one order table per rank (`schedule_table`): the table is validated and
simulated without communication (`simulate`), and it is exactly what `PipelineEngine.step` executes.

Rank layout: global rank = dp_rank * num_stages + stage. The p ranks of one pipeline are consecutive
(on one node when p <= devices per node, where the per-microbatch P2P traffic is); the data-parallel
group of a stage is every p-th rank. The loss is normalised by the supervised-token count of the whole
step (all microbatches, all replicas), so every layout gives the single-process gradients.

    python pipeline.py --stages 4 --microbatches 8 --schedule 1f1b   # the schedule as a timeline
    torchrun --nproc_per_node=4 train.py --num_stages=2               # 2 stages x 2 replicas
"""
import argparse
import json
import os
import time
from datetime import timedelta
from itertools import zip_longest

import torch
import torch.distributed as dist
import torch.nn as nn

import ckpt
from model import loss_sum

# ----------------------------------------------------------------------------- the schedule as data


def schedule_table(schedule, num_stages, stage, m):
    """The order of forward ('F', i) and backward ('B', i) ops of microbatches i on one stage."""
    if schedule == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    if schedule != "1f1b":
        raise ValueError(f"unknown schedule {schedule!r}: expected 'gpipe' or '1f1b'")
    warmup = min(num_stages - stage - 1, m)  # forwards in flight before the first backward arrives
    table = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        table += [("F", warmup + i), ("B", i)]
    return table + [("B", i) for i in range(m - warmup, m)]


def comm_plan(table, stage, num_stages):
    """The messages posted together before each op of `table` (and once after the last op).

    The output of the previous op goes out in the same batch_isend_irecv as the input of the next op
    comes in, so two neighbours can never both sit in a blocking send. A message is (direction, kind,
    microbatch, peer stage); the ends of the pipeline have no peer, so their sends/receives vanish."""
    nxt = stage + 1 if stage < num_stages - 1 else None
    prv = stage - 1 if stage > 0 else None
    plan = []
    for before, op in zip([None] + table, table + [None]):
        group = []
        if before is not None:  # activation forward after F, input gradient backward after B
            peer = nxt if before[0] == "F" else prv
            group += [("send", *before, peer)] if peer is not None else []
        if op is not None:
            peer = prv if op[0] == "F" else nxt
            group += [("recv", *op, peer)] if peer is not None else []
        plan.append(group)
    return plan


def validate(table, m):
    """Every microbatch forward once and backward once, forward first."""
    if sorted(table) != sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)]):
        raise ValueError(f"table must hold F and B of microbatches 0..{m - 1} once each: {table}")
    for i in range(m):
        if table.index(("B", i)) < table.index(("F", i)):
            raise ValueError(f"microbatch {i}: backward before forward in {table}")


def peak_in_flight(table):
    """Most microbatches whose forward ran and whose backward has not (their activations are held)."""
    live = peak = 0
    for kind, _ in table:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


def simulate(tables, cost=None):
    """Run the per-rank tables on paper: an op starts when its input has arrived, and a message is
    delivered only once both sides have posted it (a rendezvous, the strictest transport), with
    messages on each link matched in order as gloo/NCCL do. Returns (spans per rank as (start, end,
    kind, i), bubble fraction); raises RuntimeError naming the stuck ranks on a deadlock."""
    cost = cost or {"F": 1, "B": 2}
    p = len(tables)
    plans = [comm_plan(t, r, p) for r, t in enumerate(tables)]
    posted_at = {}  # (direction, kind, i, src, dst) -> (rank, group index) that posts it
    links = {}  # (kind, src, dst, direction) -> microbatches in posting order
    for r, plan in enumerate(plans):
        for k, group in enumerate(plan):
            for d, kind, i, peer in group:
                src, dst = (r, peer) if d == "send" else (peer, r)
                posted_at[d, kind, i, src, dst] = (r, k)
                links.setdefault((kind, src, dst, d), []).append(i)
    for (kind, src, dst, d), order in links.items():
        if d == "send" and links.get((kind, src, dst, "recv")) != order:
            raise RuntimeError(f"{kind} messages {src}->{dst}: sent in order {order}, "
                               f"received in order {links.get((kind, src, dst, 'recv'))}")
    post = [[0] + [None] * len(t) for t in tables]  # time each group is posted = end of previous op
    done, spans = [0] * p, [[] for _ in range(p)]
    progress = True
    while progress:
        progress = False
        for r in range(p):
            while done[r] < len(plans[r]):
                k = done[r]
                peers = [posted_at["recv" if d == "send" else "send", kind, i, *((r, q) if d == "send" else (q, r))]
                         for d, kind, i, q in plans[r][k]]
                if any(post[q][g] is None for q, g in peers):
                    break
                start = max([post[r][k]] + [post[q][g] for q, g in peers])
                if k < len(tables[r]):
                    kind, i = tables[r][k]
                    spans[r].append((start, start + cost[kind], kind, i))
                    post[r][k + 1] = start + cost[kind]
                done[r] += 1
                progress = True
    stuck = [f"rank {r} before {tables[r][done[r]] if done[r] < len(tables[r]) else 'its last send'}"
             for r in range(p) if done[r] < len(plans[r])]
    if stuck:
        raise RuntimeError("deadlock: " + ", ".join(stuck))
    makespan = max(s[-1][1] for s in spans)
    busy = sum(e - s for rank in spans for s, e, _, _ in rank)
    return spans, 1 - busy / (p * makespan)


def timeline(spans):
    """The spans of `simulate` as text: one row per rank, one cell per time unit, '.' = idle."""
    width = max(len(str(i)) for rank in spans for *_, i in rank) + 1
    makespan = max(s[-1][1] for s in spans)
    rows = []
    for r, rank in enumerate(spans):
        cells = ["." * width] * makespan
        for start, end, kind, i in rank:
            cells[start:end] = [f"{kind}{i}".ljust(width)] * (end - start)
        rows.append(f"rank {r} |" + " ".join(cells) + "|")
    return "\n".join(rows)

# ----------------------------------------------------------------------------- process groups

def make_groups(num_stages, timeout=60.0, ranks=None):
    """(pp_group, dp_group) of this rank, for global rank = dp_rank * num_stages + stage (positions in
    `ranks`, default the whole world; ranks outside get (None, None)). Every rank of the world must call
    this, in the same order (group creation is collective); `timeout` seconds bounds every collective."""
    ranks = list(range(dist.get_world_size())) if ranks is None else list(ranks)
    if num_stages < 1 or len(ranks) % num_stages:
        raise ValueError(f"{len(ranks)} ranks are not a multiple of num_stages={num_stages}")
    dp, me, mine = len(ranks) // num_stages, dist.get_rank(), {"pp": None, "dp": None}
    for name, groups in [("pp", [[ranks[d * num_stages + s] for s in range(num_stages)] for d in range(dp)]),
                         ("dp", [[ranks[d * num_stages + s] for d in range(dp)] for s in range(num_stages)])]:
        for members in groups:
            group = dist.new_group(members, timeout=timedelta(seconds=timeout))
            if me in members:
                mine[name] = group
    return mine["pp"], mine["dp"]


# ----------------------------------------------------------------------------- the engine


class PipelineEngine:
    """One stage of a pipeline: runs the schedule table with P2P, then syncs gradients.

    module(x, mb) -> activation; x is None on the first stage (it reads the microbatch dict mb).
    loss_fn(output, mb) -> summed loss of the microbatch, on the last stage only.
    act_shape(mb) -> shape of the activation entering this stage (static shapes: pad batches to a
    fixed length). tied: on the first and the last stage, the copies of weights they share (tied
    embeddings), whose gradients are summed between the two."""

    def __init__(self, module, pp_group, dp_group, act_shape, loss_fn=None, schedule="1f1b",
                 act_dtype=torch.float32, tied=(), timeout=60.0):
        self.module, self.pp_group, self.dp_group = module, pp_group, dp_group
        self.act_shape, self.loss_fn, self.schedule, self.act_dtype = act_shape, loss_fn, schedule, act_dtype
        self.tied, self.timeout = list(tied), timeout
        self.stage, self.num_stages = dist.get_rank(pp_group), dist.get_world_size(pp_group)
        self.is_first, self.is_last = self.stage == 0, self.stage == self.num_stages - 1
        if self.is_last != (loss_fn is not None):
            raise ValueError("loss_fn is required on the last stage and only there")
        self.device = next(module.parameters()).device
        self.stats = {}

    def stage_forward(self, x, mb):
        return self.module(x, mb)

    # P2P: messages of one comm_plan group go out and come in together
    def _communicate(self, group, stash, microbatches):
        ops, got = [], {}
        for d, kind, i, peer in group:
            peer = dist.get_global_rank(self.pp_group, peer)
            if d == "send":  # activation after F, input gradient after B
                entry = stash[i] if kind == "F" and torch.is_grad_enabled() else stash.pop(i)
                tensor = entry["y"].detach().to(self.act_dtype) if kind == "F" else entry["dx"]
                ops.append(dist.P2POp(dist.isend, tensor.contiguous(), peer, self.pp_group))
            else:
                # static shapes: a gradient is shaped like the output we sent, an activation by act_shape
                shape = stash[i]["y"].shape if kind == "B" else self.act_shape(microbatches[i])
                got[kind, i] = torch.empty(shape, dtype=self.act_dtype, device=self.device)
                ops.append(dist.P2POp(dist.irecv, got[kind, i], peer, self.pp_group))
        self._p2p(ops, group)
        return got

    def _p2p(self, ops, group):
        try:
            for work in dist.batch_isend_irecv(ops) if ops else []:
                work.wait(timedelta(seconds=self.timeout))
        except RuntimeError as e:
            peers = sorted({dist.get_global_rank(self.pp_group, q) for *_, q in group})
            raise RuntimeError(f"pipeline rank {dist.get_rank()} (stage {self.stage}): exchange with rank "
                               f"{', '.join(map(str, peers))} failed or timed out after {self.timeout}s: {e}") from e

    def _collective(self, tensor, group):
        try:
            dist.all_reduce(tensor, group=group)
        except RuntimeError as e:
            raise RuntimeError(f"rank {dist.get_rank()}: all_reduce over ranks "
                               f"{dist.get_process_group_ranks(group)} failed or timed out: {e}") from e

    def _forward(self, mb, x, count):
        if x is not None:
            x.requires_grad_(True)  # the input gradient must flow upstream, even through frozen blocks
        saved = []
        params = {p.untyped_storage().data_ptr() for p in self.module.parameters()}

        def pack(t):  # count activations kept for backward, not the weights autograd also keeps
            if t.untyped_storage().data_ptr() not in params:
                saved.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = self.stage_forward(x, mb)
            if self.is_last:
                y = self.loss_fn(y, mb) / count
        return dict(x=x, y=y, saved=sum(saved))

    def _backward(self, entry, grad):
        y, x = entry["y"], entry["x"]
        if y.requires_grad:  # a fully frozen first stage has nothing to do
            torch.autograd.backward(y, None if grad is None else grad.to(y.dtype))
        if x is not None:
            entry["dx"] = x.grad.to(self.act_dtype) if x.grad is not None else torch.zeros_like(x)
        entry["y"] = entry["x"] = None  # free the activations now, not when the message is sent

    def _run(self, microbatches, count, table):
        stash, loss = {}, 0.0
        saved = peak_saved = peak = busy = 0
        start = time.perf_counter()
        for group, op in zip_longest(comm_plan(table, self.stage, self.num_stages), table):
            got = self._communicate(group, stash, microbatches)
            if op is None:
                break
            kind, i = op
            t0 = time.perf_counter()
            if kind == "F":
                stash[i] = self._forward(microbatches[i], got.get(("F", i)), count)
                if not torch.is_grad_enabled():
                    stash[i]["x"] = None  # evaluation: nothing to keep for a backward
                saved += stash[i]["saved"]
                loss += stash[i]["y"].detach() if self.is_last else 0.0  # no .item(): no device sync
            else:
                self._backward(stash[i], got.get(("B", i)))
                saved -= stash[i]["saved"]
                if self.is_first:
                    del stash[i]  # nothing to send back
            busy += time.perf_counter() - t0
            peak = max(peak, sum(e["y"] is not None for e in stash.values()))
            peak_saved = max(peak_saved, saved)
        wall = time.perf_counter() - start
        self.stats = dict(peak_in_flight=peak, peak_saved_bytes=peak_saved, busy=busy, wall=wall,
                          bubble=1 - busy / wall)
        return loss

    def step(self, microbatches, count):
        """Forward and backward of one optimizer step over `microbatches` (dicts, the same on every stage
        of a replica). Gradients are summed into .grad; loss = summed loss / count, where count is the
        step's global number of supervised tokens. Returns the step's loss on every rank."""
        table = schedule_table(self.schedule, self.num_stages, self.stage, len(microbatches))
        count = max(count, 1)  # a step without supervised tokens contributes nothing, not NaN
        with torch.enable_grad():
            loss = self._run(microbatches, count, table)
        self._sync_grads()
        return self._reduce_loss(loss)

    @torch.no_grad()
    def evaluate(self, microbatches, count):
        """Forward only (a table of F ops, no activations kept): the loss, on every rank."""
        table = [("F", i) for i in range(len(microbatches))]
        return self._reduce_loss(self._run(microbatches, max(count, 1), table))

    def _reduce_loss(self, loss):
        t = torch.as_tensor(loss, dtype=torch.float64, device=self.device).reshape(1)
        self._collective(t, self.pp_group)  # only the last stage holds a non-zero loss
        self._collective(t, self.dp_group)
        return t.item()

    def _sync_grads(self):
        """Tied copies first (same replica), then one flat all-reduce over the data-parallel group. A sum,
        not a mean: the loss is already divided by the global count."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # keep the flat buffer aligned across replicas
                p.grad = torch.zeros_like(p)
        if self.tied:  # first and last stage swap their copies' gradients and both add: a 2-rank all-reduce
            peer = self.num_stages - 1 if self.is_first else 0
            theirs = [torch.empty_like(p.grad) for p in self.tied]
            rank = dist.get_global_rank(self.pp_group, peer)
            self._p2p([dist.P2POp(dist.isend, p.grad, rank, self.pp_group) for p in self.tied] +
                      [dist.P2POp(dist.irecv, t, rank, self.pp_group) for t in theirs], [("tied", peer)])
            for p, t in zip(self.tied, theirs):
                p.grad += t
        if params and dist.get_world_size(self.dp_group) > 1:
            flat = torch.cat([p.grad.flatten() for p in params])
            self._collective(flat, self.dp_group)
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                p.grad.copy_(g.view_as(p))

    def clip_grad_norm_(self, max_norm):
        """Clip by the norm over the whole model (all stages; a tied weight counted once). Returns it."""
        skip = {id(p) for p in self.tied} if not self.is_first else set()
        grads = [p.grad for p in self.module.parameters() if p.grad is not None and id(p) not in skip]
        sq = torch.zeros(1, dtype=torch.float64, device=self.device)
        for g in grads:
            sq += g.double().pow(2).sum()
        self._collective(sq, self.pp_group)
        norm = sq.sqrt().item()
        scale = max_norm / (norm + 1e-6)
        if scale < 1:
            for p in self.module.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        return norm

# ----------------------------------------------------------------------------- slicing MultimodalLM


def split_layers(n, num_stages, first_cost=0.0, last_cost=0.0, first_share=None):
    """Contiguous [lo, hi) block ranges, one per stage, minimising the slowest stage, in units of one
    decoder block; the first stage also pays `first_cost` (vision tower), the last `last_cost` (head).
    `first_share` fixes the number of blocks on the first stage."""
    if first_share is not None:
        if not 0 <= first_share <= n - (num_stages - 1):
            raise ValueError(f"first_stage_share={first_share}: need 0..{n - num_stages + 1} of {n} blocks "
                             f"so that the other {num_stages - 1} stages get one block each")
        rest = split_layers(n - first_share, num_stages - 1, 0.0, last_cost) if num_stages > 1 else []
        return [(0, first_share)] + [(lo + first_share, hi + first_share) for lo, hi in rest]
    if n < num_stages:
        raise ValueError(f"{n} decoder blocks cannot fill {num_stages} stages")
    if num_stages == 1:
        return [(0, n)]
    best = None
    for k0 in range(1, n - num_stages + 2):
        for kl in range(1, n - k0 - (num_stages - 2) + 1):
            mid, r = num_stages - 2, n - k0 - kl
            if (mid == 0 and r) or (mid and r < mid):
                continue
            ks = [k0] + [r // mid + (j < r % mid) for j in range(mid)] + [kl]
            slowest = max([k0 + first_cost, kl + last_cost] + ks[1:-1])
            if best is None or slowest < best[0]:
                best = (slowest, ks)
    bounds = [0]
    for k in best[1]:
        bounds.append(bounds[-1] + k)
    return list(zip(bounds[:-1], bounds[1:]))


def stage_costs(model, seq_len):
    """(vision tower, head) compute in units of one decoder block, for one image per sequence of
    seq_len tokens: cost ~ parameters x tokens, and a frozen part runs forward only (1/3 of training)."""
    cfg = model.config
    nparams = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    block = nparams(model.llm.layers[0]) * seq_len
    patches = (cfg.vit.img_size // cfg.vit.patch_size) ** 2 + 1
    vision = 0.0
    for name, module, tokens in [("vit", model.vit, patches), ("qformer", model.qformer, cfg.qformer.num_query),
                                 ("proj", model.llm_proj, cfg.qformer.num_query)]:
        vision += nparams(module) * tokens / (3 if name in cfg.freeze else 1)
    return vision / block, nparams(model.llm.lm_head) * seq_len / block


class Elsewhere(nn.Module):
    """Stands in for a part of the model that lives on another pipeline stage."""

    def forward(self, *args):
        raise RuntimeError("this part of the model lives on another pipeline stage")


class PipelineRunner(PipelineEngine):
    """One pipeline stage of a MultimodalLM, sliced in place from the full model (built from one seed
    or checkpoint on every rank, so all stages agree). Stage 0 keeps vit, qformer, llm_proj and
    embed_tokens (the image splice happens there), the last keeps norm and lm_head (and the loss);
    every stage keeps its decoder blocks under their original names (llm.layers.<i>). `.module` is
    the sliced model: give its parameters to the optimizer. Microbatches are dicts from
    data.collate with a fixed length; every stage of a replica gets the same ones.
    With `state` (MultimodalLM.from_*(lazy=True)), `model` is on the meta device and only this
    stage's tensors are read from the (memory-mapped) state and cast: a rank holds its share of
    the model, never the whole of it."""

    def __init__(self, model, num_stages, schedule="1f1b", pp_group=None, dp_group=None, first_stage_share=None,
                 device=None, seq_len=512, timeout=60.0, state=None):
        stage = dist.get_rank(pp_group)
        if dist.get_world_size(pp_group) != num_stages:
            raise ValueError(f"pp_group has {dist.get_world_size(pp_group)} ranks, num_stages is {num_stages}")
        llm, first, last = model.llm, stage == 0, stage == num_stages - 1
        tied = llm.lm_head.weight is llm.embed_tokens.weight and llm.lm_head.weight.requires_grad
        self.ranges = split_layers(len(llm.layers), num_stages, *stage_costs(model, seq_len), first_stage_share)
        lo, hi = self.ranges[stage]
        blocks = nn.ModuleDict({str(i): llm.layers[i] for i in range(lo, hi)})
        if state is not None:  # before slicing: a tied head's tensor is the embedding's, stored once
            state = {**{a: state[c] for a, c in ckpt.aliases(model).items() if c in state}, **state}
        if not first:
            model.vit, model.qformer, model.llm_proj, llm.embed_tokens = Elsewhere(), Elsewhere(), Elsewhere(), Elsewhere()
        if not last:
            llm.norm, llm.lm_head = Elsewhere(), Elsewhere()
        llm.layers = blocks
        if state is not None:
            ckpt.load_into(model, {k: state[k] for k in model.state_dict() if k in state}, cast=True)
        model.to(device or next(model.parameters()).device)
        dtype = next(blocks.parameters()).dtype  # every stage has blocks; a frozen vision tower may be bf16
        super().__init__(model, pp_group, dp_group, act_shape=lambda mb: (*mb["input_ids"].shape, llm.config.n_embd),
                         loss_fn=(lambda logits, mb: loss_sum(logits, mb["labels"], model.config.loss_norm)) if last else None,
                         schedule=schedule, act_dtype=dtype, timeout=timeout,
                         tied=[llm.embed_tokens.weight if first else llm.lm_head.weight]
                         if tied and num_stages > 1 and (first or last) else ())

    def stage_forward(self, x, mb):
        model, mb = self.module, {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in mb.items()}
        if self.is_first:
            x = model.embed(mb["input_ids"], mb.get("images"))
        x = model.llm.forward_blocks(x, model.llm.layers.values(), attention_mask=mb.get("attention_mask"))
        return model.llm.head(x) if self.is_last else x

    def shard_files(self, step):
        """{file name: writer} of this stage's weights, for a save of `step` (ckpt.write_files into
        the save's staging directory). The model config and the step travel in the metadata, so
        ckpt.merge_stage_shards can rebuild one model and refuse shards of different steps."""
        state = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}  # clone: no shared storage
        meta = {"stage": str(self.stage), "num_stages": str(self.num_stages), "step": str(step),
                "config": json.dumps(self.module.config.to_dict())}
        return {ckpt.stage_shard_name(self.stage, self.num_stages): ckpt.safetensors_writer(state, meta)}

    def load_shard(self, directory):
        """Resume from this stage's shard in `directory` (same topology; every key must match).
        Returns the step recorded in the shard."""
        path = os.path.join(directory, ckpt.stage_shard_name(self.stage, self.num_stages))
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no shard for stage {self.stage} of {self.num_stages} "
                                    f"(was the checkpoint written with another number of stages?)")
        ckpt.load_into(self.module, ckpt.read_file(path))
        return int(ckpt.read_metadata(path).get("step", -1))

# ----------------------------------------------------------------------------- command line


def main():
    ap = argparse.ArgumentParser(description="Print a pipeline schedule as a per-rank timeline.")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--schedule", choices=["gpipe", "1f1b"], default="1f1b")
    args = ap.parse_args()
    p, m = args.stages, args.microbatches
    tables = [schedule_table(args.schedule, p, r, m) for r in range(p)]
    for table in tables:
        validate(table, m)
    spans, bubble = simulate(tables)
    print(f"{args.schedule}: {p} stages, {m} microbatches (F = 1 time unit, B = 2)")
    print(timeline(spans))
    print(f"bubble fraction {bubble:.3f}  ((p-1)/(m+p-1) = {(p - 1) / (m + p - 1):.3f})")
    print("peak in-flight microbatches per rank:", [peak_in_flight(t) for t in tables])


if __name__ == "__main__":
    main()
