"""openpi's own client (the `openpi-client` package, extra `openpi`) drives a mixpolicy policy through a
Meta-World episode over `mixpolicy serve protocol=openpi`; skipped when the package is not installed."""

import numpy as np
import pytest
import torch

pytest.importorskip("openpi_client", reason="openpi-client is not installed (bash scripts/install_openpi.sh)")
from openpi_client.action_chunk_broker import ActionChunkBroker  # noqa: E402
from openpi_client.websocket_client_policy import WebsocketClientPolicy  # noqa: E402
from websockets.exceptions import InvalidStatus  # noqa: E402

from mixpolicy.datasets.normalizer import Normalizer  # noqa: E402
from mixpolicy.deploy.local import LocalPolicy  # noqa: E402
from mixpolicy.deploy.openpi_protocol import OpenpiConfig, OpenpiProtocol  # noqa: E402
from mixpolicy.deploy.rti import RTIConfig  # noqa: E402
from mixpolicy.deploy.server import PolicyServer  # noqa: E402
from mixpolicy.envs.metaworld_env import MetaWorldEnv  # noqa: E402
from mixpolicy.policies.denoising_policy import DenoisingPolicy, ShapeMeta  # noqa: E402
from factories import tiny_policy_config  # noqa: E402

RTI = RTIConfig(k=2)
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")  # openpi-client's own call


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    norm = Normalizer.from_data({"state": rng.normal(size=(20, 39)), "action": rng.uniform(-1, 1, (20, 4))})
    meta = ShapeMeta(obs={"state": [39]}, action_dim=4, tasks=["reach-v3", "push-v3"], task_descriptions={"reach-v3": "reach the goal position"})
    return DenoisingPolicy(tiny_policy_config(horizon=8, n_action_steps=4), meta, norm).eval()


class Counting(LocalPolicy):
    calls: list = []

    def infer(self, obs, task=0, shift=None):
        res = super().infer(obs, task, shift)
        Counting.calls.append((task, shift, res.warm))
        return res


def test_websocket_client_policy_runs_a_metaworld_episode(policy):
    openpi = OpenpiProtocol(OpenpiConfig(obs_map={"observation/state": "state"}, reset_after_s=30.0), LocalPolicy(policy, RTI).spec)
    Counting.calls = []
    with PolicyServer(lambda: Counting(policy, RTI, seed=5), token="s3cret", openpi=openpi) as server:
        client = WebsocketClientPolicy(host="127.0.0.1", port=server.port, api_key="s3cret")
        meta = client.get_server_metadata()
        assert meta["server"] == "mixpolicy" and meta["action_horizon"] == 8 and meta["n_action_steps"] == 4
        broker = ActionChunkBroker(client, action_horizon=meta["n_action_steps"])  # openpi's runtimes execute chunks so
        env = MetaWorldEnv("reach-v3", max_episode_steps=10)
        obs, _ = env.reset(seed=0)
        first = None
        for step in range(10):
            out = broker.infer({"observation/state": obs["state"], "prompt": "reach the goal position"})
            action = out["actions"]
            assert action.shape == (4,) and np.isfinite(action).all()
            if step == 0:
                first = action
            obs, _, _, truncated, info = env.step(action)
        env.close()
        assert truncated and info["task"] == "reach-v3"
        # 10 steps, 4 actions per chunk: 3 calls; the first cold, then warm with shift = n_action_steps
        assert Counting.calls == [(0, None, False), (0, 4, True), (0, 4, True)]
        # the server's first chunk is the local policy's, action for action
        env = MetaWorldEnv("reach-v3")
        o0, _ = env.reset(seed=0)
        env.close()
        local = LocalPolicy(policy, RTI, seed=5).infer({"state": np.stack([o0["state"]] * 2)}, 0, None)
        np.testing.assert_allclose(first, local.actions[0], rtol=1e-5, atol=1e-6)
        # an error reaches the client as openpi clients surface it: a RuntimeError with the server's message
        with pytest.raises(RuntimeError, match="prompt 'fly' names no task of this policy"):
            client.infer({"observation/state": obs["state"], "prompt": "fly"})
        with pytest.raises(RuntimeError, match=r"has shape \(3,\)"):
            client.infer({"observation/state": np.zeros(3), "prompt": "reach-v3"})
        assert client.infer({"observation/state": obs["state"].astype(np.float64), "prompt": "reach-v3"})["actions"].shape == (8, 4)
        with pytest.raises(InvalidStatus, match="401"):
            WebsocketClientPolicy(host="127.0.0.1", port=server.port, api_key="guess")
