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
import os
import time
from datetime import timedelta
from itertools import zip_longest

import torch
import torch.distributed as dist

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

# ----------------------------------------------------------------------------- devices and groups

BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


def pick_device(local_rank=0):
    """CUDA if present, else an Ascend NPU if torch_npu is installed, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    try:
        import torch_npu  # noqa: F401  (registers the 'npu' device with torch)
    except ImportError:
        return torch.device("cpu")
    if torch.npu.is_available():
        torch.npu.set_device(local_rank)
        return torch.device("npu", local_rank)
    return torch.device("cpu")


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


def init_distributed(num_stages, timeout=60.0):
    """From torchrun's environment: pick the device, start the process group with the matching
    backend (nccl / hccl / gloo), build the groups. Returns (device, pp_group, dp_group)."""
    device = pick_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(BACKENDS[device.type], timeout=timedelta(seconds=timeout))
    return (device, *make_groups(num_stages, timeout))

# ----------------------------------------------------------------------------- the engine


class PipelineEngine:
    """One stage of a pipeline: runs the schedule table with P2P, then syncs gradients.

    module(x, mb) -> activation; x is None on the first stage (it reads the microbatch dict mb).
    loss_fn(output, mb) -> summed loss of the microbatch, on the last stage only.
    act_shape(mb) -> shape of the activation entering this stage (static shapes: pad batches to a
    fixed length). tied: parameters whose gradients are summed over `tied_group` (embeddings shared
    by the first and last stage)."""

    def __init__(self, module, pp_group, dp_group, act_shape, loss_fn=None, schedule="1f1b",
                 act_dtype=torch.float32, tied=(), tied_group=None, timeout=60.0):
        self.module, self.pp_group, self.dp_group = module, pp_group, dp_group
        self.act_shape, self.loss_fn, self.schedule, self.act_dtype = act_shape, loss_fn, schedule, act_dtype
        self.tied, self.tied_group, self.timeout = list(tied), tied_group, timeout
        self.stage, self.num_stages = dist.get_rank(pp_group), dist.get_world_size(pp_group)
        self.is_first, self.is_last = self.stage == 0, self.stage == self.num_stages - 1
        if self.is_last != (loss_fn is not None):
            raise ValueError("loss_fn is required on the last stage and only there")
        self.device = next(module.parameters()).device
        self.stats = {}

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
                like = stash[i]["y"] if kind == "B" else None
                got[kind, i] = (torch.empty_like(like) if like is not None else
                                torch.empty(self.act_shape(microbatches[i]), dtype=self.act_dtype, device=self.device))
                ops.append(dist.P2POp(dist.irecv, got[kind, i], peer, self.pp_group))
        try:
            for work in dist.batch_isend_irecv(ops) if ops else []:
                work.wait(timedelta(seconds=self.timeout))
        except RuntimeError as e:
            peers = sorted({dist.get_global_rank(self.pp_group, q) for *_, q in group})
            raise RuntimeError(f"pipeline rank {dist.get_rank()} (stage {self.stage}): exchange with rank "
                               f"{', '.join(map(str, peers))} failed or timed out after {self.timeout}s: {e}") from e
        return got

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
            y = self.module(x, mb)
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
                loss += stash[i]["y"].item() if self.is_last else 0.0
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
        with torch.enable_grad():
            loss = self._run(microbatches, count, table)
        self._sync_grads()
        return self._reduce_loss(loss)

    @torch.no_grad()
    def evaluate(self, microbatches, count):
        """Forward only (a table of F ops, no activations kept): the loss, on every rank."""
        return self._reduce_loss(self._run(microbatches, count, [("F", i) for i in range(len(microbatches))]))

    def _reduce_loss(self, loss):
        t = torch.tensor([loss], dtype=torch.float64, device=self.device)
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
        for p in self.tied:
            self._collective(p.grad, self.tied_group)
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
