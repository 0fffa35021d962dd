"""Room on the device and on disk, checked before a load or a save starts: a model that cannot fit fails at
once with its numbers, not minutes later (the kernel's out-of-memory killer ends a CPU load without a word, CUDA
raises from deep inside torch, a full disk stops a 50 GB save near its end); and what running out of memory
mid-way looks like, so the command line and the server can say so in a line."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from .errors import DiffGemmaError

if TYPE_CHECKING:
    import torch

SKIP_CHECK_ENV = "DIFFGEMMA_SKIP_MEMORY_CHECK"  # set (to anything but 0) to load whatever the figures say
CGROUP_V2 = Path("/sys/fs/cgroup")
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "cannot allocate memory")  # CUDA, MPS; the CPU's
DISK_MARGIN_BYTES = 2**20  # the small files (configs) and the file system's own blocks beside the weights


def size_text(nbytes: float) -> str:
    """Bytes for people: GiB, or MiB under one."""
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def free_memory(device: torch.device) -> int | None:
    """Bytes a new allocation on `device` can still take, or None where this cannot be told (Apple's MPS).

    The CPU's figure is the kernel's estimate of what it can hand out without swapping (MemAvailable, page
    cache included) plus free swap, within a container's limit less what the container's processes hold.
    """
    if device.type == "cuda":
        import torch  # (imported where a CUDA device is named: the command line's `--help` goes without it)

        # what the device has free, and what PyTorch's caching allocator holds unused (a model dropped earlier
        # in this process): both serve a new allocation
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    if device.type != "cpu":
        return None
    meminfo = _read_fields(Path("/proc/meminfo"))
    if "MemAvailable" not in meminfo:
        return None  # not Linux
    free = (meminfo["MemAvailable"] + meminfo.get("SwapFree", 0)) * 1024
    room = _container_room()
    return free if room is None else min(free, room)


def _container_room() -> int | None:
    """A memory cgroup's limit less the memory its processes hold (not the page cache, which the kernel
    reclaims), or None without a limit."""
    for limit_file, stat_file, held_field in (
        (CGROUP_V2 / "memory.max", CGROUP_V2 / "memory.stat", "anon"),
        (CGROUP_V1 / "memory.limit_in_bytes", CGROUP_V1 / "memory.stat", "total_rss"),
    ):
        try:
            limit = int(limit_file.read_text().strip())
        except (OSError, ValueError):  # no such cgroup, or "max": no limit
            continue
        held = _read_fields(stat_file).get(held_field)
        if held is not None and limit < 2**60:  # cgroup v1 writes "no limit" as a huge number
            return max(limit - held, 0)
    return None


def _read_fields(path: Path) -> dict[str, int]:
    """`name value` (or `name: value kB`) lines as {name: value}; {} when the file cannot be read."""
    fields = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return fields
    for line in lines:
        name, _, rest = line.partition(" ")
        value = rest.split()
        if value and value[0].isdigit():
            fields[name.rstrip(":")] = int(value[0])
    return fields


def check_memory(need: int, device: torch.device, what: str, hint: Callable[[int], str] | None = None) -> None:
    """Refuse to start filling `need` bytes on `device` when it has not that much free; `what` says whose bytes
    (a checkpoint's weights, say); `hint`, given the free bytes, what would fit (asked only on a refusal)."""
    if os.environ.get(SKIP_CHECK_ENV, "0") != "0":
        return
    free = free_memory(device)
    if free is None or need <= free:
        return
    where = "this machine's memory (with swap)" if device.type == "cpu" else str(device)
    fits = hint(free) if hint else ""
    raise DiffGemmaError(
        f"{what} need {size_text(need)}, and {where} has {size_text(free)} free{fits}. "
        f"(Set {SKIP_CHECK_ENV}=1 to try anyway.)"
    )


def check_disk(folder: Path, need: int) -> None:
    """Refuse to start writing `need` bytes to `folder` when its file system has not room for them (a save writes
    whole beside it before it replaces anything, so an old checkpoint there still counts)."""
    parent = folder.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if need + DISK_MARGIN_BYTES > free:
        raise DiffGemmaError(f"{folder}: writing it takes {size_text(need)}, and its disk has {size_text(free)} free")


@contextlib.contextmanager
def writing(folder: Path) -> Iterator[None]:
    """A write's failures from the system (a full disk, a quota, permissions) as one line naming the folder;
    the caller's own clean-up has run by the time it is raised."""
    try:
        yield
    except (OSError, SafetensorError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise DiffGemmaError(f"{folder}: could not be written ({reason}); nothing there was changed") from None


def usual_permissions(paths: Iterable[Path]) -> None:
    """Give files and folders that `tempfile` made private (0600, 0700) the permissions `open` and `mkdir` give
    (what the umask leaves), so that what is saved through them is readable as any other file there."""
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def out_of_memory(err: BaseException) -> bool:
    """An allocation that failed: Python's MemoryError, torch's OutOfMemoryError (CUDA), or the RuntimeError
    the CPU's and MPS's allocators raise."""
    return isinstance(err, MemoryError) or any(words in str(err).lower() for words in OUT_OF_MEMORY)


def first_line(err: BaseException) -> str:
    """An error's first line (torch's out-of-memory messages run on with advice about its allocator)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
