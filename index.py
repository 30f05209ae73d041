"""
The start-up index's cache file: `<data file>.<key16>.index.npz` beside the data file, where key16
is the start of the sha256 of `key` (a JSON of everything the index depends on: the data file's
content, the tokenizer, the template and the settings), so another key gets another file.

data.build_index validates and tokenizes every row once into numpy arrays; load_index stores them
(atomically, with the key and a checksum over every array) and re-reads them on every later run
and rank. A damaged or half-written file is reported and rebuilt, never used; the first process
to miss holds a lock on the data file while it builds, and the others wait, then read its file.
"""
import fcntl
import hashlib
import warnings
import zipfile

import numpy as np

import ckpt


def digest(chunks):
    """sha256 (hex) of a sequence of bytes or strings (anything else as its str), each length-prefixed."""
    h = hashlib.sha256()
    for c in chunks:
        c = c if isinstance(c, bytes) else str(c).encode()
        h.update(len(c).to_bytes(8, "little") + c)  # length-prefixed: ("ab", "c") is not ("a", "bc")
    return h.hexdigest()


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _checksum(arrays):
    return digest(x for k in sorted(arrays) for x in (k, arrays[k].dtype.str, arrays[k].shape, arrays[k].tobytes()))


def _read_index(path, key):
    """The arrays stored at path if the file is whole (its checksum matches) and was built for `key`,
    else None; a damaged file is reported, never used."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        warnings.warn(f"index cache {path} is unreadable ({type(e).__name__}: {e}); rebuilding it")
        return None
    if str(arrays.pop("checksum", "")) != _checksum(arrays):
        warnings.warn(f"index cache {path} is corrupt (checksum mismatch); rebuilding it")
        return None
    return arrays if str(arrays.pop("key")) == key else None


def load_index(json_path, build, key, cache=True):
    """(arrays, path of the cache file or None, built?): the cache file for `key` beside the data file
    if it is there and whole, else build() and store it (atomically). The first process to miss holds
    a lock on the data file while it builds; the others wait for it, then read its file."""
    if not cache:
        return build(), None, True
    path = f"{json_path}.{hashlib.sha256(key.encode()).hexdigest()[:16]}.index.npz"
    arrays = _read_index(path, key)
    if arrays is not None:
        return arrays, path, False
    with open(json_path, "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        arrays = _read_index(path, key)
        if arrays is not None:
            return arrays, path, False
        arrays = build()
        stored = dict(arrays, key=np.array(key))
        stored["checksum"] = np.array(_checksum(stored))

        def write(p):
            with open(p, "wb") as f:
                np.savez(f, **stored)
        try:
            ckpt.atomic_write(path, write)
        except OSError as e:
            warnings.warn(f"cannot store the index cache {path} ({e}); the next start will build it again")
            path = None
    return arrays, path, True
