"""Crafted checkpoints are refused with one line before anything big is built; folder swaps never lose the only copy."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixpolicy import utils
from mixpolicy.errors import UserError
from mixpolicy.policies.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_policy, read_checkpoint_meta, save_policy
from mixpolicy.utils import clean_temporaries, replace_path, resolve_inside
from factories import tiny_policy_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from mixpolicy.policies.denoising_policy import DenoisingPolicy, ShapeMeta

    torch.manual_seed(0)
    policy = DenoisingPolicy(tiny_policy_config(), ShapeMeta(obs={"state": [4]}, action_dim=2, tasks=["a"]))
    return save_policy(policy, tmp_path_factory.mktemp("ckpt") / "ckpt")


def crafted(saved: Path, tmp_path: Path, edit_config=None, edit_weights=None) -> Path:
    out = tmp_path / "crafted"
    out.mkdir(parents=True)
    meta = json.loads((saved / CONFIG_FILE).read_text())
    if edit_config:
        edit_config(meta)
    (out / CONFIG_FILE).write_text(json.dumps(meta))
    state = load_file(str(saved / WEIGHTS_FILE))
    if edit_weights:
        edit_weights(state)
    save_file(state, str(out / WEIGHTS_FILE))
    return out


def refused(path: Path, pattern: str) -> str:
    with pytest.raises(UserError, match=pattern) as info:
        load_policy(path)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_the_saved_checkpoint_loads(saved):
    policy, meta = load_policy(saved)
    assert meta["policy_type"] == "dit" and not policy.training


def test_a_huge_width_is_refused_from_the_header_without_building_it(saved, tmp_path):
    def wide(meta):
        meta["policy"]["network"]["width"] = 1 << 18  # a real build: 2**36 floats per linear layer

    msg = refused(crafted(saved, tmp_path, wide), r"checkpoint weights do not fit its config: \S+ has shape \[32")
    assert "the config implies" in msg and str(1 << 18) in msg


def test_absurd_numbers_and_deep_networks_are_refused(saved, tmp_path):
    for i, (edit, pattern) in enumerate(
        [
            (lambda m: m["policy"]["network"].__setitem__("width", 10**12), r"policy.network.width = 1000000000000 is beyond any real policy"),
            (lambda m: m["shape_meta"].__setitem__("action_dim", 1 << 40), r"shape_meta.action_dim = .* is beyond any real policy"),
            (lambda m: m["policy"]["network"].__setitem__("depth", 100_000), r"more than \d+ tensors"),
            (lambda m: m["policy"]["objective"].__setitem__("sigma_data", float("nan")), r"policy.objective.sigma_data is nan"),
        ]
    ):
        refused(crafted(saved, tmp_path / str(i), edit), pattern)


def test_a_policy_type_that_differs_from_the_config_is_refused(saved, tmp_path):
    path = crafted(saved, tmp_path, lambda m: m.__setitem__("policy_type", "mode"))
    refused(path, r"policy_type 'mode' differs from its config's type 'dit'")
    with pytest.raises(UserError, match="differs from its config's type"):
        read_checkpoint_meta(path)


@pytest.mark.parametrize("value, pattern", [(float("nan"), "NaN or infinite scale"), (0.0, "zero scale")])
def test_bad_normalizer_values_are_refused(saved, tmp_path, value, pattern):
    def damage(state):
        key = next(k for k in state if "normalizer" in k and k.endswith("action.scale"))
        state[key][0] = value

    refused(crafted(saved, tmp_path, edit_weights=damage), rf"normalizer 'action' has a {pattern}")


def test_a_weights_file_linking_out_of_the_checkpoint_is_refused(saved, tmp_path):
    path = crafted(saved, tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(path / WEIGHTS_FILE, outside)
    (path / WEIGHTS_FILE).symlink_to(outside)
    refused(path, r"links to .*elsewhere.safetensors, outside the checkpoint folder")


def test_resolve_refuses_links_out_of_the_run_folder(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    (root / "step_00000010").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (root / "last").symlink_to("step_00000010")
    assert resolve_inside(root, "last") == root / "step_00000010"
    assert resolve_inside(root, "best") is None
    for target in (str(tmp_path / "secret"), "../../secret"):
        (root / "best").unlink(missing_ok=True)
        (root / "best").symlink_to(target)
        with pytest.raises(UserError, match=r"best links to .*secret, outside .*checkpoints; refusing to follow it"):
            resolve_inside(root, "best")


def test_save_flushes_files_and_folders_before_the_rename(saved, tmp_path, monkeypatch):
    policy, _ = load_policy(saved)
    synced = []
    real = os.fsync
    monkeypatch.setattr(utils.os, "fsync", lambda fd: synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name) or real(fd))
    save_policy(policy, tmp_path / "again")
    assert {CONFIG_FILE, WEIGHTS_FILE, tmp_path.name} <= set(synced)
    assert load_policy(tmp_path / "again")[1]["policy_type"] == "dit"


def folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "f.txt").write_text(text)
    return path


def test_replace_path_swaps_folders_and_a_crash_midway_keeps_the_only_copy(tmp_path, monkeypatch):
    dst = folder(tmp_path / "step", "old")
    replace_path(folder(tmp_path / ".tmp-step", "new"), dst)  # one atomic exchange
    assert (dst / "f.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["step"]

    # where the exchange is unsupported: rename aside, then rename into place; crash in between
    monkeypatch.setattr(utils, "_exchange", lambda a, b: False)
    real, calls = os.replace, []

    def crash_on_second(a, b):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies here
        real(a, b)

    monkeypatch.setattr(utils.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        replace_path(folder(tmp_path / ".tmp-step2", "newer"), dst)
    monkeypatch.setattr(utils.os, "replace", real)
    assert not dst.exists() and (tmp_path / ".replaced-step" / "f.txt").read_text() == "new"
    clean_temporaries(tmp_path, (".tmp-", ".old-"))  # what a restarted run does first
    assert (dst / "f.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["step"]
    replace_path(folder(tmp_path / ".tmp-step3", "newest"), dst)
    assert (dst / "f.txt").read_text() == "newest" and sorted(p.name for p in tmp_path.iterdir()) == ["step"]
