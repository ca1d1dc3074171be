"""When a step fails: tell an error the engine cannot survive from one a request caused, and find that request.

A step that raises is rerun on halves of its batch until the rows that fail on their own are found (a
bisection: about 2 log2(batch) reruns for one bad row). Reruns change no engine state that matters: the
scheduler advances requests only after a step succeeds, and the KV slots they write are written again, with
the same values, when the step is retried."""
from __future__ import annotations

from collections.abc import Callable

import torch

from engine.errors import EngineDeadError
from engine.scheduler import SchedulerOutput


def raise_if_fatal(error: BaseException) -> None:
    """A CUDA error leaves the device context unusable: nothing after it can be trusted, so the engine dies. So
    does a failed tensor-parallel step (EngineDeadError already): its ranks are out of step."""
    if isinstance(error, EngineDeadError):
        raise error
    if isinstance(error, torch.AcceleratorError) or "CUDA error" in str(error):
        raise EngineDeadError(f"the engine hit an unrecoverable error: {error}") from error


def find_failing_rows(run: Callable[[SchedulerOutput], object], output: SchedulerOutput) -> list[int]:
    """Rows of `output` (indexes into output.req_ids) whose run fails with only part of the batch around.
    Raises EngineDeadError if a rerun hits a fatal error."""
    return _bisect(run, output, list(range(len(output.req_ids))))


def _bisect(run: Callable[[SchedulerOutput], object], output: SchedulerOutput, rows: list[int]) -> list[int]:
    if not _fails(run, sub_output(output, rows)):
        return []
    if len(rows) == 1:
        return rows
    half = len(rows) // 2
    return _bisect(run, output, rows[:half]) + _bisect(run, output, rows[half:])


def _fails(run: Callable[[SchedulerOutput], object], output: SchedulerOutput) -> bool:
    try:
        run(output)
    except Exception as error:
        raise_if_fatal(error)
        return True
    return False


def sub_output(output: SchedulerOutput, rows: list[int]) -> SchedulerOutput:
    """The step restricted to `rows`, with their sample rows. The runner's batch already holds the step's
    changes, so none is repeated. It keeps the step's copy-on-write pairs: copying a block again is harmless
    (the source is unchanged), and skipping a copy that failed would not be."""
    new_row = {row: i for i, row in enumerate(rows)}
    samples = [(req_id, new_row[row]) for req_id, row in zip(output.sample_req_ids, output.sample_rows)
               if row in new_row]
    return SchedulerOutput([output.req_ids[row] for row in rows], [output.num_scheduled_tokens[row] for row in rows],
                           [output.num_computed_tokens[row] for row in rows],
                           [output.last_token_ids[row] for row in rows], [], [], [],
                           [req_id for req_id, _ in samples], [row for _, row in samples], output.blocks_to_copy, [])
