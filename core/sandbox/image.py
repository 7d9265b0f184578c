"""Build the sandbox image on this machine from Debian packages, with no registry.

The recipe (`recipe.toml` beside this file, or `<data dir>/sandbox/recipe.toml`
when that exists) names the packages and the steps; this module resolves,
downloads (cached), unpacks and imports them with `podman import`. Every
podman command here and in `podman.py` runs with `CONTAINERS_CONF` naming the
`containers.conf` beside this file.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.errors import EngineError

HERE = Path(__file__).parent
RECIPE = HERE / "recipe.toml"
CONTAINERS_CONF = HERE / "containers.conf"
RECIPE_LABEL = "loopbridge.recipe"
MERGED_DIRS = ("bin", "lib", "lib64", "sbin")

Progress = Callable[[str], None]
# Each package's dependency groups; a group lists alternatives, any one will do.
Graph = dict[str, list[list[str]]]


def podman_env() -> dict[str, str]:
    """The environment for every podman command: this tree's runtime settings, not /etc's."""
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman_argv(url: str | None) -> list[str]:
    """The podman command line prefix: local, or the remote service at `url`."""
    podman = shutil.which("podman")
    if podman is None:
        raise EngineError("sandbox_spawn_failed", "podman is not installed")
    return [podman, "--url", url] if url else [podman]


@dataclass(frozen=True)
class Recipe:
    packages: list[str]
    exclude: frozenset[str]
    skip: list[str]
    env: list[str]
    workdir: str
    cmd: list[str]
    steps: list[dict[str, object]]
    digest: str


def recipe_path(data_dir: Path) -> Path:
    """The recipe to build from: the data dir's own copy if there is one, else the shipped one."""
    own = data_dir / "sandbox" / "recipe.toml"
    return own if own.is_file() else RECIPE


def load_recipe(path: Path) -> Recipe:
    raw = path.read_bytes()
    data = tomllib.loads(raw.decode())
    return Recipe(
        packages=list(data["packages"]),
        exclude=frozenset(data.get("exclude", [])),
        skip=list(data.get("skip", [])),
        env=list(data.get("env", [])),
        workdir=data.get("workdir", "/"),
        cmd=list(data.get("cmd", ["sleep", "infinity"])),
        steps=list(data.get("step", [])),
        digest=hashlib.sha256(raw).hexdigest()[:16],
    )


