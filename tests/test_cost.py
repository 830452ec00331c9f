"""benchmarks/cost.py on a tiny model: the numbers are sane and the derived ones follow from them.

Compiles (never runs) the pretraining step of a small ResNet for the 8 test
devices at per-device batches 2 and 4, as the benchmark does for ImageNet at
64 and 128.
"""

import importlib.util
import pytest

from conftest import REPO, tiny_config


def _load_cost_module():
  # benchmarks/ is not an installed package: load the script by its path.
  spec = importlib.util.spec_from_file_location('benchmarks_cost', REPO / 'benchmarks' / 'cost.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


cost = _load_cost_module()
BATCHES = (2, 4)


@pytest.fixture(scope='module')
def result(small_resnet):
  config = tiny_config()
  # A small encoder under a wide head: the parameters are mostly dense kernels, as in
  # ImageNet's 8192³ projector (BatchNorm statistics would otherwise weigh in the ratio).
  config.model.encoder, config.model.projector = small_resnet, '256-2048'
  for view in (config.augment.view1, config.augment.view2):  # Crop + flip: a shorter compile.
    view.jitter = view.grayscale = view.solarize = view.blur = 0.0
  return config, cost.run(config, mesh_sizes=[8], batches=BATCHES, efficiency=0.5,
                          log=lambda s: None)


def test_step_numbers_are_sane(result):
  _, out = result
  rows = {r['batch_per_device']: r for r in out['steps']}
  assert sorted(rows) == list(BATCHES) and not out['skipped']
  for r in rows.values():
    assert r['devices'] == 8 and r['global_batch'] == 8 * r['batch_per_device']
    assert r['flops'] > 0 and r['bytes_accessed'] > 0
    # Convolutions and matmuls alone touch less than every unfused op does.
    assert 0 < r['matmul_bytes'] < r['bytes_accessed']
    assert r['memory']['peak'] > r['memory']['argument'] > 0
    assert r['compile_s'] > 0
    # Each gradient is all-reduced once (tests/test_communication.py).
    assert 1.0 <= r['all_reduced_per_parameter'] <= 1.1, r['all_reduced_per_parameter']
    # The row-sharded C moves z1's columns (all-to-all) and all of z2 (all-gather).
    assert r['collectives']['all-gather']['ops'] >= 1
    assert r['collectives']['all-to-all']['ops'] >= 1
  ratio = rows[4]['flops'] / rows[2]['flops']
  assert 1.6 <= ratio <= 2.4, ratio
  assert rows[4]['memory']['peak'] > rows[2]['memory']['peak']


def test_cross_correlation_variants(result):
  _, out = result
  by_variant = {r['variant']: r for r in out['cross_correlation']}
  full, rows = by_variant['full C psum'], by_variant['row-sharded C']
  d = full['projector_dim']
  assert full['paper_bytes'] == d * d * 4
  # The full matrix is all-reduced (plus the standardisation's small means).
  assert full['collectives']['all-reduce']['bytes'] >= d * d * 4
  assert rows['collectives']['all-gather']['ops'] == 1
  # N = 16 < D = 2048: the row blocks move less than the matrix.
  assert rows['bytes_moved'] < full['bytes_moved']


def test_derived_numbers_follow_from_the_measured_ones(result):
  _, out = result
  rows = sorted(out['steps'], key=lambda r: r['batch_per_device'])
  derived = out['derived'][8]
  (b1, r1), (b2, r2) = [(r['batch_per_device'], r) for r in rows]

  def line(key):  # value(b) through the two compiled batches
    y1, y2 = key(r1), key(r2)
    return lambda b: y1 + (y2 - y1) * (b - b1) / (b2 - b1)

  flops, memory = line(lambda r: r['flops']), line(lambda r: r['memory']['peak'])
  hbm_bytes = {'cpu_bytes': line(lambda r: r['bytes_accessed']),
               'fused': line(lambda r: r['matmul_bytes'])}
  steps = cost.PAPER_EPOCHS * (cost.IMAGENET_TRAIN // cost.PAPER_GLOBAL_BATCH)
  assert derived['steps'] == steps
  for chip, entry in zip(cost.CHIPS, derived['chips']):
    for n in cost.CHIP_COUNTS:
      b = cost.PAPER_GLOBAL_BATCH / n
      run = entry['runs'][n]
      for variant, nbytes in hbm_bytes.items():
        step_s = max(flops(b) / chip.flops, nbytes(b) / chip.bandwidth) / 0.5
        assert run[f'hours_{variant}'] == pytest.approx(steps * step_s / 3600, rel=1e-6)
      assert run['fits'] == (memory(b) <= chip.memory)
      wire = 2 * (n - 1) / n * r1['collectives']['all-reduce']['bytes']
      assert run['allreduce_wire_gb'] == pytest.approx(wire / 1e9)
    largest = entry['largest_batch']
    assert memory(largest) <= chip.memory < memory(largest + 1)
    for variant in hbm_bytes:
      point = entry['at_batch'][b1][variant]
      assert point['mfu'] == pytest.approx(
          flops(b1) / chip.flops / (point['step_ms'] / 1e3), rel=1e-6)
      assert 0 < point['mfu'] <= 0.5 + 1e-9
  for gb, largest in derived['memory_fits'].items():
    assert memory(largest) <= gb * 1e9 < memory(largest + 1)

  # Not hard-coded: half the efficiency doubles the hours; twice the FLOPs
  # per step never shortens them.
  slower = cost.derive(rows, efficiency=0.25)
  doubled = cost.derive([{**r, 'flops': 2 * r['flops']} for r in rows], efficiency=0.5)
  for base, slow, heavy in zip(derived['chips'], slower['chips'], doubled['chips']):
    for n in cost.CHIP_COUNTS:
      for hours in ('hours_cpu_bytes', 'hours_fused'):
        assert slow['runs'][n][hours] == pytest.approx(2 * base['runs'][n][hours])
        assert heavy['runs'][n][hours] >= base['runs'][n][hours]
  assert doubled['fits']['flops'][1] == pytest.approx(2 * derived['fits']['flops'][1])


def test_tables_print_every_setting_and_the_caveat(result):
  config, out = result
  text = cost.tables(config, out)
  assert 'XLA:CPU' in text and 'full C psum' in text and 'row-sharded C' in text
  for chip in cost.CHIPS:
    assert chip.name in text


def test_matmul_bytes_counts_operands_and_results_in_their_dtypes():
  import jax
  import jax.numpy as jnp
  from jax import lax

  def f(x, k, w):
    y = lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.tanh(y.reshape(2, -1) @ w)

  shapes = {'x': (2, 8, 8, 4), 'k': (3, 3, 4, 16), 'w': (8 * 8 * 16, 32)}
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes.values()]
  text = jax.jit(f).lower(*args).as_text(dialect='hlo')
  conv = 2 * 8 * 8 * 4 + 3 * 3 * 4 * 16 + 2 * 8 * 8 * 16
  dot = 2 * 8 * 8 * 16 + 8 * 8 * 16 * 32 + 2 * 32
  assert cost.matmul_bytes(text) == 2 * (conv + dot)  # bf16: 2 bytes each
