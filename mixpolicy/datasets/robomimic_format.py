"""Import robomimic HDF5 datasets (needs h5py, the ``interop`` extra).

robomimic's layout::

    data                  attrs: env_args (JSON: env_name, env_kwargs incl. control_freq), total
    data/demo_<i>         attrs: num_samples
    data/demo_<i>/actions (T, A)
    data/demo_<i>/obs/<key>  (T, ...)   low-dim float arrays, uint8 (H, W, C) camera images
    mask/<filter>         names of the demos in a subset (e.g. train, valid)

Every demo becomes one episode (task: the env name, success: true, as robomimic demos are
successful demonstrations); keys keep their robomimic names, the actions become ``action``.
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
                data = {k: np.asarray(g["obs"][k][:]) for k in keys}
                data["action"] = np.asarray(g["actions"][:], np.float32)
                n = len(data["action"])
                for k in keys:
                    if len(data[k]) != n:
                        raise UserError(f"{src}: demo {d} has {len(data[k])} rows of obs/{k} but {n} actions")
                    if tuple(data[k].shape[1:]) != specs[k].shape:
                        raise UserError(f"{src}: demo {d} obs/{k} has step shape {data[k].shape[1:]}, {demos[0]} has {specs[k].shape}")
                    data[k] = data[k].astype(specs[k].dtype, copy=False)
                buffer.add_episode(data, task=env_name, success=True, seed=-1)
    return ReplayBuffer.open(dst)