async def run(*argv: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a command to its end; its stdout, or an error naming its last stderr line."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines() or [f"exit {proc.returncode}"]
        raise EngineError("sandbox_spawn_failed", f"{Path(argv[0]).name} failed: {lines[-1]}")
    return out.decode(errors="replace")


# `apt-cache depends --recurse` prints each package at column 0, then indented
# `Depends:` lines; a leading `|` joins the next line as an alternative, and
# `<name>` is a virtual package whose providers follow, indented deeper.
DEP_LINE = re.compile(r"^ (\|| )(?:Pre)?Depends: (\S+)$")
PROVIDER_LINE = re.compile(r"^    (\S+)$")


def parse_depends(text: str) -> Graph:
    """Each package's dependency groups: alternatives, virtuals with their providers."""
    graph: Graph = {}
    groups: list[list[str]] = []
    joined = False
    for line in text.splitlines():
        if (dep := DEP_LINE.match(line)) is not None:
            if not joined:
                groups.append([])
            groups[-1].append(dep.group(2))
            joined = dep.group(1) == "|"
        elif (provider := PROVIDER_LINE.match(line)) is not None and groups:
            groups[-1].append(provider.group(1))
        elif line and not line.startswith(" "):
            groups = graph.setdefault(line, [])
    return graph


def choose(group: list[str], chosen: set[str], exclude: frozenset[str]) -> str | None:
    """The package that satisfies a group: one already chosen, else the first real one."""
    if any(name.strip("<>") in exclude for name in group):
        return None
    real = [name for name in group if not name.startswith("<")]
    return next((name for name in real if name in chosen), real[0] if real else None)


def closure(graph: Graph, roots: list[str], exclude: frozenset[str]) -> set[str]:
    """The roots and what they need, breadth first; exclusions cut whole branches."""
    chosen = set(roots)
    frontier = list(roots)
    while frontier:
        groups = [group for name in frontier for group in graph.get(name, [])]
        frontier = []
        for group in groups:
            name = choose(group, chosen, exclude)
            if name is not None and name not in chosen:
                chosen.add(name)
                frontier.append(name)
    return chosen


async def resolve(recipe: Recipe, apt_options: list[str]) -> list[str]:
    """The recipe's packages and their dependency closure, minus exclusions."""
    try:
        text = await run(
            "apt-cache", *apt_options, "depends", "--recurse", "--important", *recipe.packages
        )
    except EngineError as exc:
        raise EngineError(exc.code, f"{exc.message} (has `apt-get update` run?)") from None
    return sorted(closure(parse_depends(text), recipe.packages, recipe.exclude))


def apt_options(cache: Path) -> list[str]:
    # Debian's container images turn apt's package cache off, which makes every
    # apt command re-read all package lists (~0.9 s): keep one beside the .debs.
    # As root apt downloads as `_apt`, which may not write into the data dir.
    return ["-o", f"Dir::Cache::pkgcache={cache / 'pkgcache.bin'}", "-o", "APT::Sandbox::User=root"]


async def fetch(
    packages: list[str],
    cache: Path,
    options: list[str],
    progress: Progress,
) -> list[Path]:
    """The packages' .deb files, downloading only those not already in `cache`."""
    listing = await run("apt-get", *options, "download", "--print-uris", *packages)
    files = [line.split()[1] for line in listing.splitlines() if line.startswith("'")]
    missing = [name for name in files if not (cache / name).is_file()]
    if missing:
        progress(f"downloading {len(missing)} of {len(files)} packages")
        await run("apt-get", *options, "download", "-q", *map(pinned, missing), cwd=cache)
    return [cache / name for name in files]


def pinned(file_name: str) -> str:
    """`name=version` from a .deb file name, so apt fetches exactly the listed file."""
    name, version, _ = file_name.split("_", 2)
    return f"{name}={version.replace('%3a', ':')}"


async def unpack(debs: list[Path], root: Path, skip: list[str]) -> None:
    """Unpack every .deb into `root` (but `skip`), keeping the merged-/usr links."""
    for name in MERGED_DIRS:
        (root / "usr" / name).mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(f"usr/{name}")
    # dpkg-deb -x would replace the /bin -> usr/bin links with directories; tar keeps them.
    script = 'dpkg-deb --fsys-tarfile "$1" | tar -x --keep-directory-symlink -C "$2" "${@:3}"'
    excludes = [f"--exclude=./{path}" for path in skip]
    limit = asyncio.Semaphore(2 * (os.cpu_count() or 1))

    async def one(deb: Path) -> None:
        async with limit:
            await run("bash", "-c", script, "unpack", str(deb), str(root), *excludes)

    await asyncio.gather(*(one(deb) for deb in debs))


def apply_step(root: Path, step: dict[str, object]) -> str:
    """Carry out one recipe step inside `root`; a short description of it."""
    match step:
        case {"concat": str(pattern), "to": str(to)}:
            parts = sorted(root.glob(pattern))
            target = root / to
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("".join(part.read_text() for part in parts))
            return f"concat {len(parts)} files -> /{to}"
        case {"symlink": str(path), "target": str(target)}:
            link = root / path
            link.unlink(missing_ok=True)
            link.symlink_to(target)
            return f"symlink /{path} -> {target}"
        case {"write": str(path), "content": str(content)}:
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(content)
            return f"write /{path}"
        case {"mkdir": list(paths), **rest}:
            mode = rest.get("mode", 0o755)
            for path in paths:
                (root / path).mkdir(parents=True, exist_ok=True)
                (root / path).chmod(mode if isinstance(mode, int) else 0o755)
            return f"mkdir {' '.join(paths)}"
    raise EngineError("sandbox_spawn_failed", f"recipe step not understood: {step}")


def import_changes(recipe: Recipe) -> list[str]:
    changes = [f"ENV {item}" for item in recipe.env]
    changes += [f"WORKDIR {recipe.workdir}", f"CMD {json.dumps(recipe.cmd)}"]
    changes.append(f"LABEL {RECIPE_LABEL}={recipe.digest}")
    return [arg for change in changes for arg in ("--change", change)]


async def build_image(
    tag: str,
    data_dir: Path,
    progress: Progress = print,
    url: str | None = None,
) -> None:
    """Build image `tag` from the recipe; .debs are cached under `data_dir`."""
    started = time.monotonic()
    podman = podman_argv(url)  # before any download: without podman there is no point
    recipe = load_recipe(recipe_path(data_dir))
    cache = data_dir / "sandbox" / "debs"
    cache.mkdir(parents=True, exist_ok=True)
    options = apt_options(cache)
    packages = await resolve(recipe, options)
    progress(f"resolved {len(packages)} packages")
    debs = await fetch(packages, cache, options, progress)
    build_dir = data_dir / "sandbox" / "build"
    build_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=build_dir) as scratch:
        root = Path(scratch) / "root"
        root.mkdir()
        await unpack(debs, root, recipe.skip)
        progress(f"unpacked {len(debs)} packages")
        for step in recipe.steps:
            progress(apply_step(root, step))
        tarball = Path(scratch) / "root.tar"
        await run("tar", "-C", str(root), "-cf", str(tarball), ".")
        previous = await image_id(tag, url)
        await run(
            *podman,
            "import",
            "-q",
            *import_changes(recipe),
            str(tarball),
            tag,
            env=podman_env(),
        )
    progress(f"imported {tag} in {time.monotonic() - started:.1f} s")
    if previous is not None and previous != await image_id(tag, url):
        await drop_image(previous, url)


async def image_id(tag: str, url: str | None) -> str | None:
    try:
        out = await run(
            *podman_argv(url), "image", "inspect", "--format", "{{.Id}}", tag, env=podman_env()
        )
    except EngineError:
        return None
    return out.strip()


async def drop_image(image: str, url: str | None) -> None:
    """Remove a replaced image, unless containers still use it (they are remade later)."""
    proc = await asyncio.create_subprocess_exec(
        *podman_argv(url),
        "rmi",
        image,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env=podman_env(),
    )
    await proc.wait()
