"""The test session never writes into the user's own imgclf home."""

from __future__ import annotations

from pathlib import Path

from imgclf.paths import imgclf_home


def test_undoing_a_tests_patches_keeps_the_cache_out_of_the_users_home(monkeypatch):
    monkeypatch.undo()  # also undoes conftest's per-test IMGCLF_HOME, as some tests do
    home = imgclf_home().resolve()
    assert not home.is_relative_to((Path.home() / ".cache").resolve())
    assert home.name.startswith("imgclf-test-home-")
