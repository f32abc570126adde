"""The subprocess backend's child: config as JSON, output drained past a pipe's 64 KiB, gone with its parent."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from mixpolicy.deploy.remote import RemotePolicyError
from mixpolicy.deploy.rti import RTIConfig
from mixpolicy.deploy.subprocess_backend import SubprocessPolicy
from mixpolicy.errors import UserError
from mixpolicy.policies.checkpoint import save_policy
from mixpolicy.policies.denoising_policy import DenoisingPolicy
from factories import server_shape_meta, tiny_policy_config

pytestmark = pytest.mark.slow

PIPE_BYTES = 64 << 10


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    policy = DenoisingPolicy(tiny_policy_config(horizon=6, n_action_steps=3), server_shape_meta())
    return str(save_policy(policy, tmp_path_factory.mktemp("ckpt") / "tiny"))


def obs():
    return {"state": np.zeros((2, 5), np.float32)}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_child_keeps_answering_after_more_than_a_pipe_of_output(checkpoint):
    client = SubprocessPolicy(checkpoint, RTIConfig(k=1), device="cpu", timeout_s=10, log_level="debug")
    try:
        for i in range(1500):  # each rejected request is one debug line of the child's output
            with pytest.raises(RemotePolicyError, match="out of range"):
                client.infer(obs(), 2 + i, None)
        assert client.infer(obs(), 1, None).actions.shape == (6, 3)
        assert client.output_bytes > 2 * PIPE_BYTES, client.output_bytes
        assert "rejected a request" in client.output_tail[-1]
    finally:
        client.close()
    assert client._proc.poll() is not None


def test_child_config_errors_are_one_line(checkpoint):
    with pytest.raises(UserError, match="the policy server process did not start: .*rti.k=9 exceeds the schedule"):
        SubprocessPolicy(checkpoint, RTIConfig(k=9), device="cpu")


PARENT = """
import sys, time
from mixpolicy.deploy.rti import RTIConfig
from mixpolicy.deploy.subprocess_backend import SubprocessPolicy
client = SubprocessPolicy(sys.argv[1], RTIConfig(k=1), device="cpu", timeout_s=10)
print(client.pid, flush=True)
time.sleep(120)
"""


def test_killing_the_parent_kills_the_child(checkpoint):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, checkpoint], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    child = None
    try:
        child = int(parent.stdout.readline())
        assert alive(child)
        parent.send_signal(signal.SIGKILL)  # no cleanup code runs in the parent
        parent.wait(10)
        for _ in range(200):
            if not alive(child):
                break
            time.sleep(0.05)
        assert not alive(child)
    finally:
        if parent.poll() is None:
            parent.kill()
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)
        parent.stdout.close()
