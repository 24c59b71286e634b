"""Continuous depth-wise batching (RRT §2.4, §3.8, App. K) as a scheduling simulation.

A recursive model runs the same shared block in every loop, so a decoding batch may hold
sequences at different loops: a token that exits early frees its slot's next step for the
sequence's next token, and a finished sequence frees its slot for a queued request. The paper's
throughput analysis is such a simulation (not a closed form): per-step times measured per batch
size, exit loops from "oracle" exits (the first loop whose argmax equals the last loop's).

Both schedulers here decode requests of `exit_loops_NT[n]` (one exit loop in 1..Nr per token):

  depth-wise   each step runs one loop pass for every active sequence (at most `max_batch`), a
               token finishing its exit loop moves its sequence to the next token, a finished
               sequence's slot is refilled from the queue at once (FIFO);
  vanilla      static batches of `max_batch` sequences; each token takes all Nr loops (no early
               exit, so no batch waits on its deepest token) and a batch ends with its longest
               sequence.

Throughput is tokens per unit time, time being the sum of `step_time(batch size)` over the steps
(one loop pass each). Ideal gain of depth-wise batching with exit distribution f_e over a
saturated queue: Nr / sum_e e f_e. Caveats as in the paper: KV caches of exited tokens at later
loops are not modelled, embedding/head time is ignored, exits are oracle exits.
"""

import collections
import dataclasses
from collections.abc import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Schedule:
  steps: int  # loop passes run
  time: float  # sum of step_time over the steps
  tokens: int  # tokens decoded

  @property
  def throughput(self) -> float:
    return self.tokens / self.time


def oracle_exit_loops(exit_logits_EBTV: Sequence[np.ndarray]) -> np.ndarray:
  """[B, T] exit loop (1-based) of each token: the first exit whose argmax equals the last's."""
  pred_EBT = np.stack([np.argmax(np.asarray(lg), axis=-1) for lg in exit_logits_EBTV])
  agrees_EBT = pred_EBT == pred_EBT[-1]
  return np.argmax(agrees_EBT, axis=0) + 1  # the last exit always agrees


def depthwise(exit_loops: Sequence[np.ndarray], max_batch: int,
              step_time: Callable[[int], float]) -> Schedule:
  """Continuous depth-wise batching of requests whose tokens exit at `exit_loops[n][t]`."""
  queue = collections.deque(np.asarray(e, np.int64) for e in exit_loops)
  active: list[list] = []  # [exit loops of the request, token index, loops done on that token]
  steps, time, tokens = 0, 0.0, 0
  while queue or active:
    while queue and len(active) < max_batch:
      active.append([queue.popleft(), 0, 0])
    steps, time = steps + 1, time + step_time(len(active))
    still = []
    for item in active:
      item[2] += 1
      if item[2] == item[0][item[1]]:  # this token exits: the sequence moves on
        item[1], item[2], tokens = item[1] + 1, 0, tokens + 1
      if item[1] < len(item[0]):
        still.append(item)
    active = still
  return Schedule(steps, time, tokens)


def vanilla(lengths: Sequence[int], num_loops: int, max_batch: int,
            step_time: Callable[[int], float]) -> Schedule:
  """Static sequence-wise batching, every token running all `num_loops` loops."""
  steps, time = 0, 0.0
  for start in range(0, len(lengths), max_batch):
    batch = list(lengths[start:start + max_batch])
    for t in range(max(batch)):
      alive = sum(n > t for n in batch)  # finished sequences leave the batch
      steps, time = steps + num_loops, time + num_loops * step_time(alive)
  return Schedule(steps, time, int(sum(lengths)))
