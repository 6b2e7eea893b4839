"""Build the two images without a registry or network in ``docker build``, and test them.

``make images`` runs ``build.py images``, ``make image-test`` runs ``build.py test``:

1. **Tools.** ``dockerd`` and ``debootstrap`` are installed with apt when missing (as root).
2. **Engine.** When no Docker engine answers, ``dockerd --iptables=false --bridge=none`` is
   started as root for the duration of the command and stopped at the end (also on
   failure, Ctrl-C or SIGTERM); one that already runs is used and left alone. Without a
   bridge network, containers use ``--network host`` (the tests bind 127.0.0.1).
3. **Base image.** ``debootstrap --variant=minbase`` of Debian bookworm with Python 3.11,
   trimmed (apt lists and caches, documentation but the copyright files, manuals,
   translations), imported as ``jennah-base:bookworm-<key>``. The root filesystem is
   cached as a tarball in ``.cache/images/``; the key is a hash of how it is made.
4. **Wheelhouse.** ``pip wheel`` of the project with every extra, on this host, with the
   Python the images run (3.11): the C extensions are compiled here (crcmod's
   ``_crcfunext`` is checked), and extension modules that carry symbol tables are
   stripped (their RECORD rewritten to match). The jennah wheel itself is left out: the
   images build it from their own copy of the source. Cached in
   ``.cache/images/wheelhouse/`` under a key made of the dependency lists, the Python
   version and the machine.
5. **Images.** ``docker build`` of ``Dockerfile.worker`` and ``Dockerfile.gateway`` with
   ``BASE_IMAGE`` and ``WHEELHOUSE`` set, tagged ``jennah-<role>:local``; the build time
   and image size of each are printed.
6. **Tests** (``test`` only): ``pytest -m images tests/images`` against those tags.

``base`` and ``wheelhouse`` run one step alone, for an offline build elsewhere
(``docs/deploy.md``). Every step has a time limit and the whole command one more
(``--timeout``). Standard library only.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))
from elf import has_symbols, is_extension, strip_file

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "images"
WHEELHOUSE = CACHE / "wheelhouse"
ROLES = ("worker", "gateway")
TAG = "local"
PYTHON = (3, 11)  # what the images run: Debian bookworm's python3, python:3.11-slim

SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
# Kept out of the base (and, through dpkg, out of what is installed on top of it later).
DPKG_EXCLUDES = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
"""
# Bump when the base recipe or the wheelhouse recipe changes in a way the keys cannot see.
RECIPE = "1"

TEST_LABEL = "org.jennah.image-test"  # on every container tests/images/ starts
STEP_TIMEOUT = 900.0
ENGINE_START_TIMEOUT = 60.0


class BuildError(Exception):
    """A step failed; the message says which and why."""


class NoEngine(BuildError):
    """No Docker engine answers, and none can be started here."""


def log(message: str) -> None:
    print(f"[images] {message}", file=sys.stderr, flush=True)


