"""``lare2 cache progress|pack|export``: a cache on a cluster.

progress: how far an array of extraction jobs has got; pack: far fewer files for a shared file system;
export: WebDataset shards for streaming readers. ``register(app)`` adds them to a group: ``lare2.cache_cli.register``
puts them under ``lare2 cache``, with the same options, output and exit codes as the other cache commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lare2.cache_cli import CACHE_ARGUMENT, JSON_OPTION, report_console  # one group: the same options
from lare2.shared.cli_errors import check_out_folder, fail, run_commands, user_errors

EXPORT_FORMATS = ("webdataset",)


def progress(
    path: Path = CACHE_ARGUMENT,
    num_shards: Optional[int] = typer.Option(None, help="Shards of the array (default: as the cache was created)."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Blocks and samples done per shard, the rate from recent done marks, an ETA and the shards left
    (as `sbatch --array=` takes them); safe while an array of jobs writes the cache."""
    from dataclasses import asdict

    from rich.table import Table

    from lare2.shared.cache.progress import cache_progress, summary_lines

    with user_errors():
        report = cache_progress(path, num_shards)
    if json_out:
        from lare2.shared.jsonio import print_json

        print_json({**asdict(report), "complete": report.complete})
        return
    console = report_console()
    table = Table(title="shards with pending blocks" if report.num_shards > 64 else "shards", title_justify="left")
    for column in ("shard", "blocks done", "samples done"):
        table.add_column(column, justify="right")
    for shard in report.shards:
        if report.num_shards <= 64 or shard.blocks_done < shard.blocks:
            table.add_row(str(shard.shard), f"{shard.blocks_done}/{shard.blocks}",
                          f"{shard.samples_done}/{shard.samples}")
    console.print(table)
    for line in summary_lines(report):
        console.print(line, highlight=False)


def export(
    path: Path = CACHE_ARGUMENT,
    out: Path = typer.Option(..., help="Output folder for the shards, sizes.json and cache_attrs.json."),
    export_format: str = typer.Option("webdataset", "--format", help=f"Export format: {', '.join(EXPORT_FORMATS)}."),
    shard_size: int = typer.Option(1000, help="Samples per shard."),
    status: str = typer.Option("ok", help="ok: samples with arrays; all: also failed samples (json only)."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Export the cache to another format (WebDataset tar shards)."""
    from lare2.shared.cache.export import export_webdataset

    if export_format not in EXPORT_FORMATS:
        fail(f"--format {export_format!r}: choose from {list(EXPORT_FORMATS)}")
    check_out_folder(out, "--out", "the export")
    with user_errors():
        summary = export_webdataset(path, out, shard_size=shard_size, status=status, progress=not json_out)
    if json_out:
        from lare2.shared.jsonio import print_json

        print_json(summary)
        return
    report_console().print(f"wrote {sum(summary['sizes'].values())} samples in {len(summary['shards'])} shards to "
                           f"{summary['out']} (exported {summary['exported']}, skipped {summary['skipped']})")


def pack(
    path: Path = CACHE_ARGUMENT,
    out: Path = typer.Argument(..., help="Folder for the packed copy (must not exist)."),
    pack_blocks: int = typer.Option(64, "--pack-blocks", help="Blocks (chunks) per packed file."),
    shard_blocks: Optional[int] = typer.Option(None, "--shard-blocks", hidden=True,
                                               help="Old spelling of --pack-blocks."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Copy a finished cache into packed files of many blocks each: far fewer files, same values."""
    from lare2.shared.cache import pack_cache
    from lare2.shared.cache.chunks import folder_file_count

    with user_errors():
        pack_blocks = pack_blocks if shard_blocks is None else shard_blocks
        packed = pack_cache(path, out, pack_blocks=pack_blocks, progress=not json_out)
    summary = {"source": str(path), "out": str(out), "pack_blocks": pack_blocks, "samples": len(packed),
               "files_before": folder_file_count(path), "files_after": folder_file_count(out)}
    if json_out:
        from lare2.shared.jsonio import print_json

        print_json(summary)
        return
    report_console().print(f"packed {summary['samples']} samples from {path} into {out}: {summary['files_before']} "
                           f"files -> {summary['files_after']} ({pack_blocks} blocks per file)")


def register(app: typer.Typer) -> None:
    """Add progress, export and pack to ``app`` (``lare2 cache``'s group, from ``lare2.cache_cli.register``)."""
    for command in (progress, export, pack):
        app.command(command.__name__)(command)


def main(argv: list[str] | None = None) -> int:
    """``main(["progress", PATH])``: one of these commands without the console script; the exit code."""
    return run_commands(register, argv, prog_name="lare2 cache")
