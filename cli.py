"""What the commands share: errors as one line (`error: ...`, exit code 2) and --help
that shows every flag's default."""

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


def first_line(error):
    """The first line of an exception's message (libraries' own can run to hundreds), or its kind."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
