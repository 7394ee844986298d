"""The ``layertap`` command line: parses flags (:mod:`pipeline.cli.parser`), runs the command
(:mod:`pipeline.cli.commands`), and turns every expected failure into one line and an exit status."""

from __future__ import annotations

import errno
import logging
import os
import shlex
import sys
from pathlib import Path

from pipeline.cli.parser import COMMANDS, build_parser
from pipeline.core.errors import LayertapError
from pipeline.core.runtime import set_backend_defaults, stop_on_sigterm
from pipeline.store.writing import DiskFullError

__all__ = ["COMMANDS", "build_parser", "entry", "main"]


def _file_in_the_way(exc: OSError) -> str | None:
    """The file that stands where a folder is made or gone through (``--out afile/p.csv``), if that is the error."""
    if not (isinstance(exc, (FileExistsError, NotADirectoryError)) and exc.filename):
        return None
    for path in (exc.filename, *map(str, Path(exc.filename).parents)):
        if os.path.lexists(path):
            return None if os.path.isdir(path) else path
    return None


def main(argv: list[str] | None = None) -> int:
    set_backend_defaults()
    if hasattr(sys.stdout, "reconfigure"):
        # File names that are not UTF-8 print as their own bytes; each line goes out when it is printed, also
        # into a pipe or a log (block-buffered, a run's lines would arrive minutes late, after its log lines).
        sys.stdout.reconfigure(errors="surrogateescape", line_buffering=True)
    argv = sys.argv[1:] if argv is None else list(argv)
    named = [a for a in argv if a in COMMANDS][:1]  # build only that command's options: no stage imports another
    args = build_parser(named or COMMANDS).parse_args(argv)
    args.argv = argv  # which flags were given, not defaulted (pipeline.cli.commands.STORE_FLAGS)
    if args.verbose:
        os.environ["LAYERTAP_VERBOSE"] = "1"
    # Our own progress lines at INFO; other libraries only from WARNING up (JAX logs its absent TPU at INFO).
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="layertap: %(levelname)s: %(message)s" if args.verbose else "layertap: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    terminated = stop_on_sigterm()
    try:
        return args.func(args)
    except DiskFullError as exc:
        print(f"layertap: error: {exc}", file=sys.stderr)
        return 1
    except (LayertapError, ValueError, FileNotFoundError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"layertap: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        # The reader of our output left (``layertap inspect STORE | head``): no traceback, and none at exit
        # when Python flushes what is left.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command whose reader left
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"layertap: error: no space left on the disk writing {exc.filename or 'a file'}; free some "
                  "space and run the same command again", file=sys.stderr)
        elif args.verbose:
            raise
        elif culprit := _file_in_the_way(exc):
            inside = f" (for {exc.filename})" if culprit != exc.filename else ""
            print(f"layertap: error: {culprit} is a file, where `layertap {args.command}` needs a folder{inside}; "
                  "move it away or give another path", file=sys.stderr)
        else:  # a path that is not what it should be (no permission, a name too long): one line
            where = f" {exc.filename}" if exc.filename else ""
            print(f"layertap: error: `layertap {args.command}` could not use{where}: {exc.strerror or exc}; "
                  "-v shows where", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        how = "terminated" if terminated() else "interrupted"
        print(f"layertap: {how}; committed extraction shards are kept, and the same command resumes from them: "
              f"layertap {shlex.join(argv)}; model folders are written only when their training completes",
              file=sys.stderr)
        return 143 if terminated() else 130


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has left (a broken pipe elsewhere is a real error)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or no such file descriptor
        return False


def entry() -> None:
    """The ``layertap`` command: :func:`main`, and after Ctrl-C or SIGTERM an exit that skips the slow interpreter
    teardown.

    Everything that must be cleaned up (decoding processes, shared memory, the store lock, temporary files)
    is by then; tearing down a loaded TensorFlow would add about a second before the prompt returns.
    """
    code = main()
    if code in (130, 143):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
