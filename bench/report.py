"""``bench.md``: the figures of ``bench.json`` as one markdown table, a few rows per measurement.

A section carried over from an earlier run (``bench.record.carry_forward``) says so in its rows: the date
and commit of the run that measured it.
"""

from __future__ import annotations


def _commit_text(measured: dict) -> str:
    """"commit 0123456789" ("+ changes" when the checkout was modified) of a ``"measured"`` record."""
    if measured.get("commit") in (None, "unknown"):
        return "commit not recorded"
    sha, _, dirty = measured["commit"].partition("+")
    return f"commit {sha[:10]}{' + changes' if dirty else ''}"


def earlier(section: dict) -> str:
    """"" for a section measured by this run, else "; measured DATE, commit SHA" (its ``"measured"`` record)."""
    measured = section.get("measured")
    return f"; measured {(measured.get('date') or '-')[:10]}, {_commit_text(measured)}" if measured else ""


def _extraction_rows(results: dict) -> list[str]:
    """End-to-end extraction, pipeline efficiency, full-size models, DIRE-style / LaRE, FLOPs, batched / loop."""
    lines = []
    tiny = results.get("tiny_extraction")
    if tiny:
        lines.append(f"| extraction, tiny models, end to end | {tiny['images_per_s']} img/s "
                     f"({tiny['images']} images) |")
    rn50 = results.get("tiny_sd_rn50_extraction")
    if rn50:
        lines.append(f"| extraction, tiny SD + full-size RN50 | {rn50['images_per_s']} img/s |")
    for name, label in (("tiny", "tiny models"), ("tiny_sd_rn50", "tiny SD + full-size RN50")):
        p = results.get("pipeline_efficiency", {}).get(name)
        if p:
            writes = "; cache writes in the writer thread" if p.get("cache_writer") else ""
            lines.append(f"| stage-1 pipeline efficiency, {label}: end to end / models only (batch {p['batch_size']}, "
                         f"decode inline{writes}) | {p['end_to_end_over_models_only']} "
                         f"({p['end_to_end_images_per_s']} vs "
                         f"{p['models_only_images_per_s']} img/s; the ratio is the median of {p['repeats']} "
                         "per-round ratios) |")
    full = results.get("full_size")
    if full:
        lines.append(f"| SD v1.5-size LaRE (VAE + {full['ensemble']} UNet calls), fp32 CPU | "
                     f"{full['lare_seconds_per_image']} s/img{earlier(full)} |")
        lines.append(f"| CLIP RN50, fp32 CPU | {full['backbone_seconds_per_image']} s/img{earlier(full)} |")
    return lines + _cost_rows(results)


def _cost_rows(results: dict) -> list[str]:
    """The side-by-side cost ratios: DIRE-style / LaRE (time and FLOPs), batched / reference-style loop."""
    lines = []
    for key, label in (("tiny", "tiny models"), ("full_size", "SD v1.5-size, fp32 CPU")):
        d = results.get("dire_vs_lare", {}).get(key)
        if d:
            lines.append(f"| DIRE-style ({d['ddim_steps']}+{d['ddim_steps']} DDIM steps, decode) / LaRE, "
                         f"time per image, {label}, batch {d['batch_size']} | {d['dire_over_lare']}x "
                         f"({d['dire_seconds_per_image']} vs {d['lare_seconds_per_image']} s/img, "
                         f"median of {d['repeats']}{earlier(d)}) |")
    flops = results.get("flops")
    if flops:
        g, o = flops["gflop_per_image"], flops["gflop_other"]
        lines.append(f"| FLOPs per image, full size | {g['total']} GFLOP: VAE encoder {g['vae_encoder']}, "
                     f"{flops['ensemble']} UNet calls {g['unet']}, RN50 {g['backbone']} |")
        lines.append(f"| DIRE-style / LaRE, FLOPs, full size | {o['dire_style_over_lare']}x "
                     f"({o['dire_style_20_steps']} vs {round(g['vae_encoder'] + g['unet'], 2)} GFLOP) |")
    ref = results.get("batched_vs_reference")
    if ref:
        lines.append(f"| batched extraction (batch {ref['batch_size']}, prompt cache) / reference-style loop (batch 1, "
                     f"prompt encoded per image), tiny models | {ref['batched_over_reference']}x "
                     f"({ref['batched_images_per_s']} vs {ref['reference_images_per_s']} img/s) |")
    return lines


def _host_rows(results: dict) -> list[str]:
    """The loader worker, cache writes and the loader workers a GPU needs."""
    lines = []
    host = results.get("host")
    if host:
        r, j = host["worker"]["images_per_s"], host["worker"]["jpeg"]
        lines.append(f"| loader worker, one thread: decode + both inputs of a {j['width']}x{j['height']} "
                     f"q{j['quality']} JPEG | {r['decode_both']} img/s (decode {r['decode']}, + 256 px LaRE input "
                     f"{r['decode_lare_input']}, + 224 crop {r['decode_backbone_input']}) |")
    writes = results.get("cache_writes")
    if writes:
        lines.append(f"| cache writes, full-size layout (main process) | {writes['samples_per_s']} samples/s "
                     f"({writes['raw_mb_per_s']} MB/s raw) |")
    lines += _writer_rows(results.get("cache_writer"))
    if host and "workers_per_gpu" in host:
        w = host["workers_per_gpu"]
        lines.append(f"| loader workers per GPU at {w['gpu_images_per_s']:g} img/s ({w['gpu_source']}) | "
                     f"{w['loader_workers']} ({w['loader_workers_exact']}); cache writes take "
                     f"{w['cache_write_share_of_one_process']:.0%} of one process |")
    return lines


