"""The overlap (V2) path's parts, on CPU. SGLang 0.5.23 never overlaps speculative decoding on a CPU
(it forces the synchronous scheduler), so the path cannot run end to end here; these run its pieces
against SGLang's own code: the scheduler-mode choice, and our draft input through SGLang's FutureMap
relay (stash after a step, requests finishing and joining, gather at the next forward)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


@pytest.fixture
def future_map(monkeypatch):
    import sglang.srt.speculative.spec_utils as spec_utils
    from sglang.srt.managers.overlap_utils import FutureMap
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    # the FutureMap asks the published speculative config whether hidden states are relayed; a server
    # publishes it at start, a unit test has to stand it in
    monkeypatch.setattr(spec_utils, "get_spec",
                        lambda: SimpleNamespace(speculative_algorithm="DFLASH", enable_multi_layer_eagle=False))
    return FutureMap(torch.device("cpu"), SpeculativeAlgorithm.DFLASH,
                     SimpleNamespace(req_to_token=torch.zeros(16, 64, dtype=torch.int32)))


def _step_result(fm, rows: list[int], bonus: list[int]):
    """What the scheduler does with our result under overlap: stash it, then carry the draft input on with
    its FutureMap rows and the bonus tokens not yet known on the host."""
    from sglang.srt.managers.overlap_utils import RelayPayload
    from sglang_dflash.srt.spec_inputs import DFlashDraftInput

    out = DFlashDraftInput(bonus_tokens=torch.tensor(bonus), block_size=4)
    fm.stash(torch.tensor(rows), RelayPayload.from_draft_input(out))
    out.future_indices = torch.tensor(rows)
    return out


def _resolved(fm, draft_input) -> list[int]:
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    draft_input.bonus_tokens = torch.full_like(draft_input.bonus_tokens, -1)  # what the relay must overwrite
    fm._resolve_spec_extras(SimpleNamespace(spec_info=draft_input, spec_algorithm=SpeculativeAlgorithm.DFLASH))
    return draft_input.bonus_tokens.tolist()


def test_relay_follows_requests_finishing_and_joining(future_map):
    running = _step_result(future_map, rows=[2, 5, 7], bonus=[11, 12, 13])
    running.filter_batch(torch.tensor([0, 2]))  # the request in row 5 finished
    joining = _step_result(future_map, rows=[9], bonus=[40])  # a request just prefilled
    running.merge_batch(joining)
    assert _resolved(future_map, running) == [11, 13, 40]
    assert running.topk_p.shape[0] == running.hidden_states.shape[0] == 3  # relay fields sized to the batch


def test_relayed_and_direct_inputs_do_not_mix(future_map):
    from sglang_dflash.srt.spec_inputs import DFlashDraftInput

    running = _step_result(future_map, rows=[1], bonus=[5])
    with pytest.raises(RuntimeError, match="relayed"):
        running.merge_batch(DFlashDraftInput(bonus_tokens=torch.tensor([6]), block_size=4))


def test_direct_filter_and_merge():
    from sglang_dflash.srt.spec_inputs import DFlashDraftInput

    a = DFlashDraftInput(bonus_tokens=torch.tensor([1, 2, 3]), block_size=4)
    a.filter_batch(torch.tensor([2, 0]))
    a.merge_batch(DFlashDraftInput(bonus_tokens=torch.tensor([9]), block_size=4))
    assert a.bonus_tokens.tolist() == [3, 1, 9] and a.future_indices is None


@pytest.mark.parametrize("flag,overlap", [(None, False), ("SGLANG_ENABLE_DFLASH_SPEC_V2", True),
                                          ("SGLANG_ENABLE_SPEC_V2", True)])
def test_scheduler_mode_follows_the_flags(monkeypatch, flag, overlap):
    from sglang_dflash.srt.hooks import _synchronous_unless_overlap_requested

    for name in ("SGLANG_ENABLE_DFLASH_SPEC_V2", "SGLANG_ENABLE_SPEC_V2"):
        monkeypatch.delenv(name, raising=False)
    if flag:
        monkeypatch.setenv(flag, "1")
    args = SimpleNamespace()
    _synchronous_unless_overlap_requested(lambda server_args: None, args)
    declared = getattr(args, "_resolved_overrides", [])
    assert (("sglang_dflash", {"disable_overlap_schedule": True}) in declared) is not overlap
