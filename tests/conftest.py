"""Shared pytest fixtures: `fake_hub`, a Hub-protocol server on 127.0.0.1 that the real `huggingface_hub` talks to."""

from __future__ import annotations

import pytest
import torch

from fakehub import FakeHub


# The tests run tiny models, where intra-op threads gain nothing; on a busy machine every OpenMP region can stall
# until all its threads get a core (measured: 20 s instead of 0.2 s for one pipeline test). Subprocess tests set
# OMP_NUM_THREADS themselves.
torch.set_num_threads(1)


FAKE_TOKEN = "hf_fake"


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Start a `FakeHub` (token "hf_fake" = user "tester") and point huggingface_hub at it, with a fresh cache.

    huggingface_hub reads `HF_ENDPOINT` and friends at import, so the constants (and the module-level `HfApi`) are
    patched; Xet is disabled because there is no Xet server (LFS files go through the LFS batch API instead).
    """
    import huggingface_hub.constants as constants
    import huggingface_hub.hf_api as hf_api

    hub = FakeHub(tokens={FAKE_TOKEN: "tester"}).start()
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(hf_api.api, "endpoint", hub.endpoint)
    yield hub
    hub.stop()
