"""Hub push/pull through the real huggingface_hub client and a Hub-protocol server on 127.0.0.1 (hub.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusers_dmin.config import DMinConfig
from diffusers_dmin.constants import HNSW_NAME, MANIFEST_NAME, README_NAME
from diffusers_dmin.errors import DMinError, HubAuthenticationError, IndexCorruptError, IndexNotFoundError
from diffusers_dmin.index import GradientIndex


# huggingface_hub's LFS upload passes a file object as `data=`, which httpx deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

T, K = 2, 32
REPO = "tester/tiny-dmin-index"
FAKE_TOKEN = "hf_fake"  # the token the `fake_hub` fixture accepts (user "tester")


def _sketches(n, seed=0):
    x = torch.randn(n, T, K, generator=torch.Generator().manual_seed(seed))
    centres = torch.randn(8, T, K, generator=torch.Generator().manual_seed(99))
    return torch.nn.functional.normalize(0.5 * x + centres[torch.arange(n) % 8], dim=-1)


def _index(n=500, hnsw=False):
    index = GradientIndex.from_sketches(
        _sketches(n), config=DMinConfig(num_timesteps=T, sketch_dim=K), dataset_id="tester/data", id_column="id"
    )
    index.set_progress_bar_config(disable=True)
    if hnsw:
        index.build_hnsw()
    return index


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.sample_ids, y.sample_ids)
        np.testing.assert_array_equal(x.scores, y.scores)


def _downloads(hub, name=""):
    return hub.count("GET", rf"/resolve/[^/]+/{name}")


def test_push_then_pull_gives_identical_results_and_second_pull_hits_the_cache(fake_hub):
    index = _index(hnsw=True)
    queries = _sketches(4, seed=1)
    commit = index.push_to_hub(REPO, private=True)
    assert "/datasets/tester/tiny-dmin-index/commit/" in str(commit)  # a dataset repo by default

    history = fake_hub.history(REPO)
    assert len(history) == 2  # repo creation + exactly one commit for the push
    files = set(history[0].files)
    assert {MANIFEST_NAME, README_NAME, HNSW_NAME, "shards/sketches-00000.safetensors"} <= files
    assert history[0].files["shards/sketches-00000.safetensors"].lfs_oid is not None  # uploaded through LFS
    card = fake_hub.file_bytes(REPO, README_NAME).decode()
    assert "- dmin" in card and "membership" in card and f'GradientIndex.from_pretrained("{REPO}")' in card

    pulled = GradientIndex.from_pretrained(REPO)
    _same(pulled.search(queries, top_k=10), index.search(queries, top_k=10))
    assert _downloads(fake_hub, HNSW_NAME) == 0  # exact search needs no graph
    first = _downloads(fake_hub)

    again = GradientIndex.from_pretrained(REPO)  # second pull: files come from the cache
    assert _downloads(fake_hub) == first
    _same(again.search(queries, top_k=10), index.search(queries, top_k=10))

    _same(again.search(queries, top_k=10, exact=False), index.search(queries, top_k=10, exact=False))
    assert _downloads(fake_hub, HNSW_NAME) == 1  # fetched lazily on the first approximate search
    _same(again.search(queries, top_k=10, exact=False, rescore=False), index.search(queries, 10, False, rescore=False))


def test_offline_pull_from_the_cache(fake_hub):
    index = _index()
    index.push_to_hub(REPO, endpoint=fake_hub.endpoint)
    GradientIndex.from_pretrained(REPO, endpoint=fake_hub.endpoint)
    fake_hub.stop()  # the Hub is gone
    offline = GradientIndex.from_pretrained(REPO, local_files_only=True)
    _same(offline.search(_sketches(2, seed=3)), index.search(_sketches(2, seed=3)))
    with pytest.raises(IndexNotFoundError, match="not in the cache"):
        GradientIndex.from_pretrained("tester/never-pulled", local_files_only=True)


def test_wrong_token_and_missing_repo_give_clear_errors(fake_hub):
    index = _index(n=20)
    with pytest.raises(HubAuthenticationError, match="refused the token") as err:
        index.push_to_hub(REPO, token="hf_wrong")
    assert isinstance(err.value, PermissionError) and isinstance(err.value, DMinError)
    index.push_to_hub(REPO, private=True, token=FAKE_TOKEN)
    with pytest.raises(HubAuthenticationError, match="token"):
        GradientIndex.from_pretrained(REPO, token="hf_wrong")
    with pytest.raises(IndexNotFoundError, match="does not exist or is private"):
        GradientIndex.from_pretrained(REPO, token=False)  # private repo, anonymous
    with pytest.raises(IndexNotFoundError, match="repo_type='model'"):
        GradientIndex.from_pretrained("tester/no-such-index")
    with pytest.raises(IndexNotFoundError, match="revision"):
        GradientIndex.from_pretrained(REPO, revision="no-such-branch")
    with pytest.raises(IndexNotFoundError, match="neither an existing local folder nor a valid Hub repo id"):
        GradientIndex.from_pretrained("./not/a/folder/../x")


def test_repo_without_an_index(fake_hub, tmp_path):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("tester/just-data", repo_type="dataset")
    (tmp_path / "data.txt").write_text("hello")
    api.upload_folder(repo_id="tester/just-data", repo_type="dataset", folder_path=str(tmp_path))
    with pytest.raises(IndexNotFoundError, match="not a DMin index"):
        GradientIndex.from_pretrained("tester/just-data")


def test_push_after_append_uploads_only_new_shards_in_one_commit(fake_hub, tmp_path):
    index = _index(n=300)
    index.save_pretrained(tmp_path / "idx")
    index.push_to_hub(REPO)
    assert fake_hub.count("PUT", "/__lfs/") == 1

    local = GradientIndex.from_pretrained(tmp_path / "idx")
    local.add(_sketches(50, seed=7))
    local.build_hnsw()
    commit = local.push_to_hub(REPO, commit_message="Add 50 rows")
    assert fake_hub.count("PUT", "/__lfs/") == 3  # the new shard and the graph; the old shard is unchanged
    history = fake_hub.history(REPO)
    assert len(history) == 3 and history[0].message == "Add 50 rows" and history[0].oid in str(commit)
    manifest = json.loads(fake_hub.file_bytes(REPO, MANIFEST_NAME))
    assert manifest["num_rows"] == 350 and len(manifest["shards"]) == 2 and manifest["hnsw"]["num_rows"] == 350

    # pushing an index without a graph removes the stale graph in the same single commit
    GradientIndex.from_sketches(_sketches(10), config=DMinConfig(num_timesteps=T, sketch_dim=K)).push_to_hub(REPO)
    history = fake_hub.history(REPO)
    assert len(history) == 4 and HNSW_NAME not in history[0].files
    assert sorted(p for p in history[0].files if p.startswith("shards/")) == ["shards/sketches-00000.safetensors"]
    assert len(GradientIndex.from_pretrained(REPO)) == 10


def test_model_repo_pull_request_and_pinned_revision(fake_hub):
    index = _index(n=40)
    index.push_to_hub("tester/as-model", repo_type="model")
    assert len(GradientIndex.from_pretrained("tester/as-model", repo_type="model")) == 40
    first_commit = fake_hub.history("tester/as-model", repo_type="model")[0].oid

    index.add(_sketches(5, seed=2))
    index.push_to_hub("tester/as-model", repo_type="model", create_pr=True)
    repo = fake_hub.repo("tester/as-model", repo_type="model")
    assert repo.refs["main"] == first_commit and "refs/pr/1" in repo.refs
    assert len(GradientIndex.from_pretrained("tester/as-model", repo_type="model", revision="refs/pr/1")) == 45
    assert len(GradientIndex.from_pretrained("tester/as-model", repo_type="model", revision=first_commit)) == 40


def test_damaged_cache_is_detected_and_force_download_repairs_it(fake_hub):
    index = _index(n=60, hnsw=True)
    index.push_to_hub(REPO)
    pulled = GradientIndex.from_pretrained(REPO, load_hnsw=True)
    assert _downloads(fake_hub, HNSW_NAME) == 1
    shard = pulled._blocks[0].folder / "shards" / "sketches-00000.safetensors"
    blob = shard.resolve()
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0x10
    blob.write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError, match="force_download=True"):
        GradientIndex.from_pretrained(REPO)
    repaired = GradientIndex.from_pretrained(REPO, force_download=True)
    _same(repaired.search(_sketches(2, seed=5)), index.search(_sketches(2, seed=5)))


def test_pull_downloads_only_the_files_the_manifest_lists(fake_hub, tmp_path):
    """Issue 11, finding 3: a file an attacker adds under shards/ (or anywhere) is never downloaded."""
    from huggingface_hub import HfApi

    index = _index(n=30, hnsw=True)
    index.push_to_hub(REPO)
    extra = tmp_path / "extra"
    (extra / "shards").mkdir(parents=True)
    (extra / "shards" / "sketches-99999.safetensors").write_bytes(b"\0" * 4096)
    (extra / "shards" / "notes.txt").write_text("not listed")
    (extra / "noise-2.safetensors").write_bytes(b"\0" * 64)
    HfApi().upload_folder(repo_id=REPO, repo_type="dataset", folder_path=str(extra))

    pulled = GradientIndex.from_pretrained(REPO, load_hnsw=True)
    assert len(pulled) == 30
    for name in ("shards/sketches-99999", "shards/notes.txt", "noise-2"):
        assert fake_hub.count("GET", rf"/resolve/[^/]+/{name}") == 0, name
        assert fake_hub.count("HEAD", rf"/resolve/[^/]+/{name}") == 0, name
    folder = pulled._blocks[0].folder
    assert sorted(p.name for p in (folder / "shards").iterdir()) == ["sketches-00000.safetensors"]
    assert _downloads(fake_hub, HNSW_NAME) == 1 and _downloads(fake_hub, README_NAME) == 1
