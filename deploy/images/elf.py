"""Strip the symbol tables from compiled extension modules: ``python3 elf.py DIR``.

Several wheels ship their extension modules unstripped (uvloop, zstandard, cryptography,
pyqwest: about 45 MB of symbols in the worker's virtualenv). Only 64-bit ELF files with
a ``.symtab`` or ``.debug*`` section are stripped (``strip --strip-unneeded``), and never
the libraries auditwheel bundles in ``<package>.libs/``: those were rewritten by patchelf,
which ``strip`` can break, and come stripped already.

Used in two places: ``build.py`` strips the wheels of the wheelhouse on the host, and the
images' build stage runs this file on the virtualenv when it installs from the package
index (it has binutils there). Standard library only.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path


def has_symbols(data: bytes) -> bool:
    """True for a 64-bit little-endian ELF file with a symbol table or debug sections."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if not shoff or shstrndx >= shnum or shoff + shnum * shentsize > len(data):
        return False

    def section(i: int) -> tuple[int, int, int]:
        (name,) = struct.unpack_from("<I", data, shoff + i * shentsize)
        offset, size = struct.unpack_from("<QQ", data, shoff + i * shentsize + 0x18)
        return name, offset, size

    _, str_off, str_size = section(shstrndx)
    names = data[str_off : str_off + str_size]
    for i in range(shnum):
        start = section(i)[0]
        name = names[start : names.find(b"\0", start)]
        if name == b".symtab" or name.startswith(b".debug"):
            return True
    return False


def is_extension(name: str) -> bool:
    """A shared object by its name, outside any ``*.libs`` directory."""
    parts = name.split("/")
    shared = parts[-1].endswith(".so") or ".so." in parts[-1]
    return shared and not any(p.endswith(".libs") for p in parts[:-1])


def strip_file(path: Path, strip: str) -> None:
    subprocess.run([strip, "--strip-unneeded", str(path)], check=True, timeout=120)


def strip_tree(root: Path) -> tuple[int, int]:
    """Strip every extension module under ``root`` that has symbols; return how many
    files were stripped and the bytes saved."""
    strip = shutil.which("strip")
    if strip is None:
        raise SystemExit("elf.py: strip (binutils) is not installed")
    count = saved = 0
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        if not is_extension(path.relative_to(root).as_posix()):
            continue
        before = path.stat().st_size
        if not has_symbols(path.read_bytes()):
            continue
        strip_file(path, strip)
        count += 1
        saved += before - path.stat().st_size
    return count, saved


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python3 elf.py DIRECTORY", file=sys.stderr)
        return 2
    count, saved = strip_tree(Path(argv[1]))
    print(f"elf.py: stripped {count} extension modules, {saved / 1e6:.1f} MB saved")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
