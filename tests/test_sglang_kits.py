"""SGLang 0.5.23's own server test kits (`sglang.test.kits`, shipped in the wheel) against the bundled pair on
CPU, once without speculation and once with our DFLASH: every kit test that passes without must pass with.

Slow (about 10 minutes per mode on 2 cores), so `-m slow`: `bash scripts/sglang_kits.sh` runs both modes and
writes the table in docs/compatibility.md. Kept as SGLang wrote them; only the acceptance-length thresholds
are lowered to the bundled pair's level (its drafter accepts about 1-3 tokens per step, not 3+).
Servers start in their own process group (`sglang_dflash.server.Server`): a stock server that dies on bad
input kills its parent's process tree, and the kits' radix test sends token ids up to 31999 to a target with
a 4096-token vocabulary.
"""

from __future__ import annotations

import os
import sys

import pytest
from sglang.test.kits.basic_api_contract_kit import BasicAPIContractMixin
from sglang.test.kits.ebnf_constrained_kit import EBNFConstrainedMixin
from sglang.test.kits.json_constrained_kit import JSONConstrainedMixin
from sglang.test.kits.matched_stop_kit import MatchedStopMixin
from sglang.test.kits.regex_constrained_kit import RegexConstrainedMixin
from sglang.test.kits.spec_server_kits import (
    SpecCorrectnessKit,
    SpecFeatureKit,
    SpecGrammarKit,
    SpecHiddenStatesKit,
    SpecLogprobKit,
    SpecPenaltyKit,
    SpecSamplingMaskKit,
)
from sglang.test.server_fixtures.spec_eagle_fixture import SpecEagleServerBase
from sglang_dflash.assets import tiny_pair
from sglang_server import Server

pytestmark = pytest.mark.slow

KITS = (SpecCorrectnessKit, SpecLogprobKit, SpecPenaltyKit, SpecFeatureKit, SpecGrammarKit, SpecSamplingMaskKit,
        SpecHiddenStatesKit, JSONConstrainedMixin, RegexConstrainedMixin, EBNFConstrainedMixin, MatchedStopMixin,
        BasicAPIContractMixin)


class _OnBundledPair:
    """The kits' fixture, on the bundled pair: SGLang's `SpecEagleServerBase` gives the helpers some kits call
    (`run_decode`, `send_request`), this class the server. A server that died (the stock one dies on the
    radix test's out-of-vocabulary ids) is started again before the next test, and the test that killed it
    fails, so one crash costs one test, not every test after it."""

    speculative = False
    acc_length_thres = 1.2  # the bundled pair's level (SGLang's kits expect 3.1 from large pairs)
    batch_accept_len_thres = 1.1

    @classmethod
    def _start(cls):
        target, draft = tiny_pair()
        cls.server = Server(target, draft if cls.speculative else None, "--enable-return-hidden-states",
                            "--enable-custom-logit-processor").wait_ready()
        cls.base_url, cls.process = cls.server.url, cls.server.proc

    @classmethod
    def setUpClass(cls):
        from sglang.srt.utils.hf_transformers_utils import get_tokenizer

        os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]  # `sglang` command
        cls.model = str(tiny_pair()[0])
        cls.tokenizer = get_tokenizer(cls.model)
        cls._start()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def setUp(self):
        if self.server.proc.poll() is not None:
            print(f"[kits] server died (exit {self.server.proc.returncode}); starting it again")
            type(self)._start()

    def tearDown(self):
        assert self.server.proc.poll() is None, "the server died during this test"


class TestKitsNoSpeculation(_OnBundledPair, *KITS, SpecEagleServerBase):
    pass


class TestKitsDflash(_OnBundledPair, *KITS, SpecEagleServerBase):
    speculative = True
