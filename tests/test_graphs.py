"""WidthGraphs on fake runners (no GPU, no server): which backend and graph runner a forward of each width sees,
that everything is restored after, and the capture policy (None without graphs; a failed width runs eager)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from sglang_dflash.srt import graphs
from sglang_dflash.srt.graphs import WidthGraphs, WidthState, use_width

B = 16


def fake_runner(decode_runner=None):
    main_backend = SimpleNamespace(name="main", prefill_attention_backend_str="fa3", decode_attention_backend_str="fa3")
    return SimpleNamespace(attn_backend=main_backend, decode_cuda_graph_runner=decode_runner, init_new_workspace=False,
                           is_draft_worker=False, lora_manager=None, graph_memory_usage={"target_verify": 0.5},
                           kv_index_translator=SimpleNamespace(bind_and_verify_backends=lambda backends: None))


def test_select_swaps_backend_and_graph_runner_then_restores():
    mr = fake_runner(decode_runner="runner B")
    main = mr.attn_backend
    wg = WidthGraphs(mr, B, {4: WidthState("backend 4", "runner 4"), 2: WidthState("backend 2", None)})
    with wg.select(4):
        assert (mr.attn_backend, mr.decode_cuda_graph_runner) == ("backend 4", "runner 4")
    assert (mr.attn_backend, mr.decode_cuda_graph_runner) == (main, "runner B")
    with wg.select(2):  # capture failed: its own backend, and the B-width runner (which refuses width 2: eager)
        assert (mr.attn_backend, mr.decode_cuda_graph_runner) == ("backend 2", "runner B")
    for width in (B, 8):  # the full width, and a width never built: untouched
        with wg.select(width):
            assert (mr.attn_backend, mr.decode_cuda_graph_runner) == (main, "runner B")
    with pytest.raises(KeyError), wg.select(4):  # restored when the forward raises
        raise KeyError("forward failed")
    assert (mr.attn_backend, mr.decode_cuda_graph_runner) == (main, "runner B")
    assert wg.graphed_widths == (4, B)
    with wg.select(4), pytest.raises(AssertionError), wg.select(4):
        pass
    with use_width(None, 4):  # no per-width graphs: nothing happens
        assert mr.attn_backend is main


def test_capture_returns_none_without_graphs():
    from sglang.srt.model_executor.runner.eager_runner import EagerRunner

    assert WidthGraphs.capture(fake_runner(None), [1, 2, 4, 8, B], B) is None  # CPU: no decode graph runner
    eager = EagerRunner.__new__(EagerRunner)  # graphs disabled: SGLang's eager runner sits there
    assert WidthGraphs.capture(fake_runner(eager), [1, 2, 4, 8, B], B) is None


def test_capture_builds_each_width_and_a_failed_one_runs_eager(monkeypatch, caplog):
    from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

    class FakeGraphRunner(DecodeCudaGraphRunner):
        def __init__(self, model_runner, *, attn_backend=None, speculative_num_draft_tokens=None):
            if speculative_num_draft_tokens == 2:
                raise Exception("Capture cuda graph failed: out of memory")
            assert model_runner.attn_backend is attn_backend  # what the capture reads is this width's backend
            self.captured_req_width, self.capture_bs = speculative_num_draft_tokens, [1, 2, 4]
            self.widths_read = seen_width[-1]

    seen_width = [B]

    def spec_draft_tokens(width):
        seen_width.append(width)
        try:
            yield
        finally:
            seen_width.append(B)

    mr = fake_runner()
    mr._get_attention_backend = lambda init_new_workspace: SimpleNamespace(width=seen_width[-1])
    mr.decode_cuda_graph_runner = FakeGraphRunner.__new__(FakeGraphRunner)
    mr.decode_cuda_graph_runner.captured_req_width = B
    main, full = mr.attn_backend, mr.decode_cuda_graph_runner
    monkeypatch.setattr(graphs, "_spec_draft_tokens", contextmanager(spec_draft_tokens))
    monkeypatch.setattr(graphs, "_free_gib", lambda model_runner, every_rank: 10.0)
    monkeypatch.setattr(graphs, "_num_ranks", lambda: 1)
    monkeypatch.setattr(graphs, "_unsupported", lambda model_runner: None)
    wg = WidthGraphs.capture(mr, [1, 2, 4, B], B)
    assert sorted(wg.states) == [1, 2, 4] and wg.graphed_widths == (1, 4, B)
    assert [wg.states[w].attn_backend.width for w in (1, 2, 4)] == [1, 2, 4]  # each backend built at its width
    assert wg.states[4].graph_runner.widths_read == 4 and wg.states[2].graph_runner is None
    assert "width 2 runs eager" in caplog.text
    assert (mr.attn_backend, mr.decode_cuda_graph_runner, seen_width[-1]) == (main, full, B)  # all restored
    monkeypatch.setattr(graphs, "_num_ranks", lambda: 2)  # several ranks: a failure is raised, never skipped alone
    monkeypatch.setattr(graphs, "_rank0_says", lambda yes: yes)  # (rank 0's memory decision: one rank here)
    with pytest.raises(RuntimeError, match="verify width 2"):
        WidthGraphs.capture(mr, [2, B], B)
    monkeypatch.setattr(graphs, "_free_gib", lambda model_runner, every_rank: 1.2)  # below 0.5 * 8/16 + 1 GiB
    assert WidthGraphs.capture(mr, [8, B], B).states == {}
    with pytest.raises(ValueError, match="outside"):
        WidthGraphs.capture(mr, [0, B], B)


def test_reads_width_per_forward_by_class_not_by_name():
    """torch_native (ours included), triton and flashinfer read a verify forward's width from its spec_info; any other
    backend, a class that only shares a name among them, does not."""
    from sglang_dflash.srt import sglang_api
    from sglang_dflash.srt.attention import VerifyCapableTorchNativeBackend
    from sglang_dflash.srt.sglang_api import reads_width_per_forward

    for cls in (sglang_api.TorchNativeAttnBackend, VerifyCapableTorchNativeBackend, sglang_api.TritonAttnBackend,
                sglang_api.FlashInferAttnBackend):
        assert reads_width_per_forward(cls.__new__(cls)), cls

    class TritonAttnBackend:  # a look-alike name is not SGLang's class
        pass

    assert not reads_width_per_forward(TritonAttnBackend())
    assert not reads_width_per_forward(SimpleNamespace(name="fa3"))


def test_a_backend_class_that_does_not_import_reads_no_width(monkeypatch, caplog):
    """Without FlashInfer (a CPU install) its class is left out, exactly: no backend of it can exist in the process.
    Only an ImportError is taken so; any other error is raised."""
    from sglang_dflash.srt import sglang_api

    caplog.set_level(logging.INFO, logger="sglang_dflash")

    def resolve_without(missing, error):
        real = sglang_api._resolve

        def resolve(name):
            if name == missing:
                raise error
            return real(name)

        return resolve

    sglang_api._per_forward_width_classes.cache_clear()
    monkeypatch.setattr(sglang_api, "_resolve", resolve_without("FlashInferAttnBackend",
                                                                ModuleNotFoundError("No module named 'flashinfer'")))
    try:
        classes = sglang_api._per_forward_width_classes()
        assert [c.__name__ for c in classes] == ["TorchNativeAttnBackend", "TritonAttnBackend"]
        assert "FlashInferAttnBackend does not import here" in caplog.text
        sglang_api._per_forward_width_classes.cache_clear()
        monkeypatch.setattr(sglang_api, "_resolve", resolve_without("TritonAttnBackend", RuntimeError("a bug")))
        with pytest.raises(RuntimeError, match="a bug"):
            sglang_api._per_forward_width_classes()
    finally:
        sglang_api._per_forward_width_classes.cache_clear()
