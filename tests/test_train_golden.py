"""Training losses of a few fixed-seed steps, compared with values recorded before the
trainer was split into modules (tests/goldens/train_losses.json).

Regenerate (only when a change of the numbers is intended):
``PYTHONPATH=. python tests/test_train_golden.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mixpolicy.config import from_dict  # noqa: E402
from mixpolicy.train.trainer import TrainConfig, Trainer  # noqa: E402
from factories import make_dataset, make_small_policy_dict  # noqa: E402

GOLDEN = Path(__file__).parent / "goldens" / "train_losses.json"
SMALL = make_small_policy_dict()
CASES = {
    "dit": dict(policy=SMALL),
    "dit_accum2_seed3": dict(policy=SMALL, grad_accum_steps=2, seed=3),
    "mode": dict(policy={**SMALL, "type": "mode", "network": dict(width=32, depth=1, heads=2, num_experts=4, top_k=2)}),
    "dit_moh_flow": dict(policy={**SMALL, "type": "dit_moh", "moh": dict(horizons=[2, 4]), "objective": dict(name="flow", num_inference_steps=2, solver="euler")}),
}


def run_case(tmp: Path, name: str) -> dict[str, list[float]]:
    make_dataset(tmp / "d.zarr", lengths=(30, 25, 40, 33))
    d = dict(dataset=str(tmp / "d.zarr"), out_dir=str(tmp / name), steps=4, batch_size=8, log_every=1, progress=False, warmup_steps=2, num_threads=1)
    d.update(CASES[name])
    Trainer(from_dict(TrainConfig, d)).run()
    records = [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    return {"loss": [r["loss"] for r in train], "grad_norm": [r["grad_norm"] for r in train]}


@pytest.mark.parametrize("name", sorted(CASES))
def test_training_losses_match_the_recorded_values(tmp_path, name):
    golden = json.loads(GOLDEN.read_text())[name]
    got = run_case(tmp_path, name)
    np.testing.assert_allclose(got["loss"], golden["loss"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(got["grad_norm"], golden["grad_norm"], rtol=1e-5, atol=0)


if __name__ == "__main__":
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(CASES):
            case_dir = Path(tmp) / name
            case_dir.mkdir()
            out[name] = run_case(case_dir, name)
    GOLDEN.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {GOLDEN}")
