"""Memory and cache growth over many input signatures (issue 11, item 5).

One small function is compiled for ever-new shapes, ``--signatures`` of
them, through a bound of ``--max-programs``; every ``--every`` signatures
the script prints the process's resident memory, how many generated
modules are loaded, the ``linecache`` entries, the objects the garbage
collector tracks, and the kernel cache folder's files and bytes. With the
bound, loaded modules stay flat; what still grows is torch's own state
(fx's cache of generated sources, FakeTensor's class-wide dispatch cache).

    python benchmarks/growth.py --signatures 60 --max-programs 4
"""

from __future__ import annotations

import argparse
import gc
import linecache
import os
import warnings

import torch

import retrograd
from retrograd.runtime import disk_cache, loader


def resident_mib() -> float:
    """Resident memory of this process (Linux ``/proc/self/statm``), in MiB."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def function(x):
    return (x * 2).sin().sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signatures", type=int, default=60)
    parser.add_argument("--max-programs", type=int, default=4)
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args()
    compiled = retrograd.compile(function, max_programs=args.max_programs)
    warnings.simplefilter("ignore")   # the bound's warning, once
    print(f"{'signatures':>10s} {'RSS MiB':>8s} {'loaded':>7s} {'linecache':>9s} "
          f"{'gc objects':>10s} {'cache files':>11s} {'cache bytes':>11s}")
    for index in range(args.signatures):
        x = torch.randn(index + 2, 4, requires_grad=True)
        compiled(x).backward()
        del x
        if (index + 1) % args.every == 0:
            gc.collect()
            files = disk_cache.cache_files(loader.cache_dir())
            print(f"{index + 1:10d} {resident_mib():8.1f} {len(loader._LOADED):7d} "
                  f"{len(linecache.cache):9d} {len(gc.get_objects()):10d} {len(files):11d} "
                  f"{sum(file.size for file in files):11d}", flush=True)


if __name__ == "__main__":
    main()
