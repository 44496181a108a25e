"""What the commands share: errors as one line (`error: ...`, exit code 2), --help that
shows every flag's default, and the drafting flags of main.py and server.py."""

import argparse
import sys


def fail(message):
    """Print `error: message` on stderr as one line and exit with code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends each flag's default to its help, unless there is none to show (None, off)."""

    def _get_help_string(self, action):
        nothing = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if nothing or "(default" in (action.help or ""):
            return action.help
        return f"{action.help or ''} (default: %(default)s)".lstrip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad flag reported as one line instead of usage plus message."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        fail(f"{message} (see --help)")


def add_drafting_flags(parser, num_draft_help):
    """The flags that say who drafts besides a draft model and how much: --prompt-lookup, --ngram-max,
    --num-draft (with its help for this command) and --draft-schedule."""
    parser.add_argument("--prompt-lookup", action="store_true",
                        help="draft by copying from the prompt and the output so far; loads no draft model")
    parser.add_argument("--ngram-max", type=int, default=3, help="prompt lookup: longest suffix matched (>= 1)")
    parser.add_argument("--num-draft", type=int, default=5, help=num_draft_help)
    parser.add_argument("--draft-schedule", choices=["adaptive", "constant"], default="adaptive",
                        help="adaptive: pick 0..num-draft each step for the most tokens per second; "
                             "constant: always num-draft (seeded sampling then reproduces)")


def drafting_problems(args):
    """[(ok, one line)] of the drafting flags' checks."""
    return [(args.num_draft >= 1, f"--num-draft must be at least 1, got {args.num_draft}"),
            (args.ngram_max >= 1, f"--ngram-max must be at least 1, got {args.ngram_max}")]


def first_line(error):
    """The first line of an exception's message (libraries' own can run to hundreds), or its kind."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
