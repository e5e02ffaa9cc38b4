"""Benchmark the ASR example's data path: peak RSS and feature-extraction throughput vs corpus size.

The default synthetic corpus (:class:`examples.asr.corpus.CorpusConfig`) is tiled 1x, 4x and
16x (every split; each copy gets new speaker ids, its audio files are symbolic links to the
originals, its transcripts are rewritten), so the corpus grows in hours and users while the
audio stays real FLAC. For each size, in fresh processes:

1. **extract**: read the four splits and run :func:`examples.asr.store.extract_splits` into an
   empty cache (``--workers`` processes); wall time, utterances/s, audio hours per wall hour,
   peak RSS of the parent and of the largest worker.
2. **store path**: what a run holds in memory with the on-disk store: lazy seed and eval batches
   and a :class:`~examples.asr.store.StoredFederatedDataset`, then one pass over all seed
   batches, every user's ``user_data`` and all eval batches; peak RSS.
3. **in-memory path** (the example before the store, sizes up to ``--max-in-memory``): every
   feature as a float32 tensor in a dict plus ``make_batches`` copies, as
   ``cached_features`` + ``make_batches`` held them; peak RSS. Features are read from the store
   here (the same float16-rounded values ``cached_features`` returns) to save the time of a
   second single-process extraction.

Usage::

    python benchmarks/asr_data.py                       # 1x, 4x, 16x; writes benchmarks/results/asr_data.*
    python benchmarks/asr_data.py --scales 1 4 --workers 2

The corpus is generated on first use under ``--cache-dir`` (default ``$DPFL_CACHE`` or
``~/.cache/dpfl``, about 240 MB and a few minutes); tiles and feature stores go to
``--work-dir`` (default: a temporary folder, deleted afterwards). Absolute times depend on the
(shared) machine; RSS does not.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SPLITS = ("seed-train", "fl-train", "eval", "seed-dev")


def tile_corpus(corpus: Path, out: Path, scale: int) -> None:
    """Write a LibriSpeech-layout copy of ``corpus`` with every speaker ``scale`` times."""
    for split in SPLITS:
        for speaker in sorted(p for p in (corpus / split).iterdir() if p.is_dir()):
            for chapter in sorted(p for p in speaker.iterdir() if p.is_dir()):
                trans = (chapter / f"{speaker.name}-{chapter.name}.trans.txt").read_text()
                for copy in range(scale):
                    new = f"{speaker.name}{copy:02d}"
                    folder = out / split / new / chapter.name
                    folder.mkdir(parents=True)
                    lines = []
                    for line in trans.splitlines():
                        utt, _, text = line.partition(" ")
                        new_utt = new + utt[len(speaker.name):]
                        (folder / f"{new_utt}.flac").symlink_to(chapter / f"{utt}.flac")
                        lines.append(f"{new_utt} {text}\n")
                    (folder / f"{new}-{chapter.name}.trans.txt").write_text("".join(lines))


def _peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux: kilobytes


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _read(root: Path) -> dict[str, Any]:
    from examples.asr.data import read_librispeech

    return {split: read_librispeech(root, split, verify_audio=False) for split in SPLITS}


def child_extract(root: Path, cache: Path, workers: int) -> dict[str, Any]:
    from examples.asr.store import extract_splits

    data = _read(root)
    start = time.perf_counter()
    stores = extract_splits({s: d.utterances() for s, d in data.items()}, cache_dir=cache,
                            workers=workers)
    seconds = time.perf_counter() - start
    utts = sum(len(s) for s in stores.values())
    hours = sum(s.hours() for s in stores.values())
    return {"seconds": seconds, "utterances": utts, "hours": hours,
            "utt_per_s": utts / seconds, "audio_h_per_wall_h": hours * 3600 / seconds,
            "rss_parent_mb": _peak_rss_mb(),
            "rss_worker_mb": _peak_rss_mb(resource.RUSAGE_CHILDREN),
            "store_mb": sum(f.stat().st_size for f in  # the splits share one packs folder
                            next(iter(stores.values())).directory.iterdir()) / 2**20}


def child_store_path(root: Path, cache: Path) -> dict[str, Any]:
    from examples.asr.store import StoredBatches, StoredFederatedDataset, extract_splits
    from examples.asr.text import CharTokenizer

    baseline = _current_rss_mb()  # interpreter, torch and torchaudio, before any data
    data = _read(root)
    stores = extract_splits({s: d.utterances() for s, d in data.items()}, cache_dir=cache,
                            workers=1)
    tok = CharTokenizer()
    start = time.perf_counter()
    seed = StoredBatches(stores["seed-train"], data["seed-train"].utterances(), tok,
                         batch_size=16, seed=0)
    ev = StoredBatches(stores["eval"], data["eval"].utterances(), tok, batch_size=64)
    users = StoredFederatedDataset(stores["fl-train"], data["fl-train"].users, tok,
                                   batch_size=4, seed=0)
    frames = 0
    for batch in seed:
        frames += int(batch.lengths.sum())
    for uid in users.user_ids():
        frames += sum(int(b.lengths.sum()) for b in users.user_data(uid))
    for batch in ev:
        frames += int(batch.lengths.sum())
    return {"rss_mb": _peak_rss_mb(), "rss_imports_mb": baseline,
            "pass_seconds": time.perf_counter() - start, "frames_read": frames}


def child_in_memory(root: Path, cache: Path) -> dict[str, Any]:
    from examples.asr.store import extract_splits
    from examples.asr.text import CharTokenizer
    from examples.asr.train import make_batches

    data = _read(root)
    stores = extract_splits({s: d.utterances() for s, d in data.items()}, cache_dir=cache,
                            workers=1)
    tok = CharTokenizer()
    feats = {s: {u.utterance_id: stores[s][u.utterance_id] for u in d.utterances()}
             for s, d in data.items()}
    seed = make_batches([feats["seed-train"][u.utterance_id] for u in data["seed-train"].utterances()],
                        [u.transcript for u in data["seed-train"].utterances()], tok,
                        batch_size=16, seed=0)
    users = {uid: make_batches([feats["fl-train"][u.utterance_id] for u in utts],
                               [u.transcript for u in utts], tok, batch_size=4, seed=0)
             for uid, utts in data["fl-train"].users.items()}
    ev = make_batches([feats["eval"][u.utterance_id] for u in data["eval"].utterances()],
                      [u.transcript for u in data["eval"].utterances()], tok, batch_size=64)
    del seed, users, ev
    return {"rss_mb": _peak_rss_mb()}


def _child(kind: str, *args: str) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    proc = subprocess.run([sys.executable, __file__, "--child", kind, *args], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def measure(corpus: Path, work: Path, scales: list[int], workers: int, max_in_memory: int,
            out: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for scale in scales:
        root, cache = work / f"tile-{scale}", work / f"cache-{scale}"
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        tile_corpus(corpus, root, scale)
        row: dict[str, Any] = {"scale": scale}
        row["extract"] = _child("extract", str(root), str(cache), str(workers))
        row["store_path"] = _child("store", str(root), str(cache))
        if scale <= max_in_memory:
            row["in_memory_path"] = _child("memory", str(root), str(cache))
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        write_results(rows, out, workers)  # after every size: a killed run keeps what it has
    return rows


def write_results(rows: list[dict[str, Any]], out: Path, workers: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "load_average": os.getloadavg(), "workers": workers}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [
        "# ASR data path: peak RSS and extraction throughput vs corpus size",
        "",
        f"{meta['date']}, Python {meta['python']}, {meta['cpus']} CPUs, load average "
        f"{meta['load_average'][0]:.1f} at the end (shared machine), {workers} extraction "
        "workers. Command: `python benchmarks/asr_data.py` (default synthetic corpus tiled).",
        "",
        "| corpus | utterances | audio h | extraction s | utt/s | audio h per wall h | "
        "store MB | peak RSS, extraction parent / worker (MB) | RSS after imports (MB) | "
        "peak RSS, store path (MB) | peak RSS, in-memory path (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e, s = r["extract"], r["store_path"]
        mem = r.get("in_memory_path", {}).get("rss_mb")
        lines.append(
            f"| {r['scale']}x | {e['utterances']:,} | {e['hours']:.2f} | {e['seconds']:.0f} | "
            f"{e['utt_per_s']:.0f} | {e['audio_h_per_wall_h']:.0f} | {e['store_mb']:.0f} | "
            f"{e['rss_parent_mb']:.0f} / {e['rss_worker_mb']:.0f} | "
            + (f"{s['rss_imports_mb']:.0f} | " if "rss_imports_mb" in s else "– | ")
            + f"{s['rss_mb']:.0f} | "
            + (f"{mem:.0f} |" if mem is not None else "not run |"))
    lines += [
        "",
        "Store path: lazy batches and a `StoredFederatedDataset`, one pass over every seed batch, "
        "every user and every eval batch (what a run reads). In-memory path: all features as "
        "float32 tensors plus `make_batches` copies (the example before the store).",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, out.with_suffix(".png"))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hours = [r["extract"]["hours"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(hours, [r["store_path"]["rss_mb"] for r in rows], "o-", label="store path (run)")
    left.plot(hours, [r["extract"]["rss_parent_mb"] for r in rows], "s--",
              label="extraction, parent")
    mem = [(r["extract"]["hours"], r["in_memory_path"]["rss_mb"]) for r in rows
           if "in_memory_path" in r]
    if mem:
        left.plot(*zip(*mem, strict=True), "x:", label="in-memory path (before)")
    left.set(xlabel="corpus audio (hours)", ylabel="peak RSS (MB)", title="Peak RSS")
    left.set_ylim(bottom=0)
    left.legend()
    right.plot(hours, [r["extract"]["audio_h_per_wall_h"] for r in rows], "o-")
    right.set(xlabel="corpus audio (hours)", ylabel="audio hours per wall-clock hour",
              title="Feature extraction throughput")
    right.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16],
                   help="tiling factors of the default corpus")
    p.add_argument("--workers", type=int, default=None,
                   help="extraction processes (default: the CPUs available)")
    p.add_argument("--max-in-memory", type=int, default=4,
                   help="largest scale for the in-memory comparison (16x needs ~10 GB)")
    p.add_argument("--cache-dir", type=Path, default=None, help="where the corpus is generated")
    p.add_argument("--work-dir", type=Path, default=None, help="tiles and stores (temporary)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "asr_data.md")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "extract":
            result = child_extract(Path(rest[0]), Path(rest[1]), int(rest[2]))
        elif kind == "store":
            result = child_store_path(Path(rest[0]), Path(rest[1]))
        else:
            result = child_in_memory(Path(rest[0]), Path(rest[1]))
        print(json.dumps(result))
        return
    from examples.asr.corpus import CorpusConfig, ensure_corpus
    from examples.asr.store import _available_cpus

    workers = args.workers or _available_cpus()
    corpus = ensure_corpus(CorpusConfig(), cache_dir=args.cache_dir, workers=workers,
                           progress=True)
    with tempfile.TemporaryDirectory(prefix="asr-data-") as tmp:
        work = args.work_dir or Path(tmp)
        measure(corpus, work, sorted(args.scales), workers, args.max_in_memory, args.out)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