def _writer_rows(writer: dict | None) -> list[str]:
    """The cache writer beside the model (``bench/writer.py``): capacity and the stand-in extraction's rate."""
    if not writer:
        return []
    alone, beside = writer["writer_samples_per_s"], writer["extraction_samples_per_s"]
    return [f"| cache writer alone, full-size layout ({writer['values']}): inline / writer thread / writer process | "
            f"{alone['inline']} / {alone['thread']} / {alone['process']} samples/s (median of {writer['repeats']}) |",
            f"| stand-in extraction, a model at {writer['model_images_per_s']:g} img/s + cache writes: inline / "
            f"writer thread / writer process | {beside['inline']} / {beside['thread']} / {beside['process']} "
            "samples/s |"]


def _cache_rows(results: dict) -> list[str]:
    """Cache bytes on disk, the GenImage estimate, reads (plain and packed) and creation."""
    lines = []
    sizes = results.get("cache_bytes")
    if sizes:
        for name in ("lare", "pooled", "fmap", "metadata"):
            s = sizes[name]
            ratio = f", {s['compression_ratio']}x" if s["compression_ratio"] else ""
            lines.append(f"| cache `{name}` on disk | {s['bytes_per_sample'] / 1e3:.1f} kB/sample{ratio} |")
        lines.append(f"| cache total on disk | {sizes['total']['bytes_per_sample'] / 1e3:.1f} kB/sample |")
    estimate = results.get("genimage_estimate")
    if estimate:
        lines.append(f"| GenImage ({estimate['samples']:,} images) cache | {estimate['terabytes']} TB "
                     f"(uncompressed {estimate['uncompressed_terabytes']} TB) |")
    reads = results.get("reads")
    if reads:
        lines.append(f"| cache reads, random blocks | {reads['block_reads']['samples_per_s']} samples/s "
                     f"({reads['block_reads']['raw_mb_per_s']} MB/s decoded) |")
        lines.append(f"| cache reads, random single samples | {reads['single_sample_reads']['samples_per_s']} "
                     "samples/s |")
    packed = results.get("packed_reads")
    if reads and packed:
        blocks = packed.get("pack_blocks", packed.get("shard_blocks"))  # bench.json written before the rename
        lines.append(f"| packed cache ({blocks} blocks per file), random blocks | "
                     f"{packed['block_reads']['samples_per_s']} samples/s, {packed['files']} files instead of "
                     f"{reads['files']} (packed in {packed['pack_seconds']} s) |")
        lines.append(f"| packed cache, random single samples | {packed['single_sample_reads']['samples_per_s']} "
                     "samples/s |")
    creation = results.get("creation")
    if creation:
        lines.append(f"| cache creation, {creation['samples']:,} samples | {creation['seconds']} s, "
                     f"{creation['files']:,} files (GenImage: ~{creation['genimage_seconds_estimate']} s, "
                     f"~{creation['genimage_files_estimate']:,} files{earlier(creation)}) |")
    return lines


def _reader_rows(results: dict) -> list[str]:
    """Stage 2's reader and training throughput."""
    reader = results.get("reader")
    if not reader:
        return []
    lines = []
    r = reader["reader_samples_per_s"]
    rounds = reader.get("rounds", {})
    measured = reader.get("measured")
    if measured:  # remeasured on its own (--only-reader), or carried over from an earlier run
        lines.append(f"| stage-2 rows below measured {(measured['date'] or '-')[:19]} ({_commit_text(measured)}, "
                     f"load {measured['load_average']}): `{measured['command']}` | |")
    lines.append(f"| stage-2 reader, 0 / 1 / 2 read workers (full-size cache, {reader['samples']:,} samples) | "
                 f"{r['0']} / {r['1']} / {r['2']} samples/s (median of {len(rounds.get('ratio', [])) or 1}) |")
    spread = f"; rounds {', '.join(map(str, rounds['ratio']))}" if "ratio" in rounds else ""
    lines.append(f"| EGRE training epoch on CPU, from the cache / from memory | "
                 f"{reader['train_from_cache_samples_per_s']} / {reader['train_in_memory_samples_per_s']} samples/s "
                 f"(median per-round ratio {reader['cache_over_memory_ratio']}{spread}) |")
    return lines


def markdown(results: dict) -> str:
    """The whole table; a measurement missing from ``results`` (skipped, or not reached yet) has no rows."""
    load = (f"; load average (1, 5, 15 min) {results['load_average_at_start']} at the start"
            if "load_average_at_start" in results else "")
    lines = ["# Stage 1 benchmarks", "", f"Machine: {results['machine']}{load}", "",
             f"Date: {results.get('date', '-')}; command: `{results.get('command', '-')}`; "
             f"{results.get('seconds', '-')} s", "",
             "| figure | value |", "| --- | --- |"]
    lines += _extraction_rows(results) + _host_rows(results) + _cache_rows(results) + _reader_rows(results)
    return "\n".join(lines) + "\n"
