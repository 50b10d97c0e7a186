"""``lare2 extract``: stage 1 from the command line (also ``python -m lare2.extract`` for
``accelerate launch``). A preset, the paper's knobs as options, any other ExtractConfig field
through ``--set key=value`` (converted by the field's type).

``--resume`` (the default) continues a cache made with the same settings (a changed setting is
refused, naming it); ``--no-resume`` refuses a cache already at ``--out``. ``--shard-index auto`` takes an
array task's shard from its scheduler (``lare2.extract.array_env``); ``--submit slurm`` hands the same
command to a SLURM array instead of running it (``lare2.extract.submit``). Settings, prompts, ``--out`` and an
existing cache's identity are checked before torch or any model loads (``lare2.extract.plan``), and a rerun
whose shard is done loads no model. Ctrl-C exits 130 saying which blocks were kept. Exit codes: see
``lare2.shared.cli_errors`` (0 done, 2 bad usage or input with one ``error:`` line, 75 stopped by
SIGTERM/SIGUSR1 with its finished blocks written: rerun to resume).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import typer

from lare2.shared.cli_errors import EXIT_PREEMPTED, fail, interrupted, run_commands, user_errors

EXTRACT_HELP = ("Compute LaRE maps + backbone features for a manifest selection into a Zarr cache. "
                "Reruns resume; --no-resume refuses an existing cache.")


def extract(
    ctx: typer.Context,
    manifest: str = typer.Option(..., "--manifest", "-m", help="Parquet manifest (lare2 manifest build)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Cache directory (created or resumed); default "
                                                                "cache/SPLIT, or cache/all without --split."),
    split: Optional[str] = typer.Option(None, help="Only this split (train/val/test); required when the manifest has "
                                                   "several."),
    all_splits: bool = typer.Option(False, "--all-splits", help="One cache per split of the manifest, at OUT/SPLIT "
                                                                "(OUT default: cache)."),
    generator: list[str] = typer.Option([], "--generator", "-g", help="Only these generators (repeatable)."),
    preset: str = typer.Option("paper", help="Settings preset: paper (docs/method.md §1) or debug (tiny models)."),
    sd: Optional[str] = typer.Option(None, "--sd", help="Latent diffusion model: diffusers folder, .safetensors/.ckpt, "
                                                        "hub id, or 'tiny'."),
    clip: Optional[str] = typer.Option(None, "--clip", help="CLIP RN50: RN50.pt, a state dict, 'random-rn50' or "
                                                            "'tiny'."),
    backbone: Optional[str] = typer.Option(None, "--backbone", hidden=True, help="Old spelling of --clip."),
    timestep: Optional[int] = typer.Option(None, help="Diffusion timestep t in [0, 1000) (paper: 200)."),
    ensemble: Optional[int] = typer.Option(None, help="Noise draws per image averaged into the map (paper: 4)."),
    prompt_mode: Optional[str] = typer.Option(None, help="class (template with the class name), fixed (--set "
                                                         "prompt_text=...) or empty."),
    image_size: Optional[int] = typer.Option(None, help="Resize side before the VAE, a multiple of 8 (paper: 256)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per model call."),
    num_workers: Optional[int] = typer.Option(None, help="Decoding workers."),
    device: Optional[str] = typer.Option(None, help="auto (CUDA when present, default) | cpu | cuda (each process of "
                                                    "accelerate launch takes its own GPU)."),
    num_shards: Optional[str] = typer.Option(None, metavar="N|auto",
                                             help="Independent array jobs sharing this cache (each may run several "
                                                  "processes); default 1. auto: from the array job's variables."),
    shard_index: Optional[str] = typer.Option(None, metavar="I|auto",
                                              help="This array job's index in [0, num_shards); default 0. auto: "
                                                   "SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX or "
                                                   "AWS_BATCH_JOB_ARRAY_INDEX."),
    limit: Optional[int] = typer.Option(None, help="Only the first N selected rows."),
    perturb: Optional[str] = typer.Option(None, "--perturb", metavar="SPEC",
                                          help="Test condition applied to every image of the split, for robustness "
                                               "curves: steps joined by '+', e.g. jpeg:75, blur:1, resize:0.5 "
                                               "(down and back up), crop:0.8 (centre), noise:5 (std, 0-255 units). "
                                               "A detector trained on clean caches scores the result."),
    normalize: Optional[str] = typer.Option(None, "--normalize", metavar="SPEC",
                                            help="Debiasing applied to every image of every split (and when "
                                                 "scoring): e.g. jpeg:96 so reals and fakes share one compression "
                                                 "history, or jpeg:96+size:512 (short side 512, centre crop). "
                                                 "Applied after --perturb; use the same for train, val and test."),
    views: Optional[int] = typer.Option(None, "--views", metavar="K",
                                        help="Also store K augmented training views per image (random 224 crop; "
                                             "p 0.5 one of JPEG 50-95, blur 3-7, noise, grey; rotation and flip "
                                             "p 0.33; seeded per sample and view) besides the evaluation centre "
                                             "crop; training draws one per sample per epoch. For training caches; "
                                             "each view adds ~206 kB per image at RN50 size. Default 0."),
    resume: bool = typer.Option(True, "--resume/--no-resume",
                                help="--resume: continue the cache at --out when its settings match. "
                                     "--no-resume: refuse when --out already holds a cache."),
    set_: list[str] = typer.Option([], "--set", help="Any ExtractConfig field, key=value (repeatable)."),
    create_only: bool = typer.Option(False, "--create-only", help="Create (or check) the cache, extract nothing: run "
                                                                  "once before an array of jobs."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    submit: Optional[str] = typer.Option(None, "--submit", metavar="SCHEDULER",
                                         help="slurm: create the cache, write a job script beside it (one array task "
                                              "per shard) and submit it with sbatch, instead of extracting here."),
    array: Optional[str] = typer.Option(None, "--array", metavar="N[%K]",
                                        help="With --submit: N shards, one array task each (at most K at once)."),
    sbatch_arg: list[str] = typer.Option([], "--sbatch-arg", metavar="ARG",
                                         help="With --submit: one more #SBATCH line, e.g. --sbatch-arg=--time=4:00:00 "
                                              "(repeatable)."),
    gpus_per_task: int = typer.Option(0, "--gpus-per-task", min=0,
                                      help="With --submit: GPUs per task (--gres); more than one runs one process "
                                           "per GPU under accelerate launch."),
    only_missing: bool = typer.Option(False, "--only-missing",
                                      help="With --submit: only the shards that still have pending blocks."),
    dry_run: bool = typer.Option(False, "--dry-run", help="With --submit: print the job script; create, write and "
                                                          "submit nothing."),
) -> None:
    from pathlib import Path

    from lare2.shared.config import ExtractConfig
    from lare2.shared.config import preset as make_preset
    from lare2.shared.settings import parse_overrides

    with user_errors():
        from lare2.shared.perturbations import parse_chain

        # checked here first so the error names the option; the config keeps them canonical
        parse_chain(perturb or "", what="--perturb")
        parse_chain(normalize or "", allow_size=True, what="--normalize")
        named = dict(manifest=manifest, out=out, split=split, generators=list(generator) or None, sd=sd,
                     clip=clip or backbone, timestep=timestep, ensemble=ensemble, prompt_mode=prompt_mode,
                     image_size=image_size, batch_size=batch_size, num_workers=num_workers, device=device,
                     limit=limit, perturb=perturb, normalize=normalize, views=views)
        # --set comes last and wins, as before
        sets = parse_overrides(set_, ExtractConfig)
        overrides = {k: v for k, v in named.items() if v is not None} | sets
        cfg = make_preset(preset, **overrides)
        if submit is None:  # --shard-index/--num-shards; "auto" from the array job's variables (array_env)
            from lare2.extract.array_env import shard_settings
            from lare2.extract.submit import refuse_submit_options

            refuse_submit_options(ctx)
            shards = shard_settings(shard_index, num_shards, out=Path(cfg.out))
            cfg = dataclasses.replace(cfg, **{k: v for k, v in shards.items() if k not in sets})
    configs = [cfg]
    with user_errors():
        splits = manifest_splits(cfg.manifest, cfg.generators)
    if all_splits:
        if split is not None:
            fail(f"--split {split} and --all-splits: give one of them")
        configs = [dataclasses.replace(cfg, split=s, out=str(Path(out or "cache") / s)) for s in splits]
    elif cfg.split is None and len(splits) > 1:
        fail(f"{cfg.manifest}: holds the splits {', '.join(splits)}, which must never share a cache; "
             "pass --split SPLIT "
             "(writes cache/SPLIT), or --all-splits to write one cache per split under --out")
    for one in configs:
        if not resume and (Path(one.out) / "zarr.json").exists():
            fail(f"{one.out}: a cache already exists there and --no-resume was given; choose a new --out "
                 "(or drop --no-resume to continue it)")
    with user_errors():  # prompts, --out and an existing cache's settings, before torch or any model loads
        from lare2.extract.plan import plan_extraction

        plans = [plan_extraction(one, quiet=True) for one in configs]

    if submit is not None:
        from lare2.extract.submit import submit_from_cli

        submit_from_cli(ctx, cfg, scheduler=submit, array=array, sbatch_args=sbatch_arg, gpus_per_task=gpus_per_task,
                        only_missing=only_missing, dry_run=dry_run, all_splits=all_splits, json_out=json_out)
        return
    from lare2.extract.run import run_extraction
    from lare2.shared.logs import console
    from lare2.shared.wording import counted

    summaries = []
    for one, plan in zip(configs, plans):
        if plan.nothing_to_do and not create_only and single_process():  # a finished shard: no model to load
            summaries.append(finished_summary(one, plan))
        else:
            with user_errors(), interrupted(one.out, lambda one=one: kept_after_interrupt(one)):
                summaries.append(run_extraction(one, create_only=create_only))
        if summaries[-1].rank == 0 and not json_out:  # under accelerate launch / torchrun, the main process speaks
            console.print(summaries[-1].line())
            last = summaries[-1]
            console.print(f"cache {last.cache}: {counted(last.samples, 'sample')}, status counts {last.counts}")
        if summaries[-1].stopped:  # SIGTERM/SIGUSR1: the next split would be stopped too
            break
    if json_out and summaries[0].rank == 0:  # one document: a summary, or with --all-splits a list of them
        from lare2.shared.jsonio import print_json

        documents = [dataclasses.asdict(summary) for summary in summaries]
        print_json(documents if all_splits else documents[0])
    if summaries[-1].stopped:  # finished blocks are written: a rerun (or requeued task) resumes
        raise typer.Exit(EXIT_PREEMPTED)


def single_process() -> bool:
    """Not one of several processes of ``accelerate launch`` / ``torchrun`` (which decide together)."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) == 1


