"""Shared fixtures: tiny offline T5 checkpoints (random weights, local tokenizer)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cpu_blas  # noqa: E402,F401  (before anything imports MLX)

import pytest  # noqa: E402

import convert  # noqa: E402
import model  # noqa: E402
import synthetic  # noqa: E402

# Greedy acceptance of these tiny v1.1 pairs (draft: 1 layer; target: 3, d_model 64)
# is about 0.7 at eps 0.05 and 0.1 at eps 0.5; at eps 0 the target is the draft.
# (v1 pairs with random weights tend to repeat one token, which makes weak tests.)
OFTEN, RARELY = 0.05, 0.5


@pytest.fixture(scope="session")
def pair_dirs(tmp_path_factory):
    """make(eps) -> (target folder, draft folder), converted MLX checkpoints, built once each."""
    made = {}

    def make(eps, **overrides):
        key = (eps, tuple(sorted(overrides.items())))
        if key not in made:
            root = tmp_path_factory.mktemp("pair")
            settings = dict(draft_layers=1, target_layers=3, d_model=64, gated=True)
            settings.update(overrides)
            draft, target = synthetic.speculative_pair(root / "hf", eps=eps, **settings)
            made[key] = tuple(convert.convert(str(p), str(root / p.name)) for p in (target, draft))
        return made[key]

    return make


@pytest.fixture(scope="session")
def load_pair(pair_dirs):
    """load(eps) -> (target, draft, tokenizer), loaded once each."""
    loaded = {}

    def load(eps):
        if eps not in loaded:
            target_dir, draft_dir = pair_dirs(eps)
            target, tokenizer = model.load(target_dir)
            loaded[eps] = (target, model.load(draft_dir)[0], tokenizer)
        return loaded[eps]

    return load