def run(cmd: Sequence[str], *, timeout: float = STEP_TIMEOUT, quiet: bool = False,
        **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; raise BuildError (with its output when quiet) if it fails."""
    capture = subprocess.PIPE if quiet else None
    try:
        proc = subprocess.run(list(cmd), text=True, timeout=timeout, stdout=capture,
                              stderr=subprocess.STDOUT if quiet else None,
                              check=False, **kwargs)  # type: ignore[call-overload]
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"{' '.join(cmd[:2])} took over {timeout:.0f} s") from exc
    if proc.returncode != 0:
        tail = (proc.stdout or "")[-3000:] if quiet else ""
        raise BuildError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}) {tail}")
    return proc  # type: ignore[no-any-return]


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([RECIPE, *parts], sort_keys=True).encode()).hexdigest()[:12]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


# --- tools and engine ----------------------------------------------------------------------


def ensure_tool(exe: str, package: str) -> str:
    """The path of ``exe``, installing its Debian package with apt first if it is missing
    (as root); BuildError when it cannot be had."""
    found = _which(exe)
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BuildError(f"{exe} is missing: install {package} (apt-get install -y {package})")
    log(f"installing {package} with apt (for {exe})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", package]
    try:
        run(install, quiet=True, env=env)
    except BuildError:
        run(["apt-get", "update", "-q"], quiet=True, env=env)
        run(install, quiet=True, env=env)
    found = _which(exe)
    if not found:
        raise BuildError(f"{package} is installed but {exe} is still missing")
    return found


def _which(exe: str) -> str | None:
    return shutil.which(exe) or shutil.which(exe, path="/usr/sbin:/sbin:/usr/local/sbin")


def engine_answers() -> bool:
    try:
        proc = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                              capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and bool(proc.stdout.strip())


@contextlib.contextmanager
def engine() -> Iterator[None]:
    """A Docker engine for the duration: the running one, or a dockerd started (and then
    stopped) here. Raises NoEngine when there is none and none can be started."""
    if engine_answers():
        yield
        return
    if os.geteuid() != 0:
        raise NoEngine("no Docker engine answers and starting dockerd needs root")
    try:
        dockerd = ensure_tool("dockerd", "docker.io")
    except BuildError as exc:
        raise NoEngine(f"no Docker engine answers and {exc}") from exc
    CACHE.mkdir(parents=True, exist_ok=True)
    log_path = CACHE / "dockerd.log"
    log(f"starting dockerd --iptables=false --bridge=none (log: {log_path})")
    with log_path.open("ab") as out:
        proc = subprocess.Popen([dockerd, "--iptables=false", "--bridge=none"], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + ENGINE_START_TIMEOUT
        while not engine_answers():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise NoEngine(f"dockerd did not come up (exit {proc.poll()}); see {log_path}")
            time.sleep(0.5)
        yield
    finally:
        log(f"stopping the dockerd started here (pid {proc.pid})")
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def image_exists(ref: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", ref], capture_output=True,
                          timeout=30, check=False).returncode == 0


def image_size(ref: str) -> int:
    out = run(["docker", "image", "inspect", "--format", "{{.Size}}", ref], quiet=True).stdout
    return int(out.strip())


# --- base image ----------------------------------------------------------------------------


def base_image() -> str:
    """The Debian base image's tag, built (or loaded from the cached tarball) if needed."""
    mirror = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
    key = _key(SUITE, BASE_PACKAGES, BASE_ENV, DPKG_EXCLUDES, platform.machine())
    tag = f"jennah-base:{SUITE}-{key}"
    if image_exists(tag):
        log(f"base image {tag}: present")
        return tag
    tarball = CACHE / f"base-{SUITE}-{key}.tar"
    if not tarball.exists():
        make_rootfs_tarball(tarball, mirror)
    changes = [f"ENV {k}={v}" for k, v in BASE_ENV.items()] + ['CMD ["python3"]']
    cmd = ["docker", "import"]
    for change in changes:
        cmd += ["--change", change]
    run([*cmd, str(tarball), tag], quiet=True)
    log(f"base image {tag}: imported from {tarball.name}")
    return tag


def make_rootfs_tarball(tarball: Path, mirror: str) -> None:
    """debootstrap a trimmed Debian into ``tarball`` (written atomically; old ones removed)."""
    if os.geteuid() != 0:
        raise BuildError("debootstrap needs root")
    ensure_tool("debootstrap", "debootstrap")
    CACHE.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rootfs-", dir=CACHE) as tmp:
        root = Path(tmp) / "root"
        log(f"debootstrap {SUITE} ({', '.join(BASE_PACKAGES)}) from {mirror}")
        run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
             SUITE, str(root), mirror], quiet=True)
        trim_rootfs(root)
        partial = tarball.with_suffix(".tar.partial")
        run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), "."], quiet=True)
        for old in CACHE.glob(f"base-{SUITE}-*.tar"):
            old.unlink()
        partial.rename(tarball)
    log(f"base root filesystem: {tarball.stat().st_size / 1e6:.0f} MB "
        f"in {time.monotonic() - started:.0f} s")


def trim_rootfs(root: Path) -> None:
    """Remove what a container never needs, and keep it out of later installs."""
    def clear(rel: str, keep: str = "") -> None:
        base = root / rel
        if not base.is_dir():
            return
        for path in sorted(base.rglob("*"), reverse=True):
            if keep and path.name == keep:
                continue
            if path.is_dir() and not path.is_symlink():
                with contextlib.suppress(OSError):
                    path.rmdir()  # only once empty (a kept file keeps its directory)
            else:
                path.unlink()

    for rel in ("var/cache/apt", "var/lib/apt/lists", "usr/share/man", "usr/share/info",
                "usr/share/locale", "usr/share/lintian", "var/log", "tmp", "var/tmp"):
        clear(rel)
    clear("usr/share/doc", keep="copyright")
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    for old in (root / "var/cache/debconf").glob("*-old"):
        old.unlink()
    # The engine provides these per container; the host's copies must not be baked in.
    for rel in ("etc/resolv.conf", "etc/hostname", "etc/machine-id"):
        path = root / rel
        if path.exists() or path.is_symlink():
            path.unlink()
            path.write_text("")
    (root / "etc/dpkg/dpkg.cfg.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/dpkg/dpkg.cfg.d/jennah-slim").write_text(DPKG_EXCLUDES)
    (root / "tmp").chmod(0o1777)
    (root / "var/tmp").chmod(0o1777)


