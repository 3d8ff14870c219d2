"""`--data wds:PATTERN`: WebDataset tar shards, streamed.

A shard is a plain tar whose members are grouped by key: `KEY.png` (or .jpg, .webp, ...) holds the
image and `KEY.cls` its class index as text. `vitkit data shard` writes them as `{split}-000000.tar`,
... with an `index.json` (classes, channels, shards and sample counts per split).

`wds:DIR` reads such a folder; `wds:PATTERN` takes brace ranges and globs, e.g.
`wds:/data/in1k/{split}-{000000..001023}.tar`, where `{split}` stands for train, val and test.

Streaming: each (rank, worker) reads its own shards (or every k-th sample when there are fewer shards
than readers), shuffles through a buffer, and yields a defined number of samples per epoch, cycling
over its shards when they run short, so every rank takes the same number of steps.
Tar members are read in memory only: links, devices and folders are skipped, and a member whose name
is absolute or climbs out with `..` is refused, so no path ever leaves the shard.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import math
import random
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.transforms.v2 import functional as TF

from vitkit.core.errors import VitkitError
from vitkit.core.files import atomic_path, write_text
from vitkit.data.folder import GREY_MODES
from vitkit.data.splits import LoadedData, SplitData
from vitkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD

INDEX = "index.json"
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "tif", "tiff")
MAX_MEMBER_BYTES = 64 << 20  # one image member; larger is not an image we decode
# one sample: "__key__" (str, the shared name) and the bytes of each member by extension ("png", "cls")
Sample = dict[str, Any]


@dataclass
class ShardSet:
    """The shards of one split, their sample counts (None: unknown until scanned) and an epoch cap."""

    shards: list[Path]
    counts: list[int] | None = None
    limit: int | None = None  # a subset: this many samples per epoch (the first of the stream)

    def __len__(self) -> int:
        if self.counts is None:
            self.counts = [sum(1 for _ in iter_samples(s)) for s in self.shards]
        total = sum(self.counts)
        return min(total, self.limit) if self.limit is not None else total

    def select(self, index: torch.Tensor) -> ShardSet:
        return replace(self, limit=len(index))

    def labels(self) -> Iterator[int]:
        for shard in self.shards:
            for sample in iter_samples(shard, decode_keys=("cls",)):
                yield parse_label(sample, shard)


# -- patterns ---------------------------------------------------------------------------------------
def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar; `{x,y}` -> x, y (nested braces expand too)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [out for option in options for out in expand_braces(head + option + tail)]


def _expand(pattern: str) -> list[Path]:
    paths: list[Path] = []
    for item in expand_braces(pattern):
        paths += [Path(p) for p in sorted(glob.glob(item))] if any(c in item for c in "*?[") else [Path(item)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"shard {missing[0]} does not exist ({len(missing)} of {len(paths)} missing)")
    return paths


@dataclass
class ShardSource:
    """What `wds:...` names: shards per split, classes and channels (from index.json when there is one)."""

    splits: dict[str, ShardSet]
    classes: list[str] | None = None
    in_chans: int | None = None
    where: str = ""
    stats: dict = field(default_factory=dict)


def open_source(spec: str) -> ShardSource:
    """Resolve `wds:DIR` (with index.json) or `wds:PATTERN` (optional `{split}`) to its shards."""
    target = spec.removeprefix("wds:")
    folder = Path(target).expanduser()
    if folder.is_dir():
        index_file = folder / INDEX
        if not index_file.is_file():
            raise FileNotFoundError(
                f"{folder} has no {INDEX}: write shards with `vitkit data shard`, or give "
                f"wds:{folder}/{{split}}-{{000000..000009}}.tar"
            )
        index = json.loads(index_file.read_text())
        splits = {
            name: ShardSet([folder / s for s in part["shards"]], list(part["counts"]))
            for name, part in index["splits"].items()
        }
        return ShardSource(splits, index.get("classes"), index.get("in_chans"), str(folder))
    if "{split}" in target:
        splits = {}
        for name in ("train", "val", "test"):
            pattern = target.replace("{split}", name)
            if any(Path(p).is_file() for item in expand_braces(pattern) for p in glob.glob(item)):
                splits[name] = ShardSet(_expand(pattern))  # one shard present: all must be
    else:
        splits = {"train": ShardSet(_expand(target))}
    if not splits:
        raise FileNotFoundError(f"no shards match {target}")
    return ShardSource(splits, None, None, target)


# -- reading ----------------------------------------------------------------------------------------
def _safe_name(name: str, shard: Path) -> str:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name:
        raise VitkitError(
            f"shard {shard} has a member named {name!r} that leaves the shard: rewrite the shard "
            "(`vitkit data shard`) from the original images"
        )
    return name


def iter_samples(shard: Path, decode_keys: tuple[str, ...] | None = None) -> Iterator[Sample]:
    """The samples of one shard in order: {"__key__": key, extension: bytes, ...}, read without extracting.

    `decode_keys` keeps only those extensions (e.g. ("cls",) to count or label without reading images).
    """
    sample: Sample = {}
    try:
        with tarfile.open(shard, mode="r|*") as tar:  # a stream: one pass, no seeking
            for member in tar:
                if not member.isfile():  # links, folders, devices: never followed
                    continue
                name = _safe_name(member.name, shard)
                if member.size > MAX_MEMBER_BYTES:
                    raise VitkitError(
                        f"shard {shard}: member {name} is {member.size} bytes, over the "
                        f"{MAX_MEMBER_BYTES >> 20} MiB limit for one image"
                    )
                base = name.rsplit("/", 1)[-1]
                stem, dot, ext = base.partition(".")
                key = name[: len(name) - len(base)] + stem
                if not dot or stem.startswith("."):
                    continue  # tar headers of other tools (e.g. ._ files): not a sample part
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                sample["__key__"] = key
                if decode_keys is None or ext.lower() in decode_keys:
                    sample[ext.lower()] = tar.extractfile(member).read()
    except tarfile.TarError as err:
        raise VitkitError(f"shard {shard} is not a readable tar ({err}): re-copy or rewrite it") from None
    if sample:
        yield sample


def parse_label(sample: Sample, shard: Path) -> int:
    raw = sample.get("cls")
    if raw is None:
        raise VitkitError(f"shard {shard}: sample {sample['__key__']} has no .cls member (its class index)")
    try:
        return int(raw.decode().strip())
    except ValueError:
        raise VitkitError(f"shard {shard}: sample {sample['__key__']} has label {raw[:20]!r}, not an integer") from None


def decode_image(sample: Sample, shard: Path, mode: str | None) -> Image.Image:
    """The sample's image converted to `mode` ("L" or "RGB"; None: as stored)."""
    ext = next((k for k in IMAGE_KEYS if k in sample), None)
    if ext is None:
        raise VitkitError(f"shard {shard}: sample {sample['__key__']} has no image ({', '.join(IMAGE_KEYS)})")
    try:
        with Image.open(io.BytesIO(sample[ext])) as img:
            img.load()
            return img.convert(mode) if mode else img.copy()
    except (OSError, ValueError, SyntaxError) as err:
        raise VitkitError(f"shard {shard}: cannot decode {sample['__key__']}.{ext} ({err})") from None


