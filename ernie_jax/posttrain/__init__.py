"""Post-training: turning the pre-trained model into an assistant (SFT, then preference / RL tuning) on chat data.

- `chat`: ERNIE 4.5's chat format; conversations -> token ids and a loss mask on the assistant turns,
  generation prompts, preference-pair checks;
- `chat_pipeline`: SFT batches, conversations packed whole with the loss on the assistant turns;
- `preference_pipeline` + `dpo`: DPO / SimPO on shared-question rows [prompt | chosen | rejected].
"""

from ernie_jax.posttrain.chat import (ERNIE_CHAT_TEMPLATE, ChatFormatError, ChatTokens, check_pair, prompt, render,
                                       render_text, validate)

__all__ = ["ERNIE_CHAT_TEMPLATE", "ChatFormatError", "ChatTokens", "check_pair", "prompt", "render",
           "render_text", "validate"]
