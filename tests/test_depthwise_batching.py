"""The continuous depth-wise batching simulation (spec §1.8 check 8) and oracle exits."""

import numpy as np
import pytest

from research.analysis import depthwise_batching as cdb

CONSTANT = lambda batch: 1.0
LINEAR = lambda batch: 2.0 + 0.25 * batch  # a memory-bound decoder's shape


@pytest.mark.parametrize("step_time", [CONSTANT, LINEAR])
def test_without_exits_depthwise_equals_vanilla(step_time):
  lengths, nr, batch = [6] * 32, 3, 8
  exits = [np.full(n, nr) for n in lengths]
  got = cdb.depthwise(exits, batch, step_time)
  want = cdb.vanilla(lengths, nr, batch, step_time)
  assert (got.steps, got.tokens) == (want.steps, want.tokens) == (32 // 8 * 6 * 3, 192)
  assert got.throughput == pytest.approx(want.throughput)


def test_all_exiting_after_the_first_of_two_loops_doubles_throughput():
  lengths = [5] * 24
  got = cdb.depthwise([np.ones(n, int) for n in lengths], 4, CONSTANT)
  want = cdb.vanilla(lengths, 2, 4, CONSTANT)
  assert got.throughput / want.throughput == pytest.approx(2.0)


def test_gain_approaches_the_ideal_on_a_saturated_queue():
  """Nr / sum_e e f_e, less a tail where the queue runs dry."""
  rng = np.random.default_rng(0)
  nr, f = 3, np.array([0.5, 0.3, 0.2])
  exits = [rng.choice(np.arange(1, nr + 1), size=8, p=f) for _ in range(600)]
  got = cdb.depthwise(exits, 8, CONSTANT)
  want = cdb.vanilla([8] * 600, nr, 8, CONSTANT)
  ideal = nr / float(np.sum(np.concatenate(exits)) / (600 * 8))
  assert got.throughput / want.throughput == pytest.approx(ideal, rel=0.02)
  assert got.throughput / want.throughput <= ideal


def test_a_finished_sequence_frees_its_slot_at_once():
  """Two slots, requests of 1, 3 and 1 tokens (one loop each): the third starts at step 2."""
  got = cdb.depthwise([np.ones(1, int), np.ones(3, int), np.ones(1, int)], 2, CONSTANT)
  assert (got.steps, got.tokens) == (3, 5)


def test_oracle_exits():
  """Per token, the first exit whose argmax equals the last exit's, even when a later one
  disagrees again (token 1: exits predict 2, 0, 2 -> exit 1)."""
  argmax_ET = np.array([[1, 2, 0], [3, 0, 2], [3, 2, 1]])
  logits_EBTV = np.eye(4)[argmax_ET][:, None]  # [E, 1, T, V]
  np.testing.assert_array_equal(cdb.oracle_exit_loops(list(logits_EBTV)), [[2, 1, 3]])
