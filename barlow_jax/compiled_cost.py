"""What a compiled step moves between devices, read from XLA's optimized HLO.

Used by the benchmarks (communication per step beside the speed) and by the
test that each gradient is all-reduced once per step.
"""

import math
import re

# Collectives whose output sizes are counted; async ops are counted at their
# start (the matching '-done' carries the same buffers).
COLLECTIVES = ('all-reduce', 'all-gather', 'all-to-all', 'reduce-scatter', 'collective-permute')
_BYTES = {'f64': 8, 's64': 8, 'u64': 8, 'f32': 4, 's32': 4, 'u32': 4, 'bf16': 2, 'f16': 2,
          's16': 2, 'u16': 2, 's8': 1, 'u8': 1, 'pred': 1}
_ARRAY = re.compile(r'\b(' + '|'.join(_BYTES) + r')\[([0-9,]*)\]')
_OP = re.compile(r'=\s*(\(.*?\)|\S+)\s+(' + '|'.join(COLLECTIVES) + r')(-start)?\(')


def collectives(hlo_text: str) -> dict:
  """{collective: {'ops': count, 'elements': total, 'bytes': total}} of one program.

  Args:
    hlo_text: ``jitted.lower(...).compile().as_text()``: the optimized HLO.
  """
  out = {name: {'ops': 0, 'elements': 0, 'bytes': 0} for name in COLLECTIVES}
  for line in hlo_text.splitlines():
    match = _OP.search(line)
    if not match:
      continue
    shape, name = match.group(1), match.group(2)
    out[name]['ops'] += 1
    for dtype, dims in _ARRAY.findall(shape):
      n = math.prod(int(d) for d in dims.split(',') if d) if dims else 1
      out[name]['elements'] += n
      out[name]['bytes'] += n * _BYTES[dtype]
  return out
