"""Command-line parsing every stagepipe command shares: one `error:` line with a did-you-mean for a misspelled
option, the option named for a bad value, exit code 2, and defaults shown in --help."""
from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path

from pipeline.core.errors import StagepipeError


def did_you_mean(given: str, known) -> str:
    close = difflib.get_close_matches(given, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def unknown_option_message(given: str, known, help_hint: str) -> str:
    return f"unknown option {given}{did_you_mean(given, known)}; {help_hint} lists the options"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with errors as one line (`error: ...`, exit 2) instead of usage + message."""

    def error(self, message):
        m = re.match(r"unrecognized arguments: (\S+)", message)
        if m:
            given = m.group(1).split("=")[0]
            known = [s for a in self._actions for s in a.option_strings]
            message = unknown_option_message(given, known, f"{self.prog} --help")
        elif re.match(r"argument (\S+): expected one argument", message):
            message = message.replace("expected one argument", "needs a value")
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def read_text_file(path: Path, flag: str) -> str:
    """A text file given on the command line (--prompt_file): a missing, unreadable or non-UTF-8 file is one
    clear error line."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StagepipeError(f"{flag} {path}: not found") from None
    except IsADirectoryError:
        raise StagepipeError(f"{flag} {path}: is a folder; give a text file") from None
    except UnicodeDecodeError as e:
        raise StagepipeError(f"{flag} {path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise StagepipeError(f"{flag} {path}: cannot read it ({e.strerror})") from None
