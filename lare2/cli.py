"""The ``lare2`` command. Each stage registers its own commands; heavy imports stay inside them
so that ``lare2 --help`` and the cache/manifest commands start fast and ``train`` never loads diffusers."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="lare2",
    help="Detect diffusion-generated images with LaRE^2: extract LaRE maps + CLIP features, train EGRE, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

# Modules exposing ``register(app: typer.Typer) -> None``.
COMMAND_MODULES = (
    "lare2.shared.manifest_cli",
    "lare2.extract.cli",
    "lare2.extract.score",
    "lare2.cache_cli",
    "lare2.train.cli",
    "lare2.minigenimage.cli",
)

for _module in COMMAND_MODULES:
    try:
        importlib.import_module(_module).register(app)
    except ModuleNotFoundError as err:  # a stage not installed in this checkout
        if err.name != _module:
            raise


def main() -> None:
    app()


if __name__ == "__main__":
    main()
