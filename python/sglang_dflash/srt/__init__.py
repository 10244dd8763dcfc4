"""SGLang integration (sglang==0.5.23): the worker, its stages, the drafter model class, the CPU platform,
and `hooks.py`, the one module that attaches all of them to SGLang."""
