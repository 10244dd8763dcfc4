"""sglang-dflash: a DFLASH speculative-decoding backend for SGLang.

Vocabulary (used the same way everywhere in this package):
  target_hidden   the concatenated outputs of the target layers in `target_layer_ids`, per token
                  [num_tokens, K*H]
  context         `hidden_norm(fc(target_hidden))`, what the drafter attends to [num_tokens, H]
  mask_token_id   the id filling block positions 1..B-1 before drafting (a row of the target embedding)
  draft_tokens    the drafter's proposals d1..d(B-1) for one block
  target_predict  the target's choice after each block position (argmax, or a sample)
  accept_len      drafts kept in one step (0..B-1)
  bonus_token     the target's token after the last kept draft; the next block's anchor
  commit_len      tokens committed in one step: accept_len + 1, cut after a stop token

Shapes: bs (batch), B (block size), H (hidden), K (number of target layers), V (vocab).

Flow: target hidden states -> drafter -> verify -> accept -> commit.
"""

__version__ = "0.1.0"
SGLANG_VERSION = "0.5.23"  # the SGLang release this package was written against
