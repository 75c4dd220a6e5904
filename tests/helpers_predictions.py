"""What "the same answer" means when two paths predict the same files (README, "Same
answer on every path"): the same rows in the same order, the same labels, errors and
every other text cell, and probabilities equal within :data:`PROB_ATOL`.

Not bit for bit: fp32 kernels sum in a different order for different batch shapes on some
CPUs (a 2-core Xeon with AVX512-BF16 printed 0.997264 on one path and 0.997265 on the
other), so the last printed digit may differ wherever two paths batch differently.
"""

from __future__ import annotations

import csv
import io
import math

# What the README promises, and what the other cross-path tests (export, TTA) use: ten
# units of the 6th decimal the CSV prints. The differences seen between batch shapes are
# one unit (fp32 sums in another order), so this leaves room for other CPUs' kernels.
PROB_ATOL = 1e-5
PROB_COLUMNS = ("confidence",)


def close(a: float, b: float, atol: float = PROB_ATOL) -> bool:
    return math.isclose(a, b, rel_tol=0.0, abs_tol=atol)


def assert_same_prediction_csv(got: str, want: str, atol: float = PROB_ATOL) -> None:
    """Two predictions CSVs (their text) give the same answer: same header, rows, order
    and text cells; numeric probability cells within ``atol``."""
    a = list(csv.reader(io.StringIO(got)))
    b = list(csv.reader(io.StringIO(want)))
    assert a[0] == b[0], f"headers differ: {a[0]} vs {b[0]}"
    assert len(a) == len(b), f"{len(a) - 1} rows vs {len(b) - 1}"
    numeric = {i for i, name in enumerate(a[0]) if name.startswith(PROB_COLUMNS)}
    for n, (ra, rb) in enumerate(zip(a[1:], b[1:], strict=True), start=2):
        assert len(ra) == len(rb), f"line {n}: {ra} vs {rb}"
        for i, (x, y) in enumerate(zip(ra, rb, strict=True)):
            if i in numeric and x and y:
                assert close(float(x), float(y), atol), f"line {n}, {a[0][i]}: {x} vs {y}"
            else:
                assert x == y, f"line {n}, {a[0][i]}: {x!r} vs {y!r}"
