"""The ``lare2`` command. Each stage registers its own commands; heavy imports stay inside them
so that ``lare2 --help`` and the cache/manifest commands start fast and ``train`` never loads diffusers.

One grammar for every command (``lare2.shared.cli_errors``): exit 0 success, 1 problems found
(``cache verify``/``cache diff``), 2 bad usage or input (parser errors included) with one ``error:``
line naming the file or value and the remedy (never a traceback), 3 ``train`` stopped early on
purpose; ``--json`` on every command that reports; ``--device auto|cpu|cuda`` (auto: CUDA when present);
``--sd``/``--clip`` for the models; ``--resume`` continues, ``--no-resume`` refuses an existing cache or run.
"""

from __future__ import annotations

import importlib

import typer

from lare2.shared.cli_errors import OneLineUsageGroup, run_app

app = typer.Typer(
    name="lare2",
    cls=OneLineUsageGroup,  # parser errors as one ``error:`` line too
    help="Detect diffusion-generated images with LaRE^2: extract LaRE maps + CLIP features, train EGRE, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    epilog="Exit codes: 0 done; 1 problems found (cache verify/diff); 2 bad usage or input (one 'error:' line); "
           "3 train stopped early (--stop-after-steps).",
)


def _print_version(value: bool) -> None:
    if value:
        import lare2

        typer.echo(f"lare2 {getattr(lare2, '__version__', 'unknown')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Detect diffusion-generated images with LaRE^2: extract LaRE maps + CLIP features, train EGRE, evaluate."""

# Modules exposing ``register(app: typer.Typer) -> None``.
COMMAND_MODULES = (
    "lare2.shared.manifest_cli",
    "lare2.extract.cli",
    "lare2.score_cli",
    "lare2.cache_cli",
    "lare2.train.cli",
    "lare2.minigenimage.cli",
    "lare2.serve.cli",
)

for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)


def main(argv: list[str] | None = None) -> int:
    """Run ``lare2`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    return run_app(app, argv)


if __name__ == "__main__":
    raise SystemExit(main())
