"""Quality beside speed: ROUGE against rouge-score and an own count, the pass@1 runner's limits,
eval files, and the benchmark's quality columns on the synthetic pairs."""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from conftest import OFTEN, one_error_line, run_script
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer
from tqdm import tqdm

import benchmark
import decoder
import files
import quality
from main import text_of

PROMPTS = ["Return the number of items in the container.", "Create a new parser object with the given description.",
           "Write the rows to the file object."]


# ---- ROUGE ----

def own_rouge(prediction, reference):
    """ROUGE-1/2/L F1 of two token lists, counted here: clipped n-gram overlap and the longest common subsequence."""
    def f1(overlap, predicted, wanted):
        if overlap == 0:
            return 0.0
        precision, recall = overlap / predicted, overlap / wanted
        return 2 * precision * recall / (precision + recall)

    def grams(tokens, n):
        return Counter(zip(*(tokens[i:] for i in range(n))))

    scores = {}
    for n, name in ((1, "rouge1"), (2, "rouge2")):
        mine, theirs = grams(prediction, n), grams(reference, n)
        scores[name] = f1(sum((mine & theirs).values()), sum(mine.values()), sum(theirs.values()))
    longest = [[0] * (len(reference) + 1) for _ in range(len(prediction) + 1)]
    for i, x in enumerate(prediction):
        for j, y in enumerate(reference):
            longest[i + 1][j + 1] = longest[i][j] + 1 if x == y else max(longest[i][j + 1], longest[i + 1][j])
    scores["rougeL"] = f1(longest[-1][-1], len(prediction), len(reference))
    return scores


def test_rouge_of_hand_made_pairs():
    # "the cat sat" against "the cat ate": 2 of 3 words, 1 of 2 bigrams, a common subsequence of 2.
    assert quality.rouge(["the cat sat"], ["the cat ate"]) == pytest.approx(
        {"rouge1": 2 / 3, "rouge2": 1 / 2, "rougeL": 2 / 3})
    # Word order: every word shared, no bigram, a subsequence of 1 of 3; stemming: "cats" is "cat".
    assert quality.rouge(["a b c"], ["c b a"]) == pytest.approx({"rouge1": 1.0, "rouge2": 0.0, "rougeL": 1 / 3})
    assert quality.rouge(["Cats, running!"], ["the cat runs"])["rouge1"] == pytest.approx(2 * 1.0 * 2 / 3 / (1 + 2 / 3))
    assert quality.rouge([""], ["anything"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    # The mean over pairs of rouge-score's own per-pair F1.
    pairs = [("the quick brown fox jumps", "a quick brown dog jumps high"), ("summaries are short", "short summary")]
    scorer = rouge_scorer.RougeScorer(list(quality.ROUGE_TYPES), use_stemmer=True)
    theirs = [scorer.score(r, p) for p, r in pairs]
    mine = quality.rouge([p for p, _ in pairs], [r for _, r in pairs])
    for name in quality.ROUGE_TYPES:
        assert mine[name] == pytest.approx(sum(s[name].fmeasure for s in theirs) / 2)


# Three-letter words: rouge-score stems only longer tokens, so the own count needs no stemmer.
WORDS = ["cat", "dog", "red", "sky", "big", "sun", "map", "box"]
texts = st.lists(st.tuples(st.sampled_from(WORDS), st.booleans(), st.sampled_from([" ", ", ", ". ", "\n", " - "])),
                 max_size=14)


def render(drawn):
    """(text with mixed case and punctuation, its tokens as rouge-score sees them)."""
    return "".join((w.upper() if shout else w) + sep for w, shout, sep in drawn), [w for w, _, _ in drawn]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(texts, texts), min_size=1, max_size=4))
def test_rouge_equals_an_own_count_and_its_invariants(pairs):
    rendered = [(render(p), render(r)) for p, r in pairs]
    mine = quality.rouge([p[0] for p, _ in rendered], [r[0] for _, r in rendered])
    own = [own_rouge(p[1], r[1]) for p, r in rendered]
    for name in quality.ROUGE_TYPES:
        assert mine[name] == pytest.approx(sum(s[name] for s in own) / len(own))
        assert 0.0 <= mine[name] <= 1.0
    assert mine["rougeL"] <= mine["rouge1"] + 1e-12  # a common subsequence shares its words
    swapped = quality.rouge([r[0] for _, r in rendered], [p[0] for p, _ in rendered])
    assert swapped == pytest.approx(mine)  # F1 is symmetric


