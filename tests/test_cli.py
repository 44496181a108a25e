"""main.py as a user runs it: flags, errors, streaming, JSON, prompt files, batches."""

import json
import signal
import subprocess
import sys

import pytest
from conftest import OFTEN, ROOT, one_error_line, run_script

import convert
import main
import synthetic

PROMPTS = ["Return the number of items.", "Close the file and flush its buffers to disk.", "Parse the arguments"]
MAX_TOKENS = 20
STATS_KEYS = {"generated", "drafted", "accepted", "acceptance_rate", "target_calls", "draft_calls", "seconds",
              "tokens_per_second"}


def run_main(*args, cwd=ROOT):
    return run_script("main.py", *args, cwd=cwd)


def json_lines(result):
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def models(pair_dirs):
    target, draft = pair_dirs(OFTEN)
    return ["--model", target, "--draft-model", draft]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    return write_lines(path, [json.dumps({"prompt": p, "id": i}) for i, p in enumerate(PROMPTS)])


@pytest.fixture(scope="module")
def regular(models, prompt_file):
    """The target's own greedy output for each prompt: the reference for the speculative runs.

    The draft named here does not exist: --regular-decode must not load one.
    """
    return json_lines(run_main(models[0], models[1], "--draft-model", "no-such-draft", "--regular-decode",
                               "--prompt-file", prompt_file, "--json", "--max-tokens", MAX_TOKENS))


def test_defaults_are_the_documented_ones():
    args = main.parse_args([])
    assert (args.model, args.draft_model, args.num_draft, args.delta, args.max_tokens) == ("t5-11b", "t5-small", 5,
                                                                                            0.0, 100)
    assert (args.temperature, args.top_k, args.top_p, args.seed) == (0.0, 0, 1.0, 0)
    assert not args.regular_decode and not args.json and args.prompt_file is None and args.prompt is None