# --- wheelhouse ----------------------------------------------------------------------------


def wheelhouse(python: str = sys.executable) -> Path:
    """The wheelhouse directory, (re)built when its key changed."""
    with (REPO / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)["project"]
    version = run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                  quiet=True).stdout.strip()
    if version != f"{PYTHON[0]}.{PYTHON[1]}":
        raise BuildError(f"{python} is Python {version}; the images run {PYTHON[0]}.{PYTHON[1]} "
                         "and the wheels must match it")
    key = _key(project.get("dependencies"), project.get("optional-dependencies"), version,
               platform.machine(), platform.libc_ver())
    stamp = WHEELHOUSE / "KEY"
    if stamp.exists() and stamp.read_text().strip() == key:
        log(f"wheelhouse {WHEELHOUSE.relative_to(REPO)}: present ({key})")
        return WHEELHOUSE
    started = time.monotonic()
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = CACHE / "wheelhouse.partial"
    shutil.rmtree(partial, ignore_errors=True)
    log(f"pip wheel .[all] with {python} into {partial.relative_to(REPO)}")
    run([python, "-m", "pip", "wheel", "-q", "--wheel-dir", str(partial), ".[all]",
         "pip", "setuptools", "wheel"], cwd=REPO, quiet=True)
    for own in partial.glob("jennah-*.whl"):
        own.unlink()  # built by the images from their own copy of the source
    stripped = sum(strip_wheel(w) for w in sorted(partial.glob("*.whl")))
    check_extensions(partial)
    (partial / "KEY").write_text(key + "\n")
    shutil.rmtree(WHEELHOUSE, ignore_errors=True)
    partial.rename(WHEELHOUSE)
    total = sum(p.stat().st_size for p in WHEELHOUSE.glob("*.whl"))
    log(f"wheelhouse: {len(list(WHEELHOUSE.glob('*.whl')))} wheels, {total / 1e6:.0f} MB, "
        f"{stripped} stripped, in {time.monotonic() - started:.0f} s")
    return WHEELHOUSE


