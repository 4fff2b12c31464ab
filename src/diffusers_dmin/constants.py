"""On-disk names and format constants of a DMin index (DESIGN §4). Every name a DMin folder may hold is here.

A local index folder and a Hub repository hold the same files::

    dmin_index.json                      the manifest, written last (see `storage.Manifest`)
    shards/sketches-00000.safetensors    "sketches" (n, T, K) and "ids" (n,) int64; append-only
    noise.safetensors                    "noise": the fixed noise (optional, for audit)
    hnsw.bin                             the hnswlib graph (optional; rebuilt when absent)
    faiss_ivf.safetensors                the FAISS IVF index as arrays we write and validate (optional)
    README.md                            the dataset card

Shard names (`storage.shard_name` chooses between the two forms): saves number their shards (`sketches-00000`); builds
name a shard after the first sample id of its unit of work (`sketches-from-000000000012`), which stays the same across
resumes and processes. Readers accept any `shards/*.safetensors` name a manifest lists (older builds and other writers
used others, e.g. `sketches-r0-00000`).

A build in progress also keeps (locally, never uploaded)::

    dmin_build.json                      the spec of an unfinished build (removed once the manifest exists)
    shards/<shard>.skipped.json          rows a build skipped (on_error="skip"), until the manifest records them
    .dmin-partial/<stem>.part-NNNNN.safetensors   rows of an unfinished shard, flushed during a build
    .dmin.lock                           the writer's lock (`folderlock`)
    .<name>.<8 characters>.tmp           a write in progress (renamed over <name> when complete)
"""

from __future__ import annotations


# Version of the folder format. Bump it when a reader of the previous version could misread a new index.
FORMAT_VERSION = 1

MANIFEST_NAME = "dmin_index.json"
SHARDS_DIR = "shards"
SHARD_SUFFIX = ".safetensors"
SHARD_GLOB = "*" + SHARD_SUFFIX  # the shard files of SHARDS_DIR, whoever named them
SHARD_NAME_TEMPLATE = SHARDS_DIR + "/sketches-{:05d}" + SHARD_SUFFIX  # saves: numbered
SAVED_SHARD_PATTERN = r"sketches-(\d{5,})\.safetensors"  # the file names SHARD_NAME_TEMPLATE writes
BUILD_SHARD_STEM_TEMPLATE = SHARDS_DIR + "/sketches-from-{:012d}"  # builds: first id of the unit...
DUPLICATE_SUFFIX_TEMPLATE = "-{:d}"  # ... + this when a foreign file already has that name
NOISE_NAME = "noise.safetensors"
HNSW_NAME = "hnsw.bin"
FAISS_NAME = "faiss_ivf.safetensors"
PRECONDITIONER_NAME = "preconditioner.safetensors"  # optional: the fitted query preconditioner
README_NAME = "README.md"

# Files of a build in progress, and of writes in progress.
BUILD_STATE_NAME = "dmin_build.json"
SKIPPED_SUFFIX = ".skipped.json"
PARTIAL_DIR = ".dmin-partial"
PARTIAL_SUFFIX_TEMPLATE = ".part-{:05d}" + SHARD_SUFFIX
LOCK_NAME = ".dmin.lock"
TEMP_SUFFIX = ".tmp"

# Tensor names inside the safetensors files.
SKETCHES_KEY = "sketches"
IDS_KEY = "ids"
NOISE_KEY = "noise"

# Hub defaults.
DEFAULT_REPO_TYPE = "dataset"
DEFAULT_COMMIT_MESSAGE = "Upload DMin gradient index"
# Files a pull needs for exact search; `hnsw.bin` is added only for approximate search.
EXACT_SEARCH_PATTERNS = (MANIFEST_NAME, SHARDS_DIR + "/*", NOISE_NAME, README_NAME)

# HNSW defaults of the DMin paper (hnswlib, inner-product space).
DEFAULT_HNSW_M = 16
DEFAULT_HNSW_EF_CONSTRUCTION = 200
DEFAULT_HNSW_EF = 100

# FAISS IVF backend (faiss_backend.py): codes, defaults, and the largest coarse dimension (Milvus's limit).
FAISS_CODECS = ("pq", "sq8", "sq4")
DEFAULT_FAISS_NPROBE = 16
DEFAULT_FAISS_CANDIDATES = 100
MAX_FAISS_COARSE_DIM = 32768
MAX_FAISS_NLIST = 2**20

# Shard sizes: the numbers of the one policy, `storage.default_shard_rows` (its doc says why builds differ). A saved
# shard holds at most this many bytes of sketches by default (many rows per file, few files per commit).
DEFAULT_MAX_SHARD_BYTES = 2**30
# A build's shard is also its unit of work (what one process computes, what a resume redoes at worst): smaller, and at
# most this many rows.
BUILD_MAX_SHARD_BYTES = 256 * 2**20
BUILD_MAX_SHARD_ROWS = 1024
