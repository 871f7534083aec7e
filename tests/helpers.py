"""Shared helpers for the tests (not a test module)."""

import numpy as np


def mantissa_bits(dtype) -> int:
    return {"float32": 23, "float16": 10, "bfloat16": 7, "float64": 52}[str(dtype).replace("torch.", "")]


def smaq_bound(x64, y64, stats, params, out_dtype):
    """Per-element error bound of SmaQ with nearest rounding, from the recorded statistics.

    Main values: std / (2 r_main); outliers: std / (2 r_out), also beyond t_outlier (escaped, or
    exact); with ``outliers="clamp"`` values beyond t_outlier were clamped, so their bound grows
    with the distance. Plus half a unit in the last place of the output dtype.
    """
    bm, bo = params["bits_main"], params["bits_outlier"]
    t_main, t_out = params["t_main"], params["t_outlier"]
    r_main = (2 ** (bm - 2) - 1) / t_main
    r_out = (2 ** (bo - 2) - 1) / (t_out - t_main)
    mean, std = stats["mean"], stats["std"]
    a = np.abs((x64 - mean) / std)
    # The kernel computes z and the scaled magnitude in float32: a code of b bits carries up to
    # about 2^(b - 2) * 2^-21 grid steps of arithmetic error (negligible below ~12 bits).
    slack_main = 1 + 2.0 ** (bm - 2 - 21)
    slack_out = 1 + 2.0 ** (bo - 2 - 21)
    half_main = std / (2 * r_main) * slack_main
    half_out = std / (2 * r_out) * slack_out
    bound = np.where(a <= t_main, half_main, half_out)
    if params.get("outliers") == "clamp":
        bound = np.where(a > t_out, (a - t_out) * std + half_out, bound)
    else:
        # escaped values: the f64 residual path, a relative slack for very large z
        bound = np.where(a > t_out, half_out * (1 + 1e-6 * a), bound)
    ulp = np.maximum(np.abs(y64), np.abs(x64)) * 2.0 ** -(mantissa_bits(out_dtype) + 1)
    return bound * (1 + 1e-4) + ulp * 1.01 + 1e-30