def check_extensions(directory: Path) -> None:
    """The C extensions that have a slow pure-Python fallback must have been compiled."""
    wheels = list(directory.glob("crcmod-*.whl"))
    if not wheels:
        raise BuildError("no crcmod wheel in the wheelhouse")
    with zipfile.ZipFile(wheels[0]) as zf:
        if not any(n.startswith("crcmod/_crcfunext") and ".so" in n for n in zf.namelist()):
            raise BuildError(f"{wheels[0].name} has no compiled _crcfunext: install gcc and "
                             "the Python headers, clear pip's cache, and run again")


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def strip_wheel(wheel: Path) -> bool:
    """Strip the extension modules of ``wheel`` that carry symbols (``elf.py`` says which),
    in place, rewriting its RECORD to match. Returns whether the wheel changed."""
    strip = shutil.which("strip")
    if strip is None:
        raise BuildError("strip (binutils) is needed to build the wheelhouse")
    with zipfile.ZipFile(wheel) as zf:
        infos = zf.infolist()
        contents = {i.filename: zf.read(i) for i in infos}
    changed = False
    for name, data in contents.items():
        if not is_extension(name) or not has_symbols(data):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "module.so"
            path.write_bytes(data)
            strip_file(path, strip)
            contents[name] = path.read_bytes()
        changed = True
    if not changed:
        return False
    record = next(n for n in contents if n.endswith(".dist-info/RECORD"))
    lines = [f"{n},{_record_hash(d)},{len(d)}" for n, d in contents.items()
             if n != record and not n.endswith((".dist-info/RECORD.jws", ".dist-info/RECORD.p7s"))]
    contents[record] = ("\n".join([*lines, f"{record},,"]) + "\n").encode()
    partial = wheel.with_suffix(".partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as out:
        for info in infos:
            if info.filename.endswith((".dist-info/RECORD.jws", ".dist-info/RECORD.p7s")):
                continue
            out.writestr(info, contents[info.filename], compress_type=zipfile.ZIP_DEFLATED)
    partial.replace(wheel)
    return True


# --- images --------------------------------------------------------------------------------


def build_images(base: str, wheels: Path) -> dict[str, tuple[float, int]]:
    """Build both images; return role -> (build seconds, size in bytes)."""
    results: dict[str, tuple[float, int]] = {}
    for role in ROLES:
        ref = f"jennah-{role}:{TAG}"
        log(f"docker build -f Dockerfile.{role} -t {ref}")
        started = time.monotonic()
        run(["docker", "build", "-f", f"Dockerfile.{role}", "-t", ref,
             "--build-arg", f"BASE_IMAGE={base}",
             "--build-arg", f"WHEELHOUSE={wheels.relative_to(REPO)}", "."],
            cwd=REPO, quiet=True)
        results[role] = (time.monotonic() - started, image_size(ref))
    for role, (seconds, size) in results.items():
        log(f"jennah-{role}:{TAG}: {size / 1e6:.0f} MB ({size / 2**20:.0f} MiB), "
            f"built in {seconds:.1f} s")
    return results


def run_tests(pytest_args: Sequence[str], timeout: float) -> int:
    """pytest -m images tests/images against the tags built here; print what it measured."""
    CACHE.mkdir(parents=True, exist_ok=True)
    report = CACHE / "image-test-report.txt"
    report.write_text("")
    env = dict(os.environ, JENNAH_WORKER_IMAGE=f"jennah-worker:{TAG}",
               JENNAH_GATEWAY_IMAGE=f"jennah-gateway:{TAG}", JENNAH_IMAGE_REPORT=str(report))
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "images", "-rsx", "tests/images",
           *pytest_args]
    log(" ".join(cmd[2:]))
    try:
        code = subprocess.run(cmd, cwd=REPO, env=env, timeout=timeout, check=False).returncode
    except subprocess.TimeoutExpired:
        log(f"the image tests took over {timeout:.0f} s")
        code = 1
    finally:  # what an interrupted test could not remove (the tests label what they start)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            left = subprocess.run(["docker", "ps", "-aq", "--filter", f"label={TEST_LABEL}"],
                                  capture_output=True, text=True, timeout=30).stdout.split()
            if left:
                subprocess.run(["docker", "rm", "-f", *left], capture_output=True, timeout=60)
    for line in report.read_text().splitlines():
        log(f"measured: {line}")
    return code


# --- command line --------------------------------------------------------------------------


class _Deadline(Exception):
    pass


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if signum == signal.SIGALRM:
        raise _Deadline()
    raise SystemExit(128 + signum)  # SIGTERM: unwind, so the dockerd started here stops


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("command", choices=["images", "test", "base", "wheelhouse"])
    parser.add_argument("--timeout", type=float, default=2400.0,
                        help="the most seconds the whole command may take (default 2400)")
    parser.add_argument("pytest_args", nargs="*", help="after --: more pytest arguments")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGALRM, _on_signal)
    signal.alarm(int(args.timeout))
    started = time.monotonic()
    try:
        if args.command == "wheelhouse":
            wheelhouse()
            return 0
        try:
            try:
                ensure_tool("docker", "docker.io")
            except BuildError as exc:
                raise NoEngine(str(exc)) from exc
            with engine():
                if args.command == "base":
                    base_image()
                    return 0
                wheels = wheelhouse()
                build_images(base_image(), wheels)
                if args.command == "test":
                    left = args.timeout - (time.monotonic() - started) - 60
                    return run_tests(args.pytest_args, timeout=max(left, 60))
                return 0
        except NoEngine as exc:
            if args.command == "test" and not in_ci():
                # Outside CI the tests skip loudly without an engine; under CI they fail.
                log(f"{exc}: running the tests anyway, they will skip")
                return run_tests(args.pytest_args, timeout=600)
            raise
    except BuildError as exc:
        log(f"FAILED: {exc}")
        return 1
    except _Deadline:
        log(f"FAILED: over the time limit of {args.timeout:.0f} s")
        return 1
    finally:
        signal.alarm(0)
        log(f"{args.command}: {time.monotonic() - started:.0f} s in all")


if __name__ == "__main__":
    sys.exit(main())
