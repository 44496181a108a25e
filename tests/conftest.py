"""Shared fixtures: tiny offline checkpoints (random weights, local tokenizers).

v1, v11, inner_dim: (config, weights) of tiny T5s; v1_checkpoint, v11_checkpoint,
inner_dim_checkpoint: the same saved as Hugging Face folders; tokenizer_dir; pair_dirs
and load_pair: converted speculative pairs.
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The tests' synthetic tokenizers and pairs go to a folder of this session's own (the
# scripts they run inherit it), never into the cache the README's commands read.
os.environ["MLX_T5_SYNTHETIC_CACHE"] = tempfile.mkdtemp(prefix="mlx-t5-tests-")
atexit.register(shutil.rmtree, os.environ["MLX_T5_SYNTHETIC_CACHE"], ignore_errors=True)
# Likewise the step costs main.py keeps (calibration.py): never the user's cache.
os.environ["MLX_T5_STEP_COSTS"] = os.path.join(os.environ["MLX_T5_SYNTHETIC_CACHE"], "step-costs.json")

import cpu_blas  # noqa: E402,F401  (before anything imports MLX)

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests: CI runs a fixed-seed profile sized for the suite's time on a 2-core
# machine; HYPOTHESIS_PROFILE=long runs ten times as many examples, from fresh seeds.
settings.register_profile("ci", max_examples=100, derandomize=True, deadline=None, print_blob=True)
settings.register_profile("long", max_examples=1000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

import convert  # noqa: E402
import model  # noqa: E402
import synthetic  # noqa: E402


def run_script(script, *args, cwd=ROOT, timeout=300):
    """Run one of the project's scripts as a user would; return the finished process."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def one_error_line(result):
    """The single `error: ...` line of a run that must fail with exit code 2 and no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# Tiny T5s (d_model 64, 4 heads, d_ff 128, 2 layers): synthetic.t5_config overrides.
TINY = {
    "v1": dict(gated=False),  # relu, tied head, decoder output scaled by d_model**-0.5
    "v11": dict(gated=True, num_decoder_layers=3),  # gated-gelu, untied head, no scaling
    "inner_dim": dict(gated=False, d_kv=32),  # num_heads * d_kv = 128 != d_model, as in T5-11B
}


def tiny_model(variant):
    """(config, float32 weights in Hugging Face's names) of a TINY variant; the same every call."""
    config = synthetic.t5_config(**TINY[variant])
    return config, synthetic.random_weights(config, seed=sorted(TINY).index(variant) + 1)


@pytest.fixture(scope="session")
def v1():
    return tiny_model("v1")


@pytest.fixture(scope="session")
def v11():
    return tiny_model("v11")


@pytest.fixture(scope="session")
def inner_dim():
    return tiny_model("inner_dim")


@pytest.fixture(scope="session")
def v1_checkpoint(v1, tmp_path_factory):
    """A Hugging Face folder (config.json, model.safetensors, tokenizer) of the tiny v1 T5."""
    return synthetic.save_checkpoint(tmp_path_factory.mktemp("v1"), *v1)


@pytest.fixture(scope="session")
def v11_checkpoint(v11, tmp_path_factory):
    return synthetic.save_checkpoint(tmp_path_factory.mktemp("v11"), *v11)


@pytest.fixture(scope="session")
def inner_dim_checkpoint(inner_dim, tmp_path_factory):
    return synthetic.save_checkpoint(tmp_path_factory.mktemp("inner_dim"), *inner_dim)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A folder holding only the synthetic tokenizer's files."""
    folder = tmp_path_factory.mktemp("tokenizer")
    synthetic.train_tokenizer(folder)
    return folder


# Greedy acceptance (accepted / drafted) of these tiny v1.1 pairs (draft: 1 layer;
# target: 3, d_model 64) on test_decoder's prompts, from num-draft 1 to 8: 0.85 to 0.51
# at eps 0.05, 0.37 to 0.07 at eps 0.5; at eps 0 the target is the draft.
# (v1 pairs with random weights tend to repeat one token, which makes weak tests.)
OFTEN, RARELY = 0.05, 0.5


@pytest.fixture(scope="session")
def pair_dirs(tmp_path_factory):
    """make(eps, family="t5", ...) -> (target folder, draft folder), converted MLX checkpoints, built once each."""
    made = {}

    def make(eps, **overrides):
        key = (eps, tuple(sorted(overrides.items())))
        if key not in made:
            root = tmp_path_factory.mktemp("pair")
            settings = dict(draft_layers=1, target_layers=3, d_model=64)
            if overrides.get("family", "t5") == "t5":
                settings["gated"] = True
            settings.update(overrides)
            draft, target = synthetic.speculative_pair(root / "hf", eps=eps, **settings)
            made[key] = tuple(convert.convert(str(p), str(root / p.name)) for p in (target, draft))
        return made[key]

    return make


@pytest.fixture(scope="session")
def load_pair(pair_dirs):
    """load(eps, **overrides) -> (target, draft, tokenizer), loaded once each."""
    loaded = {}

    def load(eps, **overrides):
        key = (eps, tuple(sorted(overrides.items())))
        if key not in loaded:
            target_dir, draft_dir = pair_dirs(eps, **overrides)
            target, tokenizer = model.load(target_dir)
            loaded[key] = (target, model.load(draft_dir)[0], tokenizer)
        return loaded[key]

    return load
