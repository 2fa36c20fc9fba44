"""tools/hostmem.py: the huge-page re-exec of the tools."""
import os
import subprocess
import sys

import pytest

from tools import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = ('import os, sys; from tools import hostmem; print("start", os.getpid(), flush=True); '
         'hostmem.use_huge_pages(); print("after", os.getpid(), sys.argv[1:], '
         'os.environ.get("GLIBC_TUNABLES"), hostmem.enabled())')


def run_probe(**env):
  full = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', hostmem.OPT_OUT)}
  full.update(env, PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, '-c', PROBE, 'a', '--b=1'], env=full, check=True,
                       capture_output=True, text=True).stdout.split('\n')
  return [line for line in out if line]


def test_tunables_are_added_and_others_kept():
  assert hostmem.tunables_with_huge_pages('') == 'glibc.malloc.hugetlb=1'
  assert (hostmem.tunables_with_huge_pages('glibc.malloc.trim_threshold=9') ==
          'glibc.malloc.trim_threshold=9:glibc.malloc.hugetlb=1')


@pytest.mark.skipif(not hostmem.supported(), reason='needs Linux, glibc >= 2.35 and THP')
def test_reexec_once_keeps_pid_and_arguments():
  lines = run_probe()
  # The command ran again from the top ("start" twice), in the same process, once.
  assert [line.split()[0] for line in lines] == ['start', 'start', 'after']
  assert lines[0].split()[1] == lines[1].split()[1] == lines[2].split()[1]
  assert lines[2].endswith("['a', '--b=1'] glibc.malloc.hugetlb=1 True")


@pytest.mark.skipif(not hostmem.supported(), reason='needs Linux, glibc >= 2.35 and THP')
def test_user_tunables_are_kept_and_opt_out_is_honoured():
  lines = run_probe(GLIBC_TUNABLES='glibc.malloc.trim_threshold=12345')
  assert 'glibc.malloc.trim_threshold=12345:glibc.malloc.hugetlb=1 True' in lines[-1]
  # Already chosen by the user (even "off"): no re-exec, their value stays.
  lines = run_probe(GLIBC_TUNABLES='glibc.malloc.hugetlb=0')
  assert [line.split()[0] for line in lines] == ['start', 'after']
  assert lines[-1].endswith('glibc.malloc.hugetlb=0 False')
  lines = run_probe(MMCL_HUGE_PAGES='0')
  assert [line.split()[0] for line in lines] == ['start', 'after']
  assert lines[-1].endswith('None False')
