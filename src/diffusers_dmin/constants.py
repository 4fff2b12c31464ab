"""On-disk names and format constants of a DMin index (DESIGN §4).

A local index folder and a Hub repository hold the same files::

    dmin_index.json                      the manifest, written last (see `storage.Manifest`)
    shards/sketches-00000.safetensors    "sketches" (n, T, K) and "ids" (n,) int64; append-only
    noise.safetensors                    "noise": the fixed noise (optional, for audit)
    hnsw.bin                             the hnswlib graph (optional; rebuilt when absent)
    faiss_ivf.safetensors                the FAISS IVF index as arrays we write and validate (optional)
    README.md                            the dataset card
"""

from __future__ import annotations


# Version of the folder format. Bump it when a reader of the previous version could misread a new index.
FORMAT_VERSION = 1

MANIFEST_NAME = "dmin_index.json"
SHARDS_DIR = "shards"
SHARD_NAME_TEMPLATE = SHARDS_DIR + "/sketches-{:05d}.safetensors"
NOISE_NAME = "noise.safetensors"
HNSW_NAME = "hnsw.bin"
FAISS_NAME = "faiss_ivf.safetensors"
README_NAME = "README.md"

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

# A shard holds at most this many bytes of sketches by default (many rows per file, few files per commit).
DEFAULT_MAX_SHARD_BYTES = 2**30