def finished_summary(cfg, plan):
    """The ``Summary`` of a rerun whose shard is done, settings and models unchanged: nothing computed, no model
    loaded."""
    from lare2.extract.run import Summary
    from lare2.shared.logs import get_logger
    from lare2.shared.wording import counted

    get_logger(__name__).info("%s: nothing to do: shard %d/%d (%s) is done, with these settings and models "
                              "(no model loaded)", cfg.out, cfg.shard_index, cfg.num_shards,
                              counted(len(plan.shard_blocks), "block"))
    return Summary(cache=cfg.out, samples=len(plan.rows["sample_id"]), skipped_blocks=len(plan.shard_blocks),
                   counts=plan.counts, shard=f"{cfg.shard_index}/{cfg.num_shards}")


def kept_after_interrupt(cfg) -> str:
    """What an interrupted extraction kept, and how to go on."""
    from pathlib import Path

    from lare2.shared.cache import FeatureCache

    if not (Path(cfg.out) / "zarr.json").exists():
        return "no cache was created; rerun the same command"
    done = FeatureCache.open(cfg.out).done_blocks()
    return (f"the {int(done.sum())} of {len(done)} blocks marked done are kept; rerun the same command to compute "
            "the rest")


def manifest_splits(manifest: str, generators: list[str]) -> list[str]:
    """The splits of the manifest's rows (of ``generators``, when given), in the usual order."""
    from lare2.shared.manifest import SPLITS, read_selection

    present = set(read_selection(manifest, generators=generators).column("split").to_pylist())
    return [s for s in SPLITS if s in present] + sorted(present - set(SPLITS))


def register(app: typer.Typer) -> None:
    app.command("extract", help=EXTRACT_HELP)(extract)


def main(argv: list[str] | None = None) -> int:
    """``python -m lare2.extract --manifest ...`` (e.g. under ``accelerate launch``); returns the exit code."""
    return run_commands(register, argv, prog_name="python -m lare2.extract")
