"""The ``reflectagent`` command line: one module per command group, above everything it drives.

Commands parse flags, call the library and print; every number they print comes from a
library function. Nothing in the library imports this package. An error the library raises
on purpose (:class:`reflectagent.ReflectAgentError`) is printed as one line, not a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from reflectagent.errors import ReflectAgentError

# LiteLLM fetches its price table from the network at import unless told not to; an application
# may decide that for its process (the library itself leaves the environment alone).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


class Commands(TyperGroup):
    """Every command, without DSPy's call history, and with a library error shown as ``error: <what to fix>`` and exit code 1."""

    def invoke(self, ctx):
        import dspy

        try:
            # Every call a command makes is kept in its judgments and the cache; DSPy's in-memory history (up to
            # 10,000 whole requests and responses, for ``inspect_history``) and its trace (the last 10,000 calls'
            # inputs and predictions, for optimisers, which open their own) would only grow a long run's memory.
            with dspy.context(disable_history=True, trace=None):
                return super().invoke(ctx)
        except ReflectAgentError as exc:
            from reflectagent.terminal import visible

            typer.secho(f"error: {visible(str(exc), keep=chr(10))}", fg="red", err=True)
            raise typer.Exit(1) from exc


app = typer.Typer(
    cls=Commands,
    help="Generative reward models: LLM judges that write an analysis before their verdict.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


class VisibleFormatter(logging.Formatter):
    """Log lines with their control characters shown as escapes: a log message may quote an id, a path or a
    model's output (the library's or LiteLLM's), and the log goes to the terminal. A record is one line: a newline in
    its message is ``\\n``, so data cannot write a line that reads as another record. Only a traceback's (or stack's)
    own lines stay lines, with each exception's message in it escaped whole."""

    def format(self, record: logging.LogRecord) -> str:
        from reflectagent.terminal import visible

        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        text = visible(self.formatMessage(record))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + visible(_messages_escaped(record.exc_text, record.exc_info), keep="\n")
        if record.stack_info:
            text += "\n" + visible(self.formatStack(record.stack_info), keep="\n")
        return text


def _messages_escaped(trace: str, exc_info) -> str:
    """``trace`` with the message of each exception in its chain shown on one line (a message may quote data)."""
    from reflectagent.terminal import visible

    error, seen = exc_info[1] if exc_info else None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        try:
            message = str(error)
        except Exception:  # noqa: BLE001 - a message that cannot be made is not in the trace either
            message = ""
        if message and not message.isprintable():
            trace = trace.replace(message, visible(message))
        error = error.__cause__ or error.__context__
    return trace


@app.callback()
def main(
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="-v for progress logs, -vv for debug")
    ] = 0,
):
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(VisibleFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    if verbose < 2:
        for noisy in ("LiteLLM", "litellm", "httpx", "dspy"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


from reflectagent.cli import cache, calibrate, evaluate, finetune, judge, models, serve, serve_rm, view  # noqa: E402  (they register on app)

app.command()(judge.judge)
app.command("eval")(evaluate.eval_command)
app.command()(evaluate.compare)
app.command()(calibrate.calibrate)
app.command()(serve.serve)
app.command("serve-rm")(serve_rm.serve_rm)
app.command()(view.view)
app.add_typer(models.app, name="models")
app.add_typer(cache.app, name="cache")
app.add_typer(finetune.app, name="finetune")

__all__ = ["app"]
