"""
Public checkpoints in, our checkpoint out.

Reads HF checkpoint directories (single or sharded safetensors with the index json, or .bin
shards), single .safetensors / .bin / .pth files, renames keys through one readable table per
model family, checks every key and shape before copying anything, and writes our own format:
a directory with `model.safetensors` + `config.json`.

    python convert.py qwen2 ~/hf/Qwen2.5-0.5B-Instruct out/qwen2.5-0.5b
    python convert.py qwen1 ~/hf/Qwen-7B-Chat out/qwen7b-chat
    python convert.py phi   ~/hf/phi-2 out/phi-2

Safetensors are parsed here (an 8-byte header length, a JSON header, raw bytes) and memory-mapped,
so loading a model built on the meta device costs about the size of the weights in RAM.
"""
import json
import os
import pickle
import re
import sys

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as-is; the message names the file or keys."""


# ----------------------------------------------------------------------------- reading

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def _read_safetensors(path):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or 8 + n > size:
            raise CheckpointError(f"{path}: truncated or not a safetensors file (header needs {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    end = max((h["data_offsets"][1] for h in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: tensors need {8 + n + end} bytes, file has {size}")
    # shared=False maps the file copy-on-write: pages are read lazily and the file is never written
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)
    out = {}
    for key, h in header.items():
        if h["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {h['dtype']}")
        a, b = h["data_offsets"]
        raw = torch.empty(0, dtype=torch.uint8).set_(storage, 8 + n + a, (b - a,))
        dtype = _ST_DTYPES[h["dtype"]]
        if (8 + n + a) % dtype.itemsize:  # the format does not promise alignment
            raw = raw.clone()
        out[key] = raw.view(dtype).view(h["shape"])
    return out


def _read_torch(path):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
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


def _read_file(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    return _read_safetensors(path) if path.endswith(".safetensors") else _read_torch(path)


def _hf_files(d):
    """The weight files of an HF checkpoint directory, with the key -> file map if sharded."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if os.path.exists(os.path.join(d, index)):
            with open(os.path.join(d, index)) as f:
                weight_map = json.load(f)["weight_map"]
            return sorted(set(weight_map.values())), weight_map
        if os.path.exists(os.path.join(d, single)):
            return [single], None
    raise CheckpointError(f"{d}: no model.safetensors[.index.json] or pytorch_model.bin[.index.json]")


def read_state_dict(path):
    """All tensors of a checkpoint file or HF directory, memory-mapped where the format allows."""
    if not os.path.isdir(path):
        return _read_file(path)
    files, weight_map = _hf_files(path)
    state = {}
    for name in files:
        part = _read_file(os.path.join(path, name))
        dup = state.keys() & part.keys()
        if dup:
            raise CheckpointError(f"{path}/{name}: keys also present in another shard: {sorted(dup)[:5]}")
        if weight_map is not None:
            listed = {k for k, v in weight_map.items() if v == name}
            if listed != part.keys():
                raise CheckpointError(f"{path}/{name}: shard does not match the index: missing "
                                      f"{sorted(listed - part.keys())[:5]}, unlisted {sorted(part.keys() - listed)[:5]}")
        state.update(part)
    return state


# ----------------------------------------------------------------------------- renaming and loading

def split(*targets, dim=0):
    """A remap rule target: cut a fused tensor into equal chunks along `dim`, one per target name."""
    def fn(match, t):
        return {match.expand(name): c for name, c in zip(targets, t.chunk(len(targets), dim))}
    return fn


def remap(src, rules, ignore=()):
    """Rename src keys with `rules` [(regex, target)], first full match wins; target is a
    replacement string (\\1 = group) or fn(match, tensor) -> {name: tensor}. Every key must match
    a rule or an `ignore` regex."""
    out, unknown = {}, []
    for key, t in src.items():
        for pattern, target in rules:
            m = re.fullmatch(pattern, key)
            if m:
                new = {m.expand(target): t} if isinstance(target, str) else target(m, t)
                clash = out.keys() & new.keys()
                if clash:
                    raise CheckpointError(f"two source keys map to {sorted(clash)}")
                out.update(new)
                break
        else:
            if not any(re.fullmatch(p, key) for p in ignore):
                unknown.append(key)
    if unknown:
        raise CheckpointError(f"unexpected keys (no rename rule, not ignored): {sorted(unknown)[:10]}"
                              + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
    return out


def _aliases(module):
    """{alias key: canonical key} for parameters shared by two names (tied embeddings)."""
    seen, alias = {}, {}
    for key, t in module.state_dict(keep_vars=True).items():
        if id(t) in seen:
            alias[key] = seen[id(t)]
        else:
            seen[id(t)] = key
    return alias


def _few(keys):
    keys = sorted(keys)
    return ", ".join(keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")


def load_into(module, state):
    """Load `state` into `module` after checking every key and shape. Tied aliases may be absent.
    Parameters on the meta device are replaced by the (memory-mapped) tensors themselves."""
    own = module.state_dict(keep_vars=True)
    alias = _aliases(module)
    missing = own.keys() - state.keys() - alias.keys()
    unexpected = state.keys() - own.keys()
    wrong = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own.keys() & state.keys() if state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        msg = [f"missing keys: {_few(missing)}" if missing else "",
               f"unexpected keys: {_few(unexpected)}" if unexpected else "",
               f"shape mismatch: {_few(wrong)}" if wrong else ""]
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
            sub = module.get_submodule(owner)
            if isinstance(dst, torch.nn.Parameter):
                src = torch.nn.Parameter(src, requires_grad=dst.requires_grad)
            setattr(sub, name, src)
        for key, canon in alias.items():  # re-tie: point the alias at the (new) canonical tensor
            owner, _, name = key.rpartition(".")
            setattr(module.get_submodule(owner), name, module.get_parameter(canon))
    return module


# ----------------------------------------------------------------------------- our checkpoint format

def _write_safetensors(path, state):
    header, offset = {}, 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # keep tensor data 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for t in state.values():  # streamed tensor by tensor: no second copy of the model
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _write_file(path, content):
    with open(path, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)


def _atomic(path, write):
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(d, model, config_dict, extra=None):
    """Write `d/model.safetensors` (tied aliases stored once) + `d/config.json`; `extra` maps
    further file names to str/bytes contents. Every file is written to a temp name then renamed."""
    os.makedirs(d, exist_ok=True)
    alias = _aliases(model)
    state = {k: v for k, v in model.state_dict().items() if k not in alias}
    _atomic(os.path.join(d, "model.safetensors"), lambda p: _write_safetensors(p, state))
    files = {"config.json": json.dumps(config_dict, indent=2) + "\n", **(extra or {})}
    for name, content in files.items():
        _atomic(os.path.join(d, name), lambda p: _write_file(p, content))


def load_checkpoint(d):
    """(state, config_dict) of a directory written by save_checkpoint."""
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    return read_state_dict(os.path.join(d, "model.safetensors")), config


# --- llm ---

# --- vision ---


if __name__ == "__main__":  # every convert_<kind>(src, dst) above is a CLI kind
    kinds = {name[len("convert_"):]: fn for name, fn in globals().items() if name.startswith("convert_")}
    if len(sys.argv) != 4 or sys.argv[1] not in kinds:
        sys.exit(f"usage: python convert.py {{{'|'.join(kinds)}}} SRC DST")
    kinds[sys.argv[1]](sys.argv[2], sys.argv[3])
    print(f"wrote {sys.argv[3]}")
