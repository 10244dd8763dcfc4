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
import unittest

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
from sglang_dflash.assets import tiny_pair
from sglang_server import Server

pytestmark = pytest.mark.slow

KITS = (SpecCorrectnessKit, SpecLogprobKit, SpecPenaltyKit, SpecFeatureKit, SpecGrammarKit, SpecSamplingMaskKit,
        SpecHiddenStatesKit, JSONConstrainedMixin, RegexConstrainedMixin, EBNFConstrainedMixin, MatchedStopMixin,
        BasicAPIContractMixin)


class _OnBundledPair:
    speculative = False
    acc_length_thres = 1.2  # the bundled pair's level (SGLang's kits expect 3.1 from large pairs)
    batch_accept_len_thres = 1.1

    @classmethod
    def setUpClass(cls):
        from sglang.srt.utils.hf_transformers_utils import get_tokenizer

        os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]  # `sglang` command
        target, draft = tiny_pair()
        cls.model = str(target)
        cls.server = Server(target, draft if cls.speculative else None, "--enable-return-hidden-states",
                            "--enable-custom-logit-processor").wait_ready()
        cls.base_url, cls.process = cls.server.url, cls.server.proc
        cls.tokenizer = get_tokenizer(cls.model)

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()


class TestKitsNoSpeculation(_OnBundledPair, *KITS, unittest.TestCase):
    pass


class TestKitsDflash(_OnBundledPair, *KITS, unittest.TestCase):
    speculative = True
