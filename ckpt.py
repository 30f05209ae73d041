"""
Our checkpoint format, and saving it so that a crash at any instant loses nothing.

A checkpoint is a directory: `model.safetensors` (tied weights stored once), `config.json`, and what
its writer puts beside them (tokenizer files, optimizer state, pipeline stage shards). Reading is
memory-mapped (the safetensors library maps the file; tensors are views into it), so a model built
on the meta device and loaded with `load_into` costs about the size of its weights in RAM.

Saving is crash-consistent: every file of a save is written and fsynced into a staging directory
beside the destination, and only then is that directory renamed into place (`write_dir`). A crash
before the rename leaves the old checkpoint untouched and a stale staging directory, which the next
save clears. A training run saves each step into its own directory `step-NNNNNN` and then moves the
`latest` pointer file to it (`set_latest`); readers follow the pointer (`resolve`), so they see one
complete step or the previous one, never a mix.

This module imports torch, safetensors and json only: it sits at the bottom of the import graph,
below the model files' users (model.py, train.py, pipeline.py, convert.py, chat.py).
"""
import json
import os
import pickle
import shutil
import zipfile

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

LATEST = "latest"  # a training run's pointer file: the name of its newest complete step directory


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as-is; the message names the file or keys."""

# ----------------------------------------------------------------------------- crash-safe writes


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path, content):
    """content: str, bytes, or fn(path) that writes the file; then the data is fsynced to disk."""
    if callable(content):
        content(path)
    else:
        with open(path, "wb" if isinstance(content, bytes) else "w", encoding=None if isinstance(content, bytes) else "utf-8") as f:
            f.write(content)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write(path, content):
    """Write one file under a temporary name, fsync, rename over `path`: readers see the old file
    or the new one, never a part."""
    tmp = f"{path}.tmp{os.getpid()}"
    _write(tmp, content)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def staging(d):
    """The directory a save of `d` is assembled in; several processes may write into it."""
    return os.fspath(d).rstrip("/") + ".tmp"


def begin(d):
    """A fresh, empty staging directory for a save of `d` (a crashed save's leftovers removed)."""
    tmp = staging(d)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def write_files(directory, files):
    """files: {name: str | bytes | fn(path)}, each written and fsynced in `directory`."""
    for name, content in files.items():
        _write(os.path.join(directory, name), content)


def commit(tmp, d):
    """Rename the finished staging directory `tmp` to `d`. An existing `d` is moved aside first
    and deleted after, so a crash in between leaves both copies on disk, never a mixed one."""
    _fsync_dir(tmp)
    old = None
    if os.path.exists(d):
        old = f"{d}.old{os.getpid()}"
        os.replace(d, old)
    os.replace(tmp, d)
    _fsync_dir(os.path.dirname(os.path.abspath(d)))
    if old:
        shutil.rmtree(old)


def write_dir(d, files):
    """Write a whole checkpoint directory at once: all of `files` or, after a crash, none."""
    tmp = begin(d)
    write_files(tmp, files)
    commit(tmp, d)


def step_dir(out_dir, step):
    return os.path.join(out_dir, f"step-{step:06d}")


def set_latest(out_dir, d):
    """Point `out_dir/latest` at the complete step directory `d`, then delete the other step
    directories and stale staging directories: the previous checkpoint goes only now."""
    atomic_write(os.path.join(out_dir, LATEST), os.path.basename(d) + "\n")
    for name in os.listdir(out_dir):
        if name.startswith("step-") and name != os.path.basename(d):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


def resolve(d):
    """The directory holding the checkpoint files: `d` itself, or the step `d/latest` names."""
    d = os.fspath(d)
    pointer = os.path.join(d, LATEST)
    if not os.path.isfile(pointer):
        return d
    with open(pointer) as f:
        name = f.read().strip()
    if not name or os.sep in name or not os.path.isdir(os.path.join(d, name)):
        raise CheckpointError(f"{pointer} names {name!r}, which is not a step directory of {d}")
    return os.path.join(d, name)

# ----------------------------------------------------------------------------- reading tensors


def _read_safetensors(path):
    try:
        with safe_open(path, "pt") as f:  # memory-mapped: get_tensor returns views into the file
            return {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from None


def _read_torch(path):
    try:
        # mmap needs the zip format (torch >= 1.6); older files are read into memory
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: refusing to unpickle: the file holds Python objects other than "
                              f"tensors (weights_only=True): {first}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt torch checkpoint ({e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # LAVIS / MiniGPT4Qwen nest the weights under "model"
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:5]}")
    return obj


