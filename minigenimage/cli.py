"""``lare2 minigenimage``: build the offline benchmark, train the generator zoo, run the demo.

Bad input (an unknown preset or family, a zoo folder without weights) is one ``error:`` line and
exit 2, as for every ``lare2`` command (``lare2.shared.cli_errors``).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Optional

import typer

from lare2.shared.cli_errors import fail, run_commands, user_errors

FAMILIES = ("vae", "ldm-a", "ldm-b", "pixel-ddpm", "gan")
MINIGENIMAGE_HELP = "MiniGenImage: an offline, CPU-sized GenImage made by the project's own generators."
DEMO_HELP = ("The whole method on MiniGenImage: build, extract with ldm-a, train 4 detectors (egre, linear, "
             "lare-only, egre-zero-lare), evaluate on 4 generators.")
ROBUSTNESS_HELP = ("After the demo: audit its manifest, extract its test split under each perturbation and evaluate "
                   "every detector on them.")
VIEWS_HELP = ("After the demo (and robustness): train EGRE on augmented views, with and without the backbone top; "
              "compare with the demo's egre.")


def build_command(
    out: Path = typer.Option(Path("data/minigenimage"), help="Benchmark folder (generator folders + "
                                                             "manifest.parquet)."),
    preset: str = typer.Option("demo", help="demo (make demo), reduced or tiny (tests)."),
    seed: int = typer.Option(0, help="Seeds every generated image and every crop."),
    zoo: Optional[Path] = typer.Option(None, help="Zoo folder (default: the committed zoo)."),
    json_out: bool = typer.Option(False, "--json", help="Print {\"manifest\": path} as JSON."),
) -> None:
    """Sample the zoo and crop the photographs into GenImage's layout, with a manifest."""
    from lare2.minigenimage.build import build, preset as build_preset

    with user_errors():
        zoo_setting = {} if zoo is None else {"zoo": str(zoo)}
        manifest = build(build_preset(preset, out=str(out), seed=seed, **zoo_setting))
    if json_out:
        from lare2.shared.jsonio import print_json

        print_json({"manifest": manifest})
    else:
        typer.echo(manifest)


def zoo_command(
    family: list[str] = typer.Option(list(FAMILIES), help=f"Families to train, in order: {', '.join(FAMILIES)}."),
    zoo: Optional[Path] = typer.Option(None, help="Zoo folder (default: the committed zoo, overwritten)."),
) -> None:
    """Train the generator zoo on the CPU (the VAE first: ldm-a and ldm-b decode with it)."""
    from lare2.minigenimage import train_gan, train_ldm, train_pixel_ddpm, train_vae

    unknown = [f for f in family if f not in FAMILIES]
    if unknown:
        fail(f"--family {', '.join(unknown)}: unknown; choose from {', '.join(FAMILIES)}")
    zoo_args = ["--zoo", str(zoo)] if zoo is not None else []
    for name in [f for f in FAMILIES if f in family]:
        if name == "vae":
            train_vae.main(zoo_args)
        elif name in ("ldm-a", "ldm-b"):
            train_ldm.main(["--name", name, *zoo_args])
        elif name == "pixel-ddpm":
            train_pixel_ddpm.main(zoo_args)
        else:
            train_gan.main(zoo_args)


def demo_command(
    out: Path = typer.Option(Path("runs/minigenimage"), help="Benchmark, caches, runs and reports go under here."),
    preset: str = typer.Option("demo", help="Benchmark size: demo (the README's table) or a smaller preset of "
                                            "build.py."),
    seed: int = typer.Option(0, help="Seeds the benchmark, the LaRE draws and training."),
    clip: str = typer.Option("small", "--clip", help="Weights of stage 1's image backbone: small, tiny, or a "
                                                     "CLIP RN50 weight file."),
    backbone: Optional[str] = typer.Option(None, "--backbone", hidden=True, help="Old spelling of --clip."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs per detector (default: 40)."),
    model: list[str] = typer.Option([], help="Detector to train, repeatable: egre, linear, lare-only, egre-zero-lare "
                                             "(default: all four)."),
    zoo: Optional[Path] = typer.Option(None, help="Generator zoo to sample and take ldm-a from (default: the committed "
                                                  "zoo)."),
    prompt_mode: str = typer.Option("class", help="Stage-1 prompts: class (the paper's; ldm-a is class-conditioned) or "
                                                  "empty."),
    json_out: bool = typer.Option(False, "--json", help="Print {model: evaluation report} as JSON on stdout."),
) -> None:
    from lare2.minigenimage.demo import DemoConfig, run_demo

    extra = ({} if epochs is None else {"epochs": epochs}) | ({"models": list(model)} if model else {})
    # with --json, stdout holds the JSON document only: the tables go to stderr
    with user_errors(), contextlib.redirect_stdout(sys.stderr if json_out else sys.stdout):
        config = DemoConfig(out=str(out), build_preset=preset, seed=seed, clip=backbone or clip,
                            zoo=str(zoo or ""), prompt_mode=prompt_mode, **extra)
        reports = run_demo(config)
    if json_out:
        from lare2.shared.jsonio import print_json

        print_json(reports)


def robustness_command(
    out: Path = typer.Option(Path("runs/minigenimage"), help="The demo's folder (lare2 minigenimage demo --out)."),
    perturb: list[str] = typer.Option([], help="Test-time perturbation, repeatable (default: jpeg:90 jpeg:75 jpeg:50 "
                                               "blur:1 blur:2 resize:0.5)."),
    model: list[str] = typer.Option([], help="Detector folder under OUT, repeatable (default: every trained one)."),
    json_out: bool = typer.Option(False, "--json", help="Print {model: robustness report} as JSON on stdout."),
) -> None:
    from lare2.minigenimage.robustness import PERTURBATIONS, run_robustness
    from lare2.shared.perturbations import chain_text, parse_chain

    with user_errors(), contextlib.redirect_stdout(sys.stderr if json_out else sys.stdout):
        chains = [chain_text(parse_chain(p)) for p in perturb] or list(PERTURBATIONS)
        if not out.is_dir():
            fail(f"{out}: no such folder; run `lare2 minigenimage demo --out {out}` first")
        results = run_robustness(out, chains, list(model) or None)
    if json_out:
        from lare2.shared.jsonio import print_json

        print_json(results)


def views_command(
    out: Path = typer.Option(Path("runs/minigenimage"), help="The demo's folder (lare2 minigenimage demo --out)."),
    views: int = typer.Option(4, help="Augmented views per training image (lare2 extract --views)."),
    json_out: bool = typer.Option(False, "--json", help="Print {detector: robustness report} as JSON on stdout."),
) -> None:
    from lare2.minigenimage.views import run_views

    if views < 1:
        fail(f"--views {views}: expected >= 1")
    with user_errors(), contextlib.redirect_stdout(sys.stderr if json_out else sys.stdout):
        results = run_views(out, views)
    if json_out:
        from lare2.shared.jsonio import print_json

        print_json(results)


def register(app: typer.Typer) -> None:
    group = typer.Typer(help=MINIGENIMAGE_HELP, no_args_is_help=True)
    group.command("build")(build_command)
    group.command("zoo")(zoo_command)
    group.command("demo", help=DEMO_HELP)(demo_command)
    group.command("robustness", help=ROBUSTNESS_HELP)(robustness_command)
    group.command("views", help=VIEWS_HELP)(views_command)
    app.add_typer(group, name="minigenimage")


def main(argv: list[str] | None = None) -> int:
    """``main(["minigenimage", "demo", ...])``: a ``lare2 minigenimage`` command without the console script."""
    return run_commands(register, argv)
