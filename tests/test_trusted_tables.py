"""`program.attention`'s default `validate=None`: tables that come unchanged from the
program's own cache skip the count checks (a host sync on a GPU); any other tables, and cache
tables changed in place since, are checked; True / False force either way."""
from __future__ import annotations

import pytest
import torch

import codegen  # noqa: F401  (registers the backends)
import codegen.program as program_module
import sparsedsl as sd
from codegen.attention.tables import BlockTables, resolve_validate, tables_from_reference
from sparsedsl import reference

PATTERN = sd.Pattern(sd.VideoLayout(2, 4, (2, 2), 1), sink=sd.Sink(1),
                     persistent=sd.Persistent(2), window=sd.LocalWindow(1, sd.Radius(1, 0, 0)),
                     current=sd.Causal(), update=sd.Update(sd.stat.importance), name="trusted")


@pytest.fixture
def counted(monkeypatch):
    """How many times the count check (the host sync) ran."""
    calls = []
    real = program_module._check_table_counts

    def spy(schedule, tables):
        calls.append(tables)
        return real(schedule, tables)
    monkeypatch.setattr(program_module, "_check_table_counts", spy)
    return calls


def rollout(steps=3, seed=0):
    program = sd.compile(PATTERN, num_heads=2, num_kv_heads=2, head_dim=8, dtype="float32",
                         backend="torch")
    cache = program.new_cache(batch=1, num_layers=1)
    g = torch.Generator().manual_seed(seed)
    shape = (1, 2, PATTERN.layout.chunk_frames * 8, 8)
    for _ in range(steps):
        q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
        cache.commit(0, q, k, v)
    return program, cache, [torch.randn(shape, generator=g) for _ in range(3)]


def test_cache_tables_skip_the_sync_and_give_the_checked_result(counted):
    program, cache, (q, k, v) = rollout()
    tables = cache.tables(0)
    assert tables.is_trusted()
    fast, _ = program.attention(q, k, v, tables)
    assert counted == []
    checked, _ = program.attention(q, k, v, tables, validate=True)
    assert len(counted) == 1
    torch.testing.assert_close(fast, checked, rtol=0, atol=0)


def test_tables_changed_in_place_are_checked_again(counted):
    program, cache, (q, k, v) = rollout()
    tables = cache.tables(0)
    tables.persistent_count.fill_(99)           # a user's edit: out of [0, capacity]
    assert not tables.is_trusted()
    with pytest.raises(ValueError, match="persistent_count"):
        program.attention(q, k, v, tables)
    assert len(counted) == 1
    program.attention(q, k, v, tables, validate=False)   # forced off: no check
    assert len(counted) == 1


def test_tables_of_an_earlier_step_lose_their_trust():
    program, cache, (q, k, v) = rollout(steps=2)
    before = cache.tables(0)
    cache.commit(0, q, k, v)                     # the cache moves on, in place
    assert not before.is_trusted() and cache.tables(0).is_trusted()


def test_tables_built_elsewhere_are_checked(counted):
    program, _, (q, k, v) = rollout()
    state = reference.new_state(program.schedule, batch=1)
    tables = tables_from_reference(program, state, torch.float32, "cpu")
    assert not tables.is_trusted()
    assert resolve_validate(None, tables) and not resolve_validate(False, tables)
    assert resolve_validate(True, tables.mark_trusted()) and not resolve_validate(None, tables)
    assert isinstance(tables, BlockTables)


def test_inference_mode_tables_are_checked_not_trusted(counted):
    """Inference tensors keep no version counter: tables made under inference_mode cannot
    prove they are unchanged, so they are checked (and work) rather than crash."""
    with torch.inference_mode():
        program, cache, (q, k, v) = rollout()
        tables = cache.tables(0)
        assert not tables.is_trusted()
        out, _ = program.attention(q, k, v, tables)
    assert len(counted) == 1 and torch.isfinite(out).all()


TOPK = sd.Pattern(sd.VideoLayout(2, 4, (2, 2), 1), sink=sd.Sink(1),
                  persistent=sd.Persistent(2), window=sd.LocalWindow(3, sd.Radius(0, 0, 0) | sd.TopK(k=1)),
                  current=sd.Causal(), update=sd.Update(sd.stat.importance), name="topk")


def test_a_chunks_passes_reuse_the_static_visits_and_keep_their_top_k_apart():
    """The four denoising passes and the clean pass of a chunk read the same cache: the
    static part of the visit tables is built once per chunk and layer and reused; each pass's
    Top-K writes into its own copy, so a pass gives what a fresh program gives."""
    def make():
        return sd.compile(TOPK, num_heads=2, num_kv_heads=1, head_dim=8, dtype="float32",
                          backend="torch")
    program, reference_program = make(), make()
    caches = [p.new_cache(batch=1, num_layers=2) for p in (program, reference_program)]
    g = torch.Generator().manual_seed(1)
    n = TOPK.layout.chunk_blocks * TOPK.layout.block_tokens
    shape, kv_shape = (1, 2, n, 8), (1, 1, n, 8)
    for step in range(6):
        passes = [torch.randn(shape, generator=g) for _ in range(3)]
        k, v = torch.randn(kv_shape, generator=g), torch.randn(kv_shape, generator=g)
        for layer in range(2):
            for q in passes + passes[:1]:      # the first pass again after the others
                got, _ = program.attention(q, k, v, caches[0].tables(layer))
                fresh = make()                 # no memo: what the pass must give
                want, _ = fresh.attention(q, k, v, caches[1].tables(layer))
                torch.testing.assert_close(got, want, rtol=0, atol=0)
            for cache in caches:
                cache.commit(layer, passes[0], k, v)
        # one memo entry per layer and sparse step (dense steps build no visit tables),
        # reused by every pass
        sparse = sum(program.path_at(t) == "sparse" for t in range(step + 1))
        assert len(program._static_visit_memo) == 2 * sparse
    assert sparse >= 2
