"""The paged KV cache: fixed-size blocks allocated once, a block table per sequence, and a prefix
cache of full blocks keyed by a hash chain over their tokens and the images inside them."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from levante.engine.sequence import Sequence


def block_hash(parent: bytes, tokens: list[int], images: tuple[bytes, ...]) -> bytes:
    """128-bit key of a full block: its parent's key, its token ids and the content hashes of the
    images it holds, so equal text with different images never shares a block."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", tokens).tobytes())
    for digest in images:
        h.update(digest)
    return h.digest()


class BlockManager:
    """Owns which block belongs to whom. Free blocks wait in LRU order; a freed block that holds a
    cached prefix keeps its key until it is reused, so a later request can still hit it."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref = [0] * num_blocks
        self.key: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of which found in the cache

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq: Sequence, num_new: int) -> int:
        return max(0, -(-(seq.num_computed + num_new) // self.block_size) - len(seq.block_table))

    def match_prefix(self, seq: Sequence) -> int:
        """For a sequence with no blocks yet: take every cached full block of its prefix and return
        how many prompt tokens that covers. The last token is always recomputed: its logits are
        needed to sample. A request for prompt logprobs needs every prompt token's logits, so it
        takes nothing from the cache (its blocks are still registered for others)."""
        assert not seq.block_table and seq.num_computed == 0
        tokens, bs = seq.tokens, self.block_size
        reuse = self.prefix_caching and seq.params.prompt_logprobs is None
        limit = (len(tokens) - 1) // bs if reuse else 0
        parent = b""
        for i in range(limit):
            key = block_hash(parent, tokens[i * bs : (i + 1) * bs], seq.block_images(i * bs, (i + 1) * bs))
            block = self.cached.get(key)
            if block is None:
                break
            if self.ref[block] == 0:
                del self.free[block]
            self.ref[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(key)
            parent = key
        seq.num_computed = len(seq.block_table) * bs
        return min(seq.num_computed, len(seq.prompt))

    def record_lookup(self, seq: Sequence, hits: int) -> None:
        """Counts an admitted sequence's lookup (retries of a sequence that did not fit do not count)."""
        self.prefix_queries += len(seq.prompt)
        self.prefix_hits += hits
        if not seq.num_preemptions:  # a recompute after preemption is not the client's cache hit
            seq.num_cached = hits

    def allocate(self, seq: Sequence, num_new: int) -> bool:
        """Makes the block table cover `num_new` more tokens; False (and no change) if the pool is
        short. Full blocks among them are registered in the prefix cache right away: their K/V are
        written in this step's forward, before any attention reads them."""
        need = self.blocks_needed(seq, num_new)
        if need > len(self.free):
            return False
        for _ in range(need):
            block, _ = self.free.popitem(last=False)
            old = self.key[block]
            if old is not None:
                if self.cached.get(old) == block:
                    del self.cached[old]
                self.key[block] = None
            self.ref[block] = 1
            seq.block_table.append(block)
        self._register_full_blocks(seq, seq.num_computed + num_new)
        return True

    def _register_full_blocks(self, seq: Sequence, upto: int) -> None:
        if not self.prefix_caching:
            return
        bs, tokens = self.block_size, None
        for i in range(len(seq.block_hashes), min(upto, len(seq)) // bs):
            tokens = tokens or seq.tokens
            parent = seq.block_hashes[-1] if seq.block_hashes else b""
            key = block_hash(parent, tokens[i * bs : (i + 1) * bs], seq.block_images(i * bs, (i + 1) * bs))
            seq.block_hashes.append(key)
            block = seq.block_table[i]
            if self.key[block] is None and key not in self.cached:
                self.key[block] = key
                self.cached[key] = block

    def release(self, seq: Sequence) -> None:
        """Returns a sequence's blocks, tail first, so the tail is evicted before the shared head."""
        for block in reversed(seq.block_table):
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free[block] = None
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_computed = 0

    def check(self) -> None:
        """Invariants, for tests: every block is free xor referenced; cache keys are consistent."""
        for block in range(self.num_blocks):
            assert (block in self.free) == (self.ref[block] == 0), block
            assert self.ref[block] >= 0
        for key, block in self.cached.items():
            assert self.key[block] == key


class KVStore:
    """The K/V tensors themselves: per layer [kv heads, slots, head_dim], slot = block * size +
    offset. Head-major, so that gathering a block is one contiguous copy per head and the
    gathered keys feed batched matmuls without another copy. One block past `num_blocks` belongs to
    no sequence: `scratch` is where rows that only pad a step to a fixed size (a CUDA graph's
    bucket, a compile's warm-up) write."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_layers, num_kv_heads, (num_blocks + 1) * block_size, head_dim)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch = num_blocks
        # zeros, not empty: batched decode reads (and masks) the unused tail of each row's last
        # block, and masked weights times NaN garbage would still be NaN
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores one layer's new k, v [T, Hkv, D] at `slots`. An fp8 cache saturates: values past
        the format's largest finite one (448 in e4m3, 57344 in e5m2) are stored as it, not as inf."""
        torch.ops.levante_kv.write(self.k, self.v, layer, slots, k, v)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


@torch.library.custom_op("levante_kv::write", mutates_args=("k_cache", "v_cache"))
def _write(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layer: int,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """`KVStore.write` as one operator over the whole caches, so a compiled step writes its slots in
    place (an indexed assignment into a layer's view of the cache traces as a copy of the cache)."""
    for cache, x in ((k_cache[layer], k), (v_cache[layer], v)):
        if cache.element_size() == 1:
            top = torch.finfo(cache.dtype).max
            x = x.clamp(-top, top)
        cache[:, slots] = x.transpose(0, 1).to(cache.dtype)
