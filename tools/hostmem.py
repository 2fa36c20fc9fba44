"""Host memory: transparent huge pages for XLA:CPU's per-run buffers (a re-exec at start-up).

A CPU speed concern of the tools that train or time steps, so it lives with them in tools/,
outside the library: nothing in mmcl/ restarts its host program.

XLA:CPU takes each run's temporaries from malloc, one block per run (2 GiB for a
configs/bench_small.py train step). glibc serves a block this large with a fresh mmap and
unmaps it when the run ends, so every step faults in all its pages again: ~507k page
faults and 1-1.5 CPU-seconds of kernel time per bench_small step on the 2-core CPU.
glibc >= 2.35 maps such blocks with transparent huge pages when the tunable
`glibc.malloc.hugetlb=1` is set (2 MiB pages: ~1.2k faults per step), which made that step
19% faster (BENCHMARKS.md, sections 1 and 7). glibc reads tunables only when
a process starts, so `use_huge_pages()` re-executes the current command once with it set.

tools/train.py and the bench_*.py tools call it first thing (`from tools import hostmem`).
`MMCL_HUGE_PAGES=0` turns it off; it does nothing where it cannot help (not Linux, not
glibc >= 2.35, transparent huge pages set to `never`) or is already set.
"""
import os
import platform
import sys

TUNABLE = 'glibc.malloc.hugetlb'
OPT_OUT = 'MMCL_HUGE_PAGES'
_THP_SETTING = '/sys/kernel/mm/transparent_hugepage/enabled'


def supported() -> bool:
  """Whether this process's C library and kernel can map malloc blocks with huge pages."""
  if sys.platform != 'linux':
    return False
  libc, version = platform.libc_ver()
  try:
    major, minor = (int(v) for v in version.split('.')[:2])
  except ValueError:
    return False
  if libc != 'glibc' or (major, minor) < (2, 35):
    return False
  try:
    with open(_THP_SETTING) as f:
      return '[never]' not in f.read()
  except OSError:
    return False


def enabled() -> bool:
  """Whether this process started with the tunable set (what benchmarks should report)."""
  return f'{TUNABLE}=1' in os.environ.get('GLIBC_TUNABLES', '').split(':')


def tunables_with_huge_pages(current: str) -> str:
  """GLIBC_TUNABLES with `glibc.malloc.hugetlb=1` added; other tunables are kept."""
  kept = [t for t in current.split(':') if t and not t.startswith(TUNABLE + '=')]
  return ':'.join(kept + [f'{TUNABLE}=1'])


def use_huge_pages() -> None:
  """Re-executes this command (same interpreter, options and arguments; same pid) with
  huge-page malloc, unless it already has it, cannot use it, or MMCL_HUGE_PAGES=0.
  Call it before the process does any work: nothing after the call survives the exec."""
  if os.environ.get(OPT_OUT, '1') == '0' or TUNABLE in os.environ.get('GLIBC_TUNABLES', ''):
    return  # Off, already set (by us on the way in, or by the user: theirs is kept).
  if not supported():
    return
  os.environ['GLIBC_TUNABLES'] = tunables_with_huge_pages(os.environ.get('GLIBC_TUNABLES', ''))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, sys.orig_argv)
