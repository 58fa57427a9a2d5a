"""``mesimp``: a thin click front end. Each command parses options, calls the
library function a Python user would call, and prints. No logic lives here."""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

import click

from mesimp._version import __version__
from mesimp.errors import MesimpError


class _Group(click.Group):
    """Turns library errors into one line on stderr and a stable exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MesimpError as e:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)


class KType(click.ParamType):
    """k as an int (``20``) or a fraction of the width (``0.04``)."""

    name = "K"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return value
        try:
            return int(value)
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            self.fail(f"{value!r} is neither an int nor a fraction", param, ctx)


class IntList(click.ParamType):
    """A comma-separated list of positive ints: ``500`` or ``154,60``."""

    name = "N[,N...]"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            items = [int(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of ints", param, ctx)
        if not items or any(v <= 0 for v in items):
            self.fail(f"{value!r}: every value must be > 0", param, ctx)
        return items


def emit_json(obj: Any) -> None:
    """One JSON document on stdout (logs and progress go to stderr)."""
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group(
    cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="mesimp")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """mesimp: train with sparse backprop (meProp), simplify (meSimp), shrink to a
    smaller dense network, export to ONNX and benchmark it.

    \b
    Typical pipeline:
      mesimp train --k 20 --simplify -o models/mlp.pt
      mesimp shrink models/mlp.pt -o models/mlp.small.pt
      mesimp export models/mlp.small.pt --onnx
      mesimp bench models/mlp.onnx models/mlp.small.onnx --data /usr/share/datasets/fashion-mnist
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main(argv: list[str] | None = None) -> None:
    """Console entry point: usage errors become one line too (``error: ...``, exit 2)."""
    from mesimp.cli import commands  # noqa: F401  (registers the commands)

    try:
        rv = cli.main(args=argv, prog_name="mesimp", standalone_mode=False)
    except click.ClickException as e:
        hint = (
            f" (see 'mesimp {e.ctx.command_path.split(' ', 1)[-1]} --help')"
            if getattr(e, "ctx", None) and " " in e.ctx.command_path
            else ""
        )
        click.echo(f"error: {e.format_message()}{hint}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
