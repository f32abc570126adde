"""Record the golden policy outputs that tests/test_goldens.py compares against.

    python tests/goldens/record.py

For every policy preset in configs/policy/ (shrunk to width 32, depth 2 so the file stays
small), with fixed weights and fixed seeds, batch 2: the training loss, the sampled chunk
(MoDE with and without the expert cache), an RTI k=2 warm-started call, and, for mixtures
of horizons, the adaptive execution lengths. The weights are stored too, so the goldens do
not depend on the order in which modules draw their initial values.

The goldens in this folder were recorded on commit 0871273, before the policy was
rebuilt from parts; re-record only when the arithmetic is meant to change.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from golden_cases import PRESETS, build_preset, golden_outputs  # noqa: E402


def main() -> None:
    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, list[str]] = {}
    for name in PRESETS:
        policy = build_preset(name)
        # Fixed weights: a seeded draw of every parameter and normalizer buffer.
        g = torch.Generator().manual_seed(1234)
        state = {}
        for k, v in policy.state_dict().items():
            if v.dtype.is_floating_point:
                if k.startswith("normalizer.") and k.endswith(".scale"):
                    v = 0.5 + 1.5 * torch.rand(v.shape, generator=g)
                elif k.startswith("normalizer."):
                    v = 0.1 * torch.randn(v.shape, generator=g)
                else:
                    v = 0.2 * torch.randn(v.shape, generator=g)
            state[k] = v.clone()
        policy.load_state_dict(state)
        for k, v in state.items():
            tensors[f"{name}/weights/{k}"] = v.contiguous()
        outs = golden_outputs(policy)
        index[name] = sorted(outs)
        for k, v in outs.items():
            tensors[f"{name}/out/{k}"] = v.contiguous()
    save_file(tensors, str(HERE / "presets.safetensors"))
    (HERE / "presets.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(PRESETS)} presets, {len(tensors)} tensors")


if __name__ == "__main__":
    main()
