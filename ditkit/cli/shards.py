"""``ditkit shards``: an image folder -> webdataset tar shards."""

from __future__ import annotations

from pathlib import Path

from ditkit.cli.common import UsageError, add_progress


def add_parser(sub) -> None:
    p = sub.add_parser(
        "shards",
        help="image folder -> webdataset tar shards",
        description="Write an image folder (class = sub-folder) as webdataset "
        "tar shards (KEY.png/.jpg + KEY.cls) for `data: {kind: webdataset}`.",
    )
    p.add_argument("folder", help="image folder (class = sub-folder, or flat: no labels)")
    p.add_argument("--out", required=True, help="folder for shard-NNNNNN.tar")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    add_progress(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ditkit.data.datasets import DataError, image_folder_samples, write_shards

    if args.shard_size < 1:
        raise UsageError(f"--shard-size {args.shard_size}: must be positive")
    out = Path(args.out)
    if out.is_dir() and any(out.glob("*.tar")):
        raise UsageError(f"--out {out} already holds .tar shards; choose an empty folder")
    try:
        paths = write_shards(
            image_folder_samples(args.folder), out, args.shard_size, progress=not args.no_progress
        )
    except DataError as err:
        raise UsageError(str(err).replace("data.path: ", f"{args.folder}: ")) from None
    print(
        f"wrote {len(paths)} shard(s) to {out}; train with data: {{kind: webdataset, "
        f"shards: '{out}/shard-{{{0:06d}..{len(paths) - 1:06d}}}.tar'}}"
    )
    return 0
