"""What the benchmarks share: timing, tables, JSON, machine facts.

Every benchmark times its contenders in one process, interleaved (A, B, C,
A, B, C, ...), and reports medians and ratios: on a machine shared with
other jobs the absolute rates move, but A and B see the same load.
"""

import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

MIB = 2 ** 20
ROOT = pathlib.Path(__file__).resolve().parents[2]


def machine() -> dict[str, Any]:
  """The facts a reader needs to weigh a figure: cores, CPU, memory, load."""
  model = 'unknown'
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        model = line.split(':', 1)[1].strip()
        break
  except OSError:
    pass
  mem_gib = None
  try:
    for line in pathlib.Path('/proc/meminfo').read_text().splitlines():
      if line.startswith('MemTotal'):
        mem_gib = int(line.split()[1]) / 2 ** 20
  except OSError:
    pass
  return {'nproc': len(os.sched_getaffinity(0)), 'cpu': model,
          'memory_gib': mem_gib, 'loadavg': os.getloadavg(),
          'python': platform.python_version(),
          'xla_flags': os.environ.get('XLA_FLAGS', '')}


def versions() -> dict[str, str]:
  """Versions of the numeric libraries that are importable."""
  out = {}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'torch'):
    try:
      out[name] = __import__(name).__version__
    except ImportError:
      pass
  return out


def maxrss_mib() -> float:
  """Peak resident memory of this process so far (ru_maxrss is KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def xla_memory_mib(compiled) -> dict[str, float]:
  """XLA's static memory analysis of a compiled computation, in MiB.

  The peak is what is live at once: arguments, outputs that do not reuse a
  donated argument, and temporaries.
  """
  s = compiled.memory_analysis()
  peak = (s.argument_size_in_bytes + s.output_size_in_bytes
          - s.alias_size_in_bytes + s.temp_size_in_bytes)
  return {'xla_argument_mib': s.argument_size_in_bytes / MIB,
          'xla_temp_mib': s.temp_size_in_bytes / MIB,
          'xla_peak_mib': peak / MIB}


def interleave(contenders: dict[str, Callable[[], Any]], rounds: int,
               warmup: int = 1, min_sample_s: float = 0.3
               ) -> dict[str, list[float]]:
  """Seconds per call of each contender, timed in turn, round by round.

  Args:
    contenders: name -> a function that runs one call to completion (it
      must block until the result is ready).
    rounds: timed rounds; each round times every contender once, the
      order rotating by one each round.
    warmup: untimed calls of each contender first; the last one also sets
      how many calls make one sample.
    min_sample_s: a sample repeats a fast contender until it lasts about
      this long, so that timer and dispatch noise stay small.

  Returns:
    name -> one sample (seconds per call) per round.
  """
  calls = {}
  for name, fn in contenders.items():
    seconds = 0.0
    for _ in range(max(1, warmup)):
      start = time.perf_counter()
      fn()
      seconds = time.perf_counter() - start
    calls[name] = max(1, min(50, round(min_sample_s / max(seconds, 1e-6))))
  times = {name: [] for name in contenders}
  names = list(contenders)
  for r in range(rounds):
    # Each round starts one contender later, so that none is always the
    # one timed right after another's threads went idle.
    for name in names[r % len(names):] + names[:r % len(names)]:
      fn = contenders[name]
      start = time.perf_counter()
      for _ in range(calls[name]):
        fn()
      times[name].append((time.perf_counter() - start) / calls[name])
  return times


def matmul_gflops(n: int = 1024, seconds: float = 0.5) -> float:
  """A gauge of how much of the CPU this process gets right now.

  The float32 GFLOP/s of an n x n matmul in JAX: on a machine shared with
  other jobs, the figures measured next to it scale with it.
  """
  import jax  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.key(0), (n, n))
  mm = jax.jit(lambda a: a @ a)
  jax.block_until_ready(mm(a))
  calls, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    jax.block_until_ready(mm(a))
    calls += 1
  return 2 * n ** 3 * calls / (time.perf_counter() - start) / 1e9


def median(xs: Sequence[float]) -> float:
  xs = sorted(xs)
  n = len(xs)
  return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def spread(xs: Sequence[float]) -> float:
  """(max - min) / median: how much the samples of one contender moved."""
  return (max(xs) - min(xs)) / median(xs) if xs else float('nan')


def table(rows: Sequence[dict[str, Any]],
          columns: Sequence[tuple[str, str, str]]) -> str:
  """A Markdown table of `rows`; columns are (key, header, format)."""
  def cell(row, key, fmt):
    value = row.get(key)
    if value is None:
      return '-'
    if fmt and isinstance(value, (int, float)):
      return format(value, fmt)
    return str(value)
  lines = ['| ' + ' | '.join(h for _, h, _ in columns) + ' |',
           '| ' + ' | '.join('---' for _ in columns) + ' |']
  for row in rows:
    lines.append('| ' + ' | '.join(cell(row, k, f) for k, _, f in columns)
                 + ' |')
  return '\n'.join(lines)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
  if not path:
    return
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + '.tmp')
  tmp.write_text(json.dumps(payload, indent=1, default=str))
  os.replace(tmp, path)
  print(f'Wrote {path}')


def fake_devices_env(n: int) -> dict[str, str]:
  """The environment of a child process with n fake CPU devices."""
  return {'XLA_FLAGS': (os.environ.get('XLA_FLAGS', '') +
                        f' --xla_force_host_platform_device_count={n}'
                        ).strip()}


def run_child(argv: Sequence[str], timeout: float,
              env: dict[str, str] | None = None) -> dict[str, Any]:
  """Runs `python argv...` and parses the JSON on its last stdout line.

  A child that fails or runs out of time gives {'error': why} instead, so
  that one bad setting does not end a sweep.
  """
  full_env = dict(os.environ)
  full_env.update(env or {})
  full_env.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  try:
    proc = subprocess.run([sys.executable, *argv], capture_output=True,
                          text=True, timeout=timeout, env=full_env,
                          check=False)
  except subprocess.TimeoutExpired:
    return {'error': f'timed out after {timeout:.0f} s'}
  lines = proc.stdout.strip().splitlines()
  if proc.returncode != 0 or not lines:
    tail = ' | '.join(proc.stderr.strip().splitlines()[-3:])
    return {'error': f'exit {proc.returncode}: {tail}'}
  return json.loads(lines[-1])
