"""Optional tier: against the real lerobot package (scripts/install_lerobot.sh installs it).

Skipped with a reason where lerobot is not importable; the format tests in
test_data_interop.py run everywhere and need only pyarrow.
"""

import numpy as np
import pytest

lerobot_dataset = pytest.importorskip(
    "lerobot.datasets.lerobot_dataset", reason="lerobot is not installed (optional: bash scripts/install_lerobot.sh)"
)

from mixpolicy.datasets.lerobot_format import export_lerobot, import_lerobot  # noqa: E402
from test_data_layer import make_image_dataset  # noqa: E402


def test_import_a_dataset_written_by_lerobot(tmp_path):
    features = {
        "observation.state": {"dtype": "float32", "shape": (4,), "names": None},
        "action": {"dtype": "float32", "shape": (2,), "names": None},
        "observation.images.cam": {"dtype": "image", "shape": (16, 16, 3), "names": ["height", "width", "channels"]},
    }
    ds = lerobot_dataset.LeRobotDataset.create("local/test", fps=10, features=features, root=tmp_path / "lr", use_videos=False, robot_type="sim")
    for e in range(3):
        for t in range(4 + e):
            ds.add_frame({
                "observation.state": np.full(4, 100 * e + t, np.float32),
                "action": np.array([t, e], np.float32),
                "observation.images.cam": np.full((16, 16, 3), 10 * e + t, np.uint8),
                "task": f"task {e % 2}",
            })
        ds.save_episode()
    ds.finalize()
    buf = import_lerobot(tmp_path / "lr", tmp_path / "out.zarr", progress=False)
    assert buf.episode_lengths.tolist() == [4, 5, 6]
    assert buf.episode_tasks == ["task 0", "task 1", "task 0"]
    ep = buf.get_episode(2)
    np.testing.assert_array_equal(ep["state"][:, 0], 200 + np.arange(6))
    np.testing.assert_array_equal(ep["image_cam"][:, 7, 7, 2], 20 + np.arange(6))
    np.testing.assert_array_equal(ep["action"][:, 1], 2)


def test_lerobot_loads_our_export_with_the_same_windows(tmp_path):
    store = make_image_dataset(tmp_path / "d.zarr", size=8)
    export_lerobot(store, tmp_path / "lr", progress=False)
    ds = lerobot_dataset.LeRobotDataset(
        "local/export", root=tmp_path / "lr", delta_timestamps={"observation.state": [-0.1, 0.0], "action": [0.0, 0.1, 0.2]}
    )
    assert ds.num_episodes == 4 and len(ds) == 26 and ds.fps == 10
    item = ds[6]  # episode 1, frame 0
    np.testing.assert_array_equal(item["observation.state"][:, 0].numpy(), [100, 100])  # edge-padded history
    np.testing.assert_array_equal(item["action"].numpy(), store.get_episode(1)["action"][:3])
    image = store.get_episode(1)["image_cam"][0]
    np.testing.assert_allclose(item["observation.images.cam"].numpy(), image.transpose(2, 0, 1) / 255.0, atol=1e-6)
    assert item["task"] == "t1"