# ---- the pass@1 runner ----

ADD = quality.Example("def add(a, b):\n", tests="assert add(2, 3) == 5\nassert add(-1, 1) == 0\n")


def test_runner_passes_right_fails_wrong_and_survives_bad_programs(tmp_path):
    """Each bad program fails for its own reason, harms nothing, and the next one still runs."""
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    completions = {
        "right": "    return a + b\n",
        "wrong": "    return a - b\n",
        "loop": "    while True:\n        pass\n",
        "sleep": "    import time\n    time.sleep(60)\n",
        "memory": "    hoard, size = [], 1 << 20\n    while True:\n        hoard.append(bytearray(size))\n        size *= 2\n",
        "delete": f"    import os\n    os.remove({str(victim)!r})\n    return a + b\n",
        "delete, caught": f"    import os\n    try:\n        os.unlink({str(victim)!r})\n    except BaseException:\n"
                          f"        pass\n    return a + b\n",
        "rmtree": f"    import shutil\n    shutil.rmtree({str(tmp_path)!r})\n    return a + b\n",
        "overwrite": f"    open({str(victim)!r}, 'w').write('gone')\n    return a + b\n",
        "spawn": f"    import subprocess\n    subprocess.run(['rm', {str(victim)!r}])\n    return a + b\n",
        "chdir": "    import os\n    os.chdir('/')\n    return a + b\n",
        "exit 0": "    import os\n    os._exit(0)\n",
        "again right": "    return b + a\n",
    }
    # 3 s: a busy machine can take 2 s to start Python; the loops must still be cut short by the limit.
    scorer = quality.Scorer([ADD] * len(completions), time_limit=3, memory_limit=128 << 20)
    assert scorer.score(list(completions.values())) == {"pass_at_1": 2 / len(completions)}
    verdicts = {name: scorer.verdicts[quality.program(ADD, c)] for name, c in completions.items()}
    outcomes = {name: v.outcome for name, v in verdicts.items()}
    assert outcomes == {"right": "passed", "wrong": "failed", "loop": "timed out", "sleep": "timed out",
                        "memory": "out of memory", "delete": "refused", "delete, caught": "refused",
                        "rmtree": "refused", "overwrite": "refused", "spawn": "refused", "chdir": "refused",
                        "exit 0": "refused", "again right": "passed"}
    assert verdicts["wrong"].detail == "AssertionError" and verdicts["delete"].detail == "refused: os.remove"
    assert verdicts["loop"].seconds < 6 and verdicts["sleep"].seconds < 6  # the limit, not the program, ended them
    assert victim.read_text() == "precious" and os.getcwd() != "/"


def test_programs_work_in_a_folder_of_their_own():
    source = ("import os\nopen('scratch.txt', 'w').write('mine')\nassert open('scratch.txt').read() == 'mine'\n"
              "print(os.getcwd())\n")
    first, second = quality.run_program(source, 5), quality.run_program(source + "assert 0\n", 5)
    assert first.passed and not second.passed and not os.path.exists("scratch.txt")


def test_completions_stop_at_the_next_top_level_statement():
    assert quality.truncate("    return 1\n\ndef other():\n    pass") == "    return 1\n"
    assert quality.truncate("    x = 1\n    if x:\n        return x\nprint(x)") == "    x = 1\n    if x:\n        return x"
    assert quality.truncate("    return 2") == "    return 2"
    # A completion running on past the function still passes: the extra code is cut.
    assert quality.run_program(quality.program(ADD, "    return a + b\n\ndef broken(:\n"), 5).passed


# ---- eval files and the named sets ----

@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.text(), st.text()), min_size=1, max_size=5), st.sampled_from(["reference", "tests"]))
def test_eval_files_round_trip(tmp_path_factory, items, kind):
    path = tmp_path_factory.mktemp("eval") / "set.jsonl"
    examples = [quality.Example(prompt, **{kind: other}) for prompt, other in items]
    quality.write_eval_file(path, examples)
    assert quality.read_eval_file(path) == examples
    assert quality.read_eval_file(path, limit=2) == examples[:2]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~files.umask())


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a"}'], "line 1 is not a JSON object"),
    (['{"prompt": "a", "reference": "b", "tests": "c"}'], "line 1 is not"),
    (['{"prompt": "a", "reference": "b"}', "not json"], "line 2 is not"),
    (['{"prompt": "a", "reference": "b"}', '{"prompt": "a", "tests": "b"}'], "one kind per file"),
    ([""], "holds no examples"),
])
def test_bad_eval_files_are_one_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(quality.EvalError, match=message):
        quality.read_eval_file(path)


