"""Import robomimic HDF5 datasets (needs h5py, the ``interop`` extra).

robomimic's layout::

    data                  attrs: env_args (JSON: env_name, env_kwargs incl. control_freq), total
    data/demo_<i>         attrs: num_samples
    data/demo_<i>/actions (T, A)
    data/demo_<i>/obs/<key>  (T, ...)   low-dim float arrays, uint8 (H, W, C) camera images
    mask/<filter>         names of the demos in a subset (e.g. train, valid)

Every demo becomes one episode (task: the env name, success: true, as robomimic demos are
successful demonstrations); keys keep their robomimic names, the actions become ``action``.

The file is untrusted input: external links, datasets stored in external files and virtual
datasets (each of which can make HDF5 read other local files into the store) are refused
before anything is read, and so is a demo larger than ``max_episode_bytes``; each dataset
is read in blocks of rows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mixpolicy.datasets.replay_buffer import DatasetMeta, KeySpec, ReplayBuffer
from mixpolicy.errors import UserError
from mixpolicy.utils import staged_output


def _h5py():
    try:
        import h5py
    except ImportError:
        raise UserError("robomimic import needs h5py: pip install 'mixpolicy[interop]'") from None
    return h5py


MAX_EPISODE_BYTES = 4 << 30
READ_BLOCK_BYTES = 64 << 20


def _check_local(h5py, f) -> None:
    """Refuse external links, external storage and virtual datasets anywhere in ``f``."""

    def problem(path: str, link) -> str | None:  # a returned message stops the walk
        if isinstance(link, h5py.ExternalLink):
            return f"HDF5 /{path} is an external link to {link.filename}:{link.path}"
        if isinstance(link, h5py.SoftLink):
            return None  # a name for another object of this file, which the walk checks itself
        node = f.get(path)
        if isinstance(node, h5py.Dataset):
            if node.is_virtual:
                return f"HDF5 dataset /{path} is virtual (maps other files)"
            if node.external:
                return f"HDF5 dataset /{path} is stored in the external file {node.external[0][0]!r}"
        return None

    found = f.visititems_links(problem)  # every link once, without following external ones
    if found:
        raise UserError(f"{found}; only self-contained files are imported")


def _read_rows(dataset, dtype) -> np.ndarray:
    """The whole dataset as ``dtype``, read in blocks of rows (no second full-size copy)."""
    out = np.empty(dataset.shape, dtype)
    step_bytes = max(1, int(np.prod(dataset.shape[1:], dtype=np.int64)) * dataset.dtype.itemsize)
    block = max(1, READ_BLOCK_BYTES // step_bytes)
    for lo in range(0, dataset.shape[0], block):
        out[lo : lo + block] = dataset[lo : lo + block]
    return out


def _demo_order(name: str) -> tuple[int, str]:
    m = re.fullmatch(r"demo_(\d+)", name)
    return (int(m.group(1)) if m else 1 << 62, name)


def import_robomimic(
    src: str | Path,
    dst: str | Path,
    obs_keys: list[str] | None = None,
    filter_key: str = "",
    overwrite: bool = False,
    progress: bool = True,
    max_episode_bytes: int = MAX_EPISODE_BYTES,
) -> ReplayBuffer:
    """Convert a robomimic HDF5 file into a mixpolicy zarr store at ``dst``."""
    h5py = _h5py()
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise UserError(f"robomimic HDF5 not found: {src}")
    if dst.exists() and not overwrite:
        raise UserError(f"output {dst} already exists (pass overwrite=true to replace it)")
    try:
        f = h5py.File(src, "r")
    except OSError as exc:
        raise UserError(f"not a readable HDF5 file: {src} ({exc})") from None
    with f:
        _check_local(h5py, f)
        if "data" not in f:
            raise UserError(f"{src} is not a robomimic dataset: no 'data' group")
        demos = sorted((k for k in f["data"].keys() if isinstance(f["data"][k], h5py.Group)), key=_demo_order)
        if filter_key:
            if f"mask/{filter_key}" not in f:
                have = sorted(f["mask"].keys()) if "mask" in f else []
                raise UserError(f"{src} has no filter key {filter_key!r} (has {have})")
            chosen = {n.decode() if isinstance(n, bytes) else str(n) for n in f[f"mask/{filter_key}"][:]}
            demos = [d for d in demos if d in chosen]
        if not demos:
            raise UserError(f"{src} holds no demos under 'data'")
        first = f["data"][demos[0]]
        for d in demos:
            if "actions" not in f["data"][d]:
                raise UserError(f"{src}: demo {d} has no 'actions' dataset")
            if "obs" not in f["data"][d]:
                raise UserError(f"{src}: demo {d} has no 'obs' group")
        available = sorted(first["obs"].keys())
        keys = list(obs_keys) if obs_keys else available
        missing = sorted(set(keys) - set(available))
        if missing:
            raise UserError(f"{src}: obs key(s) {missing} not in the demos (has {available})")
        env_args = {}
        if "env_args" in f["data"].attrs:
            try:
                env_args = json.loads(f["data"].attrs["env_args"])
            except (TypeError, json.JSONDecodeError):
                env_args = {}
        env_name = str(env_args.get("env_name") or "unknown")
        fps = float((env_args.get("env_kwargs") or {}).get("control_freq", 20))
        specs = {}
        for k in keys:
            arr = first["obs"][k]
            dtype = "uint8" if arr.dtype == np.uint8 else "float32"
            specs[k] = KeySpec(tuple(int(s) for s in arr.shape[1:]), dtype)
        specs["action"] = KeySpec(tuple(int(s) for s in first["actions"].shape[1:]), "float32")
        meta = DatasetMeta(
            fps=fps,
            obs_keys=keys,
            action_key="action",
            source=f"robomimic: {src.name}",
            specs=specs,
            task_descriptions={env_name: env_name},
        )
        with staged_output(dst) as tmp:
            buffer = ReplayBuffer.create(tmp, meta, overwrite=True)
            for d in tqdm(demos, desc="import robomimic", unit="demo", disable=not progress):
                g = f["data"][d]
                arrays = {k: g["obs"][k] for k in keys}
                arrays["action"] = g["actions"]
                n = arrays["action"].shape[0] if arrays["action"].ndim else 0
                size = 0
                for k, arr in arrays.items():
                    name = "actions" if k == "action" else f"obs/{k}"
                    if arr.ndim == 0 or arr.shape[0] != n:
                        raise UserError(f"{src}: demo {d} has {arr.shape[0] if arr.ndim else 0} rows of {name} but {n} actions")
                    if tuple(arr.shape[1:]) != specs[k].shape:
                        raise UserError(f"{src}: demo {d} {name} has step shape {arr.shape[1:]}, {demos[0]} has {specs[k].shape}")
                    if arr.dtype.kind not in "biuf":
                        raise UserError(f"{src}: demo {d} {name} has dtype {arr.dtype}, not numbers")
                    size += n * int(np.prod(specs[k].shape, dtype=np.int64)) * np.dtype(specs[k].dtype).itemsize
                if size > max_episode_bytes:
                    raise UserError(f"{src}: demo {d} holds {size} bytes, over max_episode_bytes={max_episode_bytes}")
                data = {k: _read_rows(arr, specs[k].dtype) for k, arr in arrays.items()}
                buffer.add_episode(data, task=env_name, success=True, seed=-1)
            buffer.close()
    return ReplayBuffer.open(dst)