def read_file(path):
    """All tensors of one .safetensors file (memory-mapped) or torch .pth/.bin (weights only)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    return _read_safetensors(path) if path.endswith(".safetensors") else _read_torch(path)


def read_metadata(path):
    """The string metadata of a safetensors file ({} if none)."""
    try:
        with safe_open(os.fspath(path), "pt") as f:
            return f.metadata() or {}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from None


def safetensors_writer(state, metadata=None):
    """A `write_files` content that saves `state` (contiguous copies of shared or strided tensors)."""
    def write(path):
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, path, metadata=metadata)
    return write

# ----------------------------------------------------------------------------- state dicts and modules


def few(keys):
    keys = sorted(keys)
    return ", ".join(keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")


def aliases(module):
    """{alias key: canonical key} for parameters shared by two names (tied embeddings)."""
    seen, alias = {}, {}
    for key, t in module.state_dict(keep_vars=True).items():
        if id(t) in seen:
            alias[key] = seen[id(t)]
        else:
            seen[id(t)] = key
    return alias


def state_of(module):
    """module.state_dict() with each tied tensor once, as our files store it."""
    alias = aliases(module)
    return {k: v for k, v in module.state_dict().items() if k not in alias}


def load_into(module, state, cast=False):
    """Load `state` into `module` after checking every key, shape and dtype; tied aliases may be
    absent. Parameters on the meta device are replaced by the (memory-mapped) tensors themselves.
    A tensor whose dtype differs from the module's is an error unless `cast=True`: casting is right
    where it is meant (fp32 master weights from a bf16 file, a bf16 model for inference), and a
    silent cast once hid a benchmark that ran the wrong dtype."""
    own = module.state_dict(keep_vars=True)
    alias = aliases(module)
    missing = own.keys() - state.keys() - alias.keys()
    unexpected = state.keys() - own.keys()
    common = own.keys() & state.keys()
    wrong = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in common if state[k].shape != own[k].shape]
    dtypes = [] if cast else [f"{k} {state[k].dtype} vs model {own[k].dtype}" for k in common if state[k].dtype != own[k].dtype]
    if missing or unexpected or wrong or dtypes:
        msg = [f"missing keys: {few(missing)}" if missing else "",
               f"unexpected keys: {few(unexpected)}" if unexpected else "",
               f"shape mismatch: {few(wrong)}" if wrong else "",
               f"dtype mismatch (load with cast=True to convert): {few(dtypes)}" if dtypes else ""]
        raise CheckpointError("; ".join(m for m in msg if m))
    with torch.no_grad():
        for key, dst in own.items():
            if key in alias:
                continue
            src = state[key].to(dst.dtype)
            if not dst.is_meta:
                dst.copy_(src)
                continue
            owner, _, name = key.rpartition(".")
            if isinstance(dst, torch.nn.Parameter):
                src = torch.nn.Parameter(src, requires_grad=dst.requires_grad)
            setattr(module.get_submodule(owner), name, src)
        for key, canon in alias.items():  # re-tie: point the alias at the (new) canonical tensor
            owner, _, name = key.rpartition(".")
            setattr(module.get_submodule(owner), name, module.get_parameter(canon))
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:  # e.g. a non-persistent buffer of a model built on the meta device
        raise CheckpointError(f"still on the meta device after loading: {few(left)}")
    return module

# ----------------------------------------------------------------------------- our directories


def files(state, config):
    """The two files every checkpoint has, for `write_dir` / `write_files`."""
    return {"model.safetensors": safetensors_writer(state), "config.json": json.dumps(config, indent=2) + "\n"}


def save(d, state, config, extra=None):
    """Write the checkpoint directory `d` at once: weights, config.json and `extra` files."""
    write_dir(d, {**files(state, config), **(extra or {})})


def load_config(d):
    path = os.path.join(resolve(d), "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{d}: not a checkpoint directory (no config.json)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def load(d):
    """(state, config) of a checkpoint directory (following `latest`), memory-mapped."""
    config = load_config(d)
    return read_file(os.path.join(resolve(d), "model.safetensors")), config

# ----------------------------------------------------------------------------- pipeline stage shards


def stage_shard_name(stage, num_stages):
    return f"stage{stage}-of-{num_stages}.safetensors"


def merge_stage_shards(paths):
    """(state, metadata of stage 0) from the stage shards of one pipeline save: the shards must be
    exactly stages 0..p-1 of one run and one step, no key may appear twice, and the decoder blocks
    must run 0..n-1 without a gap. Every other key check is load_into's."""
    state, seen, where = {}, {}, {}
    for path in paths:
        meta = read_metadata(path)
        if "stage" not in meta or "num_stages" not in meta:
            raise CheckpointError(f"{path}: not a pipeline stage shard (no stage/num_stages metadata)")
        stage = int(meta["stage"])
        if stage in seen:
            raise CheckpointError(f"{path}: stage {stage} already read from {seen[stage][0]}")
        seen[stage] = (path, meta)
        for key, t in read_file(path).items():
            if key in where:
                raise CheckpointError(f"key {key} in both {where[key]} and {path}")
            where[key], state[key] = path, t
    counts = {meta["num_stages"] for _, meta in seen.values()}
    if len(counts) != 1 or sorted(seen) != list(range(int(counts.pop()))):
        raise CheckpointError("shards must be stages 0..p-1 of one run, got " +
                              ", ".join(f"{p}: stage {s} of {m['num_stages']}" for s, (p, m) in sorted(seen.items())))
    steps = {m.get("step") for _, m in seen.values()}
    if len(steps) != 1:
        raise CheckpointError("shards from different steps: " +
                              ", ".join(f"{p}: step {m.get('step')}" for _, (p, m) in sorted(seen.items())))
    layers = {int(k.split(".")[2]) for k in state if k.startswith("llm.layers.")}
    if layers != set(range(len(layers))):
        raise CheckpointError(f"decoder blocks {sorted(layers)} have a gap")
    return state, seen[0][1]