class FakeDatasets:
    """Stands in for the `datasets` package: rows shaped as the hub's sets' rows, or a failure."""

    def __init__(self, rows=None):
        self.rows, self.asked = rows, []

    def load_dataset(self, repo, split):
        self.asked.append((repo, split))
        if self.rows is None:
            raise ConnectionError("Couldn't reach the Hugging Face Hub\nmore detail")
        return self.rows


def test_named_sets_become_eval_files(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "FETCHED", tmp_path)
    row = dict(task_id="HumanEval/0", prompt="def add(a, b):\n    \"\"\"Sum.\"\"\"\n", entry_point="add",
               canonical_solution="    return a + b\n",
               test="def check(candidate):\n    assert candidate(2, 3) == 5\n")
    fake = FakeDatasets([row])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    (example,), path = quality.load("humaneval", 1)
    assert fake.asked == [("openai/openai_humaneval", "test[:1]")] and path == tmp_path / "humaneval-1.jsonl"
    assert quality.read_eval_file(path) == [example]
    scorer = quality.Scorer([example])
    assert scorer.score([row["canonical_solution"]]) == {"pass_at_1": 1.0}  # check(add) ran the tests
    assert scorer.score(["    return a * b\n"]) == {"pass_at_1": 0.0}
    assert quality.load("humaneval", 1) == ([example], path) and len(fake.asked) == 1  # kept: offline from now on
    fake.rows = [dict(document=" A long article. ", summary="Short.", id="1")]
    (summary,), _ = quality.load("xsum")
    assert summary == quality.Example("summarize: A long article.", reference="Short.")


def test_named_sets_offline_say_to_pass_a_file(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "FETCHED", tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets())
    with pytest.raises(quality.EvalError, match=r"could not fetch EdinburghNLP/xsum \(Couldn't reach the Hugging "
                                                r"Face Hub\); pass a local JSON-lines file"):
        quality.load("xsum", 5)
    monkeypatch.setitem(sys.modules, "datasets", None)  # the package missing
    with pytest.raises(quality.EvalError, match="needs the datasets package.*pass a local JSON-lines file"):
        quality.load("humaneval")
    assert not list(tmp_path.iterdir())


# ---- the benchmark's quality columns on a synthetic pair ----

def pair_results(load_pair, examples, *flags):
    """benchmark_pair's results on the tiny pair (eps OFTEN) with quality scored against examples."""
    target, draft, tokenizer = load_pair(OFTEN)
    args = benchmark.parse_args(["--num-draft", "1", "3", "--max-tokens", "12", "--repeats", "1", "--delta", "0",
                                 "1.0", "--prompt-lookup", *flags])
    prompt_ids = [tokenizer(e.prompt).input_ids for e in examples]
    sampling = decoder.Sampling(args.temperature)
    with tqdm(disable=True) as progress:
        return benchmark.benchmark_pair(args, target, draft, prompt_ids, sampling, progress, quality.Scorer(examples),
                                        lambda tokens: text_of(tokenizer, tokens)), tokenizer


def plain_texts(load_pair, max_tokens=12):
    target, _, tokenizer = load_pair(OFTEN)
    return [text_of(tokenizer, list(decoder.generate(target, tokenizer(p).input_ids, max_tokens))) for p in PROMPTS]


def assert_delta_0_scores_as_plain(results):
    plain = results["plain"]["quality"]
    assert plain["identical_share"] == {"mean": 1.0, "sd": 0.0}
    for row in results["speculative"]:
        q = row["quality"]
        assert q["identical_share"]["mean"] == row["departure"]["identical_prompts"] / row["departure"]["prompts"]
        if row["delta"] == 0:
            assert q == plain, row["label"]