# -- the streamed dataset ---------------------------------------------------------------------------
class ShardStream(IterableDataset):
    """(transform(uint8 image (C, H, W)), label) pairs streamed from shards, split over ranks and workers.

    `configure` (called by `vitkit.data.samplers.build_loader`) sets shuffling, the seed, this rank and
    the batch size; `set_epoch` reshuffles. Training (`pad=True`) yields a defined count per epoch:
    ceil(total / world_size) per rank, cut to whole batches and spread over the workers, so every rank
    takes the same number of steps. Evaluation (`pad=False`) yields each sample exactly once overall.
    """

    def __init__(
        self, shards: ShardSet, in_chans: int, transform: Callable | None = None, shuffle_buffer: int = 1000
    ) -> None:
        self.set = shards
        self.mode = "L" if in_chans == 1 else "RGB"
        self.transform = transform
        self.shuffle_buffer = shuffle_buffer
        self.shuffle, self.seed, self.rank, self.world_size, self.pad = False, 0, 0, 1, False
        self.batch_size: int | None = None  # with pad: the per-worker counts are whole batches
        self.epoch = 0

    def configure(
        self, *, shuffle: bool, seed: int, rank: int, world_size: int, pad: bool, batch_size: int | None = None
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.pad, self.batch_size = pad, batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_count(self) -> int:
        total = len(self.set)
        if self.pad:
            return math.ceil(total / self.world_size)
        return len(range(self.rank, total, self.world_size))

    def _worker_count(self, worker: int, workers: int) -> int:
        count = self._rank_count()
        if self.pad and self.batch_size and count >= self.batch_size:  # whole batches (the loader drops the rest)
            batches = count // self.batch_size
            return (batches // workers + (worker < batches % workers)) * self.batch_size
        return count // workers + (worker < count % workers)

    def __len__(self) -> int:
        # the samples this rank yields per epoch, over all its workers
        count = self._rank_count()
        if self.pad and self.batch_size and count >= self.batch_size:
            return count // self.batch_size * self.batch_size
        return count

    def _samples(self, reader: int, readers: int, rng: random.Random) -> Iterator[tuple[dict, Path]]:
        """This reader's samples for one pass: whole shards when there are enough, else every k-th sample."""
        order = list(range(len(self.set.shards)))
        if self.shuffle:
            rng.shuffle(order)
        shards = [self.set.shards[i] for i in order]
        if len(shards) >= readers:
            for shard in shards[reader::readers]:
                for sample in iter_samples(shard):
                    yield sample, shard
            return
        n = 0
        for shard in shards:
            for sample in iter_samples(shard, decode_keys=None):
                if n % readers == reader:
                    yield sample, shard
                n += 1

    def _raw(self) -> Iterator[tuple[dict, Path]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader, readers = self.rank * workers + worker, self.world_size * workers
        quota = self._worker_count(worker, workers)
        rng = random.Random(f"{self.seed}:{self.epoch}:{reader}")
        order_rng = random.Random(f"{self.seed}:{self.epoch}")  # every reader sees the same shard order
        if self.set.limit is not None and not self.pad:  # a subset: the first `limit` samples of the stream
            head = itertools.islice(self._samples(0, 1, order_rng), len(self.set))
            yield from itertools.islice(head, reader, None, readers)
            return
        if not self.pad:
            yield from self._samples(reader, readers, order_rng)
            return
        given = 0
        while given < quota:  # cycle over this reader's part until the epoch's count
            before = given
            for item in self._buffered(self._samples(reader, readers, order_rng), rng):
                yield item
                given += 1
                if given == quota:
                    return
            if given == before:
                raise VitkitError(f"shards {self.set.shards[0]}...: reader {reader} of {readers} found no samples")

    def _buffered(self, stream: Iterator, rng: random.Random) -> Iterator:
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from stream
            return
        buffer: list = []
        for item in stream:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            j = rng.randrange(len(buffer))
            buffer[j], item = item, buffer[j]
            yield item
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        for sample, shard in self._raw():
            image = TF.pil_to_tensor(decode_image(sample, shard, self.mode))  # (C, H, W) uint8
            if self.transform is not None:
                image = self.transform(image)
            yield image, parse_label(sample, shard)


# -- writing ----------------------------------------------------------------------------------------
def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")  # lossless
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644  # fixed metadata: the same images, the same bytes
    tar.addfile(info, io.BytesIO(payload))


def write_split(
    items: Iterator[tuple[Image.Image | bytes, int]], output: Path, split: str, shard_size: int
) -> tuple[list[str], list[int]]:
    """Write `items` (image or its PNG bytes, label) as `{split}-NNNNNN.tar` shards of `shard_size` samples.

    Each shard is encoded in memory and written through a temporary file, so none is ever half-written.
    """
    names: list[str] = []
    counts: list[int] = []
    items = iter(items)
    start = 0
    while chunk := list(itertools.islice(items, shard_size)):
        names.append(f"{split}-{len(names):06d}.tar")
        with atomic_path(output / names[-1]) as tmp, tarfile.open(tmp, "w") as tar:
            for i, (image, label) in enumerate(chunk, start):
                key = f"{split}_{i:09d}"
                _add(tar, f"{key}.png", image if isinstance(image, bytes) else png_bytes(image))
                _add(tar, f"{key}.cls", str(int(label)).encode())
        counts.append(len(chunk))
        start += len(chunk)
    return names, counts


def write_index(
    output: Path, classes: list[str], in_chans: int, splits: dict[str, tuple[list[str], list[int]]]
) -> None:
    index = {
        "format": "webdataset",
        "classes": classes,
        "in_chans": in_chans,
        "splits": {name: {"shards": names, "counts": counts} for name, (names, counts) in splits.items()},
    }
    write_text(output / INDEX, json.dumps(index, indent=1) + "\n")


def load(config: Any, splits: tuple[str, ...]) -> Any:
    """`LoadedData` of `wds:...` (`config.data`). Streams cannot hold out val: shard it as a split."""
    source = open_source(config.data)
    classes = source.classes
    if classes is None:  # no index: classes 0..K-1 from the labels of every split
        top = max(max(part.labels(), default=0) for part in source.splits.values())
        classes = [str(i) for i in range(top + 1)]
    in_chans = source.in_chans
    if in_chans is None:
        first = next(iter(source.splits.values())).shards[0]
        sample = next(iter_samples(first), None)
        if sample is None:
            raise VitkitError(f"shard {first} holds no samples")
        ext = next((k for k in IMAGE_KEYS if k in sample), None)
        with Image.open(io.BytesIO(sample.get(ext, b""))) as img:
            in_chans = 1 if img.mode in GREY_MODES else 3
    return LoadedData(
        source=config.data,
        classes=list(classes),
        in_chans=in_chans,
        native_size=None,
        mean=IMAGENET_MEAN if in_chans == 3 else [0.5],
        std=IMAGENET_STD if in_chans == 3 else [0.5],
        splits={k: SplitData(source=v) for k, v in source.splits.items() if k in splits},
    )
