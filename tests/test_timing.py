"""The one timing helper: parts summed by name, a device wait at both ends of each."""

import time

from aml_rapids.timing import span


def test_span_sums_parts_and_waits_for_the_device_at_both_ends():
    totals, calls = {}, []
    for _ in range(2):
        with span(totals, "step", sync=lambda: calls.append(time.perf_counter())):
            time.sleep(0.01)
    with span(totals, "other"):
        pass
    assert set(totals) == {"step", "other"} and totals["step"] >= 0.02 and totals["other"] < 0.01
    assert len(calls) == 4  # before and after each of the two blocks
    assert calls[1] - calls[0] >= 0.01 and calls[3] - calls[2] >= 0.01
