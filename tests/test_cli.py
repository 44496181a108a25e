"""main.py as a user runs it: flags, errors, streaming, JSON, prompt files, batches."""

import json
import subprocess
import sys

import pytest
from conftest import OFTEN, ROOT

import convert
import synthetic


def run_main(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def models(pair_dirs):
    target, draft = pair_dirs(OFTEN)
    return ["--model", target, "--draft-model", draft]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    prompts = ["Return the number of items.", "Close the file and flush its buffers to disk.", "Parse the arguments"]
    path.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
    return path, prompts


def one_error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "flag,value",
    [("--num-draft", 0), ("--delta", -0.1), ("--delta", 1.5), ("--temperature", -1), ("--top-p", 0),
     ("--top-p", 1.2), ("--top-k", -1), ("--max-tokens", 0), ("--batch-size", 0)],
)
def test_bad_values_exit_2_with_one_line(models, flag, value):
    line = one_error_line(run_main(*models, flag, value))
    assert flag in line


def test_missing_prompt_file(models, tmp_path):
    assert "prompt-file" in one_error_line(run_main(*models, "--prompt-file", tmp_path / "none.jsonl"))


def test_prompt_file_line_without_prompt(models, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt here"}\n')
    assert "line 2" in one_error_line(run_main(*models, "--prompt-file", bad))


def test_missing_model_names_the_convert_command(tmp_path):
    line = one_error_line(run_main("--model", "t5-nothing", "--draft-model", "t5-small", cwd=tmp_path))
    assert "python convert.py --model t5-nothing" in line


def test_vocabularies_that_differ(models, tmp_path):
    config = synthetic.t5_config(1200, gated=True)
    source = synthetic.save_checkpoint(tmp_path / "hf", config, synthetic.random_weights(config))
    other = convert.convert(str(source), str(tmp_path / "mlx"))
    line = one_error_line(run_main("--model", models[1], "--draft-model", other))
    assert "vocabularies differ" in line


def json_lines(result):
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


STATS_KEYS = {"generated", "drafted", "accepted", "acceptance_rate", "target_calls", "draft_calls", "seconds",
              "tokens_per_second"}


def test_prompt_file_json_matches_regular_decoding(models, prompt_file):
    path, prompts = prompt_file
    speculative = json_lines(run_main(*models, "--prompt-file", path, "--json", "--max-tokens", 20, "--num-draft", 3))
    regular = json_lines(run_main(*models, "--prompt-file", path, "--json", "--max-tokens", 20, "--regular-decode"))
    assert [r["prompt"] for r in speculative] == prompts == [r["prompt"] for r in regular]
    for fast, plain in zip(speculative, regular):
        assert set(fast["stats"]) == STATS_KEYS
        assert fast["tokens"] == plain["tokens"] and fast["text"] == plain["text"]
        assert fast["stats"]["generated"] == len(fast["tokens"])
        assert plain["stats"]["drafted"] == 0


@pytest.mark.parametrize("batch_size", [2, 5])
def test_batches_give_the_same_json_in_input_order(models, prompt_file, batch_size):
    path, prompts = prompt_file
    single = json_lines(run_main(*models, "--prompt-file", path, "--json", "--max-tokens", 20))
    batched = run_main(*models, "--prompt-file", path, "--max-tokens", 20, "--batch-size", batch_size)
    records = json_lines(batched)
    assert [r["prompt"] for r in records] == prompts
    assert [r["tokens"] for r in records] == [r["tokens"] for r in single]
    summary = batched.stderr.strip().splitlines()[-1]
    assert "tokens" in summary and "tok/s" in summary and "acceptance" in summary


def test_streams_text_then_a_summary(models):
    result = run_main(*models, "--prompt", "Return the number of items.", "--max-tokens", 15)
    assert result.returncode == 0, result.stderr
    text, summary = result.stdout.rstrip("\n").rsplit("\n", 1)
    assert text.strip()
    assert summary.startswith("[") and "tok/s" in summary and "acceptance" in summary and "target calls" in summary
    expected = json_lines(run_main(*models, "--prompt", "Return the number of items.", "--max-tokens", 15, "--json"))
    assert text == expected[0]["text"]


def test_sampling_seed_reproduces(models):
    args = [*models, "--prompt", "Close the file.", "--max-tokens", 15, "--temperature", 1.0, "--top-p", 0.9, "--json"]
    first, again = json_lines(run_main(*args, "--seed", 5)), json_lines(run_main(*args, "--seed", 5))
    other = json_lines(run_main(*args, "--seed", 6))
    assert [r["tokens"] for r in again] == [r["tokens"] for r in first]
    assert [r["tokens"] for r in other] != [r["tokens"] for r in first]