def test_help_explains_every_flag_and_shows_its_default():
    result = run_main("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps lines, at spaces and hyphens
    for action in main.build_parser()._actions:
        assert action.help and "".join(action.help.split()) in "".join(text.split()), action.option_strings
    for default in ("(default: t5-11b)", "(default: t5-small)", "(default: 100)", "(default: 5)", "(default: 0.0)",
                    f"(default: {main.DEFAULT_PROMPT!r})"):
        assert default in text, default


@pytest.mark.parametrize(
    "flag,value",
    [("--num-draft", 0), ("--delta", -0.1), ("--delta", 1.5), ("--delta", "nan"), ("--temperature", -1),
     ("--top-p", 0), ("--top-p", 1.2), ("--top-k", -1), ("--max-tokens", 0), ("--seed", -1), ("--batch-size", 0)],
)
def test_bad_values_exit_2_with_one_line(models, flag, value):
    line = one_error_line(run_main(*models, flag, value))
    assert flag in line


@pytest.mark.parametrize("args,message", [
    (["--num-draft", "two"], "argument --num-draft: invalid int value: 'two'"),
    (["--max-tokens", "1.5"], "argument --max-tokens: invalid int value: '1.5'"),
    (["--temperature", "inf"], "--temperature must be finite"),
    (["--temperature", "nan"], "--temperature must be finite"),
    (["--delta"], "argument --delta: expected one argument"),
    (["--d", "1"], "ambiguous option: --d could match --draft-model"),
    (["--fast"], "unrecognized arguments: --fast"),
    (["--prompt", "a", "--prompt-file", "prompts.jsonl"], "give --prompt or --prompt-file, not both"),
    (["--model", ""], "--model and --draft-model must not be empty"),
])
def test_bad_flags_exit_2_with_one_line(models, args, message):
    assert message in one_error_line(run_main(*models, *args))


def test_missing_prompt_file(models, tmp_path):
    assert "prompt-file" in one_error_line(run_main(*models, "--prompt-file", tmp_path / "none.jsonl"))


@pytest.mark.parametrize(
    "lines,message",
    [(['{"prompt": "fine"}', '{"text": "no prompt here"}'], "line 2"),
     (['{"prompt": "fine"}', "", "not json"], "line 3"),
     (['["prompt"]'], "line 1"),
     (['{"prompt": null}'], "line 1"),
     ([], "no prompts")],
)
def test_bad_prompt_file_lines(models, tmp_path, lines, message):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    assert message in one_error_line(run_main(*models, "--prompt-file", path))


def test_prompt_file_that_is_not_text(models, tmp_path):
    path = tmp_path / "binary.jsonl"
    path.write_bytes(b'\xff\xfe{"prompt": "x"}\n')
    assert "UTF-8" in one_error_line(run_main(*models, "--prompt-file", path))


def test_missing_models_name_the_convert_command(models, tmp_path):
    # The defaults, resolved under mlx_models/ of the working directory, where there are none.
    line = one_error_line(run_main(cwd=tmp_path))
    assert "'t5-11b' and 't5-small' not found" in line
    assert "convert first: python convert.py --model t5-11b && python convert.py --model t5-small; " in line
    assert "see it work offline first: python benchmark.py" in line  # the way in without models
    line = one_error_line(run_main(*models[:2], cwd=tmp_path))
    assert "model 't5-small' not found" in line and "t5-11b" not in line


def test_prompt_file_that_is_a_folder(models, tmp_path):
    assert "Is a directory" in one_error_line(run_main(*models, "--prompt-file", tmp_path))


def test_vocabularies_that_differ(models, tmp_path):
    config = synthetic.t5_config(1200, gated=True)
    source = synthetic.save_checkpoint(tmp_path / "hf", config, synthetic.random_weights(config))
    other = convert.convert(str(source), str(tmp_path / "mlx"))
    line = one_error_line(run_main("--model", models[1], "--draft-model", other))
    assert "vocabularies differ" in line


def test_regular_decoding_json(regular):
    assert [r["prompt"] for r in regular] == PROMPTS
    for record in regular:
        assert set(record) == {"prompt", "text", "tokens", "stats"} and set(record["stats"]) == STATS_KEYS
        assert record["stats"]["drafted"] == record["stats"]["draft_calls"] == 0
        assert record["stats"]["target_calls"] == record["stats"]["generated"] == len(record["tokens"])


def test_prompt_file_json_matches_regular_decoding(models, prompt_file, regular):
    """With the constant schedule: on a busy machine the adaptive one may rightly choose not to draft."""
    speculative = json_lines(run_main(*models, "--prompt-file", prompt_file, "--json", "--max-tokens", MAX_TOKENS,
                                      "--num-draft", 3, "--draft-schedule", "constant"))
    assert [r["prompt"] for r in speculative] == PROMPTS
    for fast, plain in zip(speculative, regular):
        assert set(fast["stats"]) == STATS_KEYS
        assert fast["tokens"] == plain["tokens"] and fast["text"] == plain["text"]
        assert fast["stats"]["generated"] == len(fast["tokens"])
        assert fast["stats"]["drafted"] > 0 and fast["stats"]["target_calls"] < len(fast["tokens"])


@pytest.mark.parametrize("batch_size", [2, 5])
def test_batches_give_the_same_json_in_input_order(models, prompt_file, regular, batch_size):
    batched = run_main(*models, "--prompt-file", prompt_file, "--max-tokens", MAX_TOKENS, "--batch-size", batch_size)
    records = json_lines(batched)
    assert [r["prompt"] for r in records] == PROMPTS
    assert [r["tokens"] for r in records] == [r["tokens"] for r in regular]
    summary = batched.stderr.strip().splitlines()[-1]
    assert "tokens" in summary and "tok/s" in summary and "acceptance" in summary


def test_streams_text_then_a_summary(models, regular):
    result = run_main(*models, "--prompt", PROMPTS[0], "--max-tokens", MAX_TOKENS)
    assert result.returncode == 0, result.stderr
    text, summary = result.stdout.rstrip("\n").rsplit("\n", 1)
    assert text == regular[0]["text"] and text.strip()
    assert summary.startswith("[") and "tok/s" in summary and "acceptance" in summary and "target calls" in summary


def test_sampling_seed_reproduces_and_prompts_draw_independently(models, tmp_path):
    """With the constant schedule: the adaptive one's choices of k depend on measured times."""
    same_prompt = write_lines(tmp_path / "twice.jsonl", [json.dumps({"prompt": "Close the file."})] * 2)
    args = [*models, "--prompt-file", same_prompt, "--max-tokens", 15, "--temperature", 1.0, "--top-p", 0.9, "--json",
            "--seed", 5, "--draft-schedule", "constant"]
    first, again = json_lines(run_main(*args)), json_lines(run_main(*args))
    assert [r["tokens"] for r in again] == [r["tokens"] for r in first]
    assert first[0]["tokens"] != first[1]["tokens"]


def test_reader_that_stops_early_gets_no_traceback(models, prompt_file):
    """`main.py ... | head -n 1`: writing after the reader has gone ends quietly."""
    args = [sys.executable, str(ROOT / "main.py"), *map(str, models), "--prompt-file", str(prompt_file), "--json",
            "--max-tokens", "200"]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    json.loads(process.stdout.readline())
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=300) in (0, 1) and "Traceback" not in stderr, stderr


def test_ctrl_c_while_streaming_ends_the_line_and_prints_the_stats_so_far(models, prompt_file):
    args = [sys.executable, str(ROOT / "main.py"), *map(str, models), "--prompt-file", str(prompt_file),
            "--max-tokens", "400", "--regular-decode"]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    printed = process.stdout.read(1)  # decoding has begun
    process.send_signal(signal.SIGINT)
    printed += process.stdout.read()
    result = subprocess.CompletedProcess(args, process.wait(timeout=60), printed, process.stderr.read())
    assert one_error_line(result) == "error: interrupted"
    last = printed.splitlines()[-1]
    assert printed.endswith("]\n") and last.startswith("[") and " tokens, " in last and "target calls" in last


def test_ctrl_c_while_decoding_is_one_line(models, prompt_file):
    args = [sys.executable, str(ROOT / "main.py"), *map(str, models), "--prompt-file", str(prompt_file), "--json",
            "--max-tokens", "400", "--regular-decode"]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    json.loads(process.stdout.readline())  # decoding has begun
    process.send_signal(signal.SIGINT)
    process.stdout.read()
    result = subprocess.CompletedProcess(args, process.wait(timeout=60), "", process.stderr.read())
    assert one_error_line(result) == "error: interrupted"
