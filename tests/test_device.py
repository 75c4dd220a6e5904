"""Precision chosen from the hardware (issue #11): bf16 autocast only on a CPU with native
bf16, and IMGCLF_CPU_BF16=0 keeps fp32 there (the suite runs with it, conftest.py)."""

from __future__ import annotations

import torch

from imgclf.runtime import device


def test_cpu_bf16_follows_the_cpu_flags_and_the_switch(monkeypatch):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    monkeypatch.delenv("IMGCLF_CPU_BF16", raising=False)
    assert device.resolve_hardware("cpu", "auto", "auto").autocast_dtype == torch.bfloat16
    monkeypatch.setenv("IMGCLF_CPU_BF16", "0")
    assert device.resolve_hardware("cpu", "auto", "auto").autocast_dtype is None
    # An explicit precision wins over the switch.
    assert device.resolve_hardware("cpu", "bf16", "auto").autocast_dtype == torch.bfloat16
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    monkeypatch.delenv("IMGCLF_CPU_BF16")
    assert device.resolve_hardware("cpu", "auto", "auto").autocast_dtype is None