def test_at_delta_0_every_setting_scores_as_plain_rouge(load_pair):
    # References: the first half of each plain output's words, so ROUGE lies strictly between 0 and 1.
    halves = [" ".join(text.split()[: len(text.split()) // 2]) for text in plain_texts(load_pair)]
    examples = [quality.Example(p, reference=r) for p, r in zip(PROMPTS, halves)]
    results, _ = pair_results(load_pair, examples)
    assert_delta_0_scores_as_plain(results)
    plain = results["plain"]["quality"]
    assert {name: plain[name]["mean"] for name in quality.ROUGE_TYPES} == pytest.approx(
        quality.rouge(plain_texts(load_pair), halves))
    assert 0 < plain["rouge1"]["mean"] < 1
    assert [row["label"] for row in results["speculative"]] == ["g 1", "g 3", "adaptive", "adaptive, delta 1.0",
                                                                 "prompt lookup"]


def test_at_delta_0_every_setting_scores_as_plain_pass_at_1(load_pair):
    # Tests on the completion's text (inside a raw string): their verdicts differ from prompt to prompt.
    checks = ["len(text) % 2 == 0", "len(text) % 2 == 1", "len(text) % 3 != 0"]
    examples = [quality.Example(f'text = r"""{p} ', tests=f'"""\nassert {c}\n') for p, c in zip(PROMPTS, checks)]
    results, _ = pair_results(load_pair, examples)
    assert_delta_0_scores_as_plain(results)
    # The program's string: prompt, completion, and the two newlines before the tests.
    passed = sum(eval(c, {"text": f"{p} {quality.truncate(t)}\n\n"})
                 for p, c, t in zip(PROMPTS, checks, plain_texts(load_pair)))
    assert results["plain"]["quality"]["pass_at_1"]["mean"] == passed / len(PROMPTS)


def test_sampled_settings_score_over_seeds(load_pair):
    examples = [quality.Example(p, reference="the number of items") for p in PROMPTS]
    results, _ = pair_results(load_pair, examples, "--temperature", "1", "--samples", "2")
    for row in [results["plain"], *results["speculative"]]:
        assert row["quality"]["samples"] == 2
    # Plain decoding's seeded samples reproduce: its share identical to itself is 1 at every seed.
    assert results["plain"]["quality"]["identical_share"] == {"mean": 1.0, "sd": 0.0}


def test_benchmark_eval_flags(tmp_path):
    eval_file = tmp_path / "set.jsonl"
    quality.write_eval_file(eval_file, [quality.Example(p, reference="a parser for the file") for p in PROMPTS])
    out, picture = tmp_path / "bench.json", tmp_path / "bench.png"
    plot = ["--plot", picture] if benchmark.find_spec("matplotlib") else []
    result = run_script("benchmark.py", "--layers", "3", "--d-model", "64", "--max-tokens", "8", "--repeats", "1",
                        "--num-draft", "2", "--eval", eval_file, "--eval-limit", "2", "--json", out, *plot)
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    assert results["eval"]["prompts"] == results["prompts"] == 2 and results["eval"]["kind"] == "reference"
    header = next(line for line in result.stdout.splitlines() if line.startswith("setting") and "ROUGE-1" in line)
    assert header.split() == ["setting", "tok/s", "speedup", "ROUGE-1", "ROUGE-2", "ROUGE-L", "identical"]
    assert all(set(r["quality"]) == {*quality.ROUGE_TYPES, "identical_share", "samples"}
               for r in [results["plain"], *results["speculative"]])
    if plot:
        assert picture.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("flags, message", [
    (["--eval", "xsum"], "pass a local JSON-lines file"),
    (["--eval", "missing.jsonl"], "cannot read --eval missing.jsonl"),
    (["--eval-limit", "3"], "--eval-limit goes with --eval"),
    (["--eval", "x.jsonl", "--prompt-file", "y.jsonl"], "give --eval or --prompt-file, not both"),
    (["--samples", "0"], "--samples must be at least 1"),
])
def test_benchmark_eval_errors_are_one_line(tmp_path, flags, message):
    # A temporary folder of its own: no set fetched before is found; the hub is off.
    env = dict(os.environ, TMPDIR=str(tmp_path), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run([sys.executable, str(benchmark.Path(benchmark.__file__)), *flags], cwd=tmp_path,
                            capture_output=True, text=True, env=env, timeout=120)
    assert message in one_error_line(result)


def test_an_eval_file_with_a_byte_order_mark_is_read(tmp_path):
    # Read as prompt files are: editors write the mark, and it must not spoil line 1.
    path = tmp_path / "bom.jsonl"
    path.write_bytes("\ufeff".encode() + json.dumps({"prompt": "p", "reference": "r"}).encode() + b"\n")
    assert [(e.prompt, e.reference) for e in quality.read_eval_file(path)] == [("p", "r")]
